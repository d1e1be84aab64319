"""Converted GGUF files, cached by content: built once, never rebuilt while nothing they come from changed.

The key of an entry is a sha256 over the contents of every source file (base weights, adapter,
tokenizer, config), the export parameters and the nekotune and gguf versions. Files are named
by that key under `<cache dir>/gguf/`, so a changed adapter gets a new entry and an unchanged one
is found again by any process.

Hashing a 500 MB base takes about a second, which would be most of a short `predict` on a warm
cache; so a file's digest is remembered beside its (size, mtime, inode), the way git's index
remembers what it hashed. A touched but unchanged file is hashed again and gives the same key.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping

DIGESTS = "digests.json"
CHUNK = 8 * 2**20
# Files of an HF model or adapter directory that an export reads; README, logs and pickles are not.
MODEL_FILE_PATTERNS = ("config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
                       "tokenizer*.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
                       "merges.txt", "chat_template.jinja", "chat_template.json", "adapter_config.json")


def cache_root() -> Path:
    from nekotune.model import cache_dir

    return cache_dir() / "gguf"


def model_files(directory: str | Path) -> list[Path]:
    """The files of a model or adapter directory an export depends on, in a stable order."""
    directory = Path(directory)
    found = {p for pattern in MODEL_FILE_PATTERNS for p in directory.glob(pattern) if p.is_file()}
    return sorted(found)


def _stat_key(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def _load_digests(root: Path) -> dict:
    try:
        data = json.loads((root / DIGESTS).read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # missing or damaged: it is only a memo, rebuilt as files are hashed


def file_digest(path: Path, memo: dict | None = None) -> str:
    """sha256 of a file's contents; `memo` maps resolved paths to (stat key, digest)."""
    path = Path(path).resolve()
    stat = _stat_key(path)
    known = (memo or {}).get(str(path))
    if isinstance(known, list) and len(known) == 2 and known[0] == stat:
        return known[1]
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            h.update(block)
    digest = h.hexdigest()
    if memo is not None:
        memo[str(path)] = [stat, digest]
    return digest


def cache_key(kind: str, sources: Iterable[str | Path], params: Mapping) -> str:
    """The content hash naming one converted file."""
    from importlib.metadata import version

    from nekotune import __version__

    root = cache_root()
    memo = _load_digests(root)
    before = dict(memo)
    digests = [file_digest(Path(p), memo) for p in sources]
    if memo != before:
        _save_digests(root, memo)
    payload = {"kind": kind, "sources": digests, "params": dict(params), "nekotune": __version__,
               "gguf": version("gguf")}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _save_digests(root: Path, memo: dict) -> None:
    from nekotune.io import atomic_write_json

    # Two processes may write at once; the loser's entries are hashed again next time.
    live = {p: v for p, v in memo.items() if Path(p).exists()}
    try:
        atomic_write_json(root / DIGESTS, live)
    except OSError:
        pass  # a read-only cache still converts; it only hashes again


def cached_gguf(kind: str, sources: Iterable[str | Path], params: Mapping,
                build: Callable[[Path], None], slot: str | None = None) -> Path:
    """The cached file for (kind, source contents, params), built with `build(tmp_path)` if absent.

    `build` writes a complete GGUF to the path it is given; it is renamed into place only when it
    returns, so a crash leaves no half-written entry. `slot` names what an entry stands for (an
    adapter's directory, say): after a new build, older entries of the same kind, slot and params
    (the same conversion of sources whose contents changed) are removed, so retraining does not
    pile up stale copies, while other conversions of the same source (f16 beside q8_0) stay. Only
    files this cache wrote are removed."""
    from filelock import FileLock

    from nekotune.io import atomic_file, atomic_write_json

    sources = [Path(p) for p in sources]
    key = cache_key(kind, sources, params)
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{kind}-{key[:20]}.gguf"
    if path.is_file():
        return path
    with FileLock(str(path) + ".lock"):  # a second process waits for the first build, then reuses it
        if not path.is_file():
            with atomic_file(path) as tmp:
                build(tmp)
            atomic_write_json(path.with_suffix(".json"), {"kind": kind, "slot": slot, "key": key, "params":
                                                          dict(params), "sources": [str(p) for p in sources],
                                                          "created": time.time()})
            _prune(root, kind, slot, json.loads(json.dumps(dict(params), default=str)), keep=path)
    return path


def _prune(root: Path, kind: str, slot: str | None, params: dict, keep: Path) -> None:
    if slot is None:
        return
    for info in root.glob(f"{kind}-*.json"):
        target = info.with_suffix(".gguf")
        if target == keep:
            continue
        try:
            meta = json.loads(info.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if meta.get("kind") == kind and meta.get("slot") == slot and meta.get("params") == params:
            for stale in (target, info, Path(str(target) + ".lock")):
                try:  # a process still reading the old file keeps it open (POSIX); elsewhere it stays
                    os.unlink(stale)
                except OSError:
                    pass
