"""Model and dataset downloads from Hugging Face or ModelScope: data files only, failing fast.

What a download may bring: weights as safetensors, JSON configs, tokenizer and chat-template files;
for datasets json/jsonl/csv/parquet. Never Python code (unless the user's own config trusts remote
code) and never pickles (.bin/.pt/...), because loading either can run code.

Why not call `snapshot_download` / `from_pretrained(<hub id>)` directly: with their defaults they
hang for minutes on a host that accepts connections and never answers (huggingface_hub's
`repo_info` call runs without a timeout) and take ~25 s to give up on a refused connection.
So each download starts with one bounded probe (`HfApi.model_info(timeout=...)`), then downloads
at the commit the probe returned, which skips the unbounded call. ModelScope reads its timeouts
from the environment when it is imported, so they are set before a lazy import.

Environment: `HF_ENDPOINT` (a mirror such as https://hf-mirror.com), `HF_HUB_OFFLINE=1` (no network
for either hub: only what is cached), `HF_TOKEN` / `MODELSCOPE_API_TOKEN`, `MODELSCOPE_ENDPOINT`,
`NEKOTUNE_HUB` (the default hub), `NEKOTUNE_HUB_TIMEOUT` (seconds for the probe, default 5).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from nekotune.errors import UserError

HUBS = ("huggingface", "modelscope")
HUB_LABELS = {"huggingface": "Hugging Face", "modelscope": "ModelScope"}
MODEL_FILES = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken", "tokenizer*"]
DATA_FILES = ["*.json", "*.jsonl", "*.csv", "*.parquet"]  # what data/sources.py reads
CODE_FILES = ["*.py"]
PICKLES = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle", "*.h5", "*.msgpack", "*.onnx*", "*.npy", "*.npz"]
DEFAULT_TIMEOUT = 5.0  # a healthy hub answers the probe in well under a second
MIRROR_EXAMPLE = "https://hf-mirror.com"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_TRUE = ("1", "true", "yes", "on")


def hub_name(cfg_value: str | None, key: str = "model.hub") -> str:
    """The hub to use: the config value, else NEKOTUNE_HUB, else LLaMA-Factory's USE_MODELSCOPE_HUB=1,
    else huggingface."""
    value, where = cfg_value, key
    if value is None:
        value, where = os.environ.get("NEKOTUNE_HUB") or None, "NEKOTUNE_HUB"
    if value is None and _flag("USE_MODELSCOPE_HUB"):
        return "modelscope"
    if value is None:
        return "huggingface"
    name = str(value).strip().lower()
    if name not in HUBS:
        raise UserError(f"{where}={value!r} is not a hub nekotune knows; use one of {', '.join(HUBS)}")
    return name


def hub_timeout() -> float:
    raw = os.environ.get("NEKOTUNE_HUB_TIMEOUT")
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise UserError(f"NEKOTUNE_HUB_TIMEOUT={raw!r} must be a number of seconds above 0 "
                        f"(default {DEFAULT_TIMEOUT:g})")
    return value


def offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, read now (huggingface_hub froze its copy at import)."""
    if _flag("HF_HUB_OFFLINE") or _flag("TRANSFORMERS_OFFLINE"):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def download_model(repo_id: str, hub: str = "huggingface", revision: str | None = None, *,
                   allow_code: bool = False, timeout: float | None = None) -> Path:
    """A local directory holding the model's safetensors weights, configs and tokenizer files.
    `allow_code=True` only when the user's own config sets model.trust_remote_code (never a run's)."""
    patterns = MODEL_FILES + (CODE_FILES if allow_code else [])
    ignore = PICKLES + ([] if allow_code else CODE_FILES)
    path = _download(repo_id, hub, "model", revision, patterns, ignore, timeout)
    if not (path / "config.json").is_file() or not any(path.rglob("*.safetensors")):
        raise UserError(f"{_where(hub, 'model', repo_id)} has no config.json with safetensors weights; nekotune "
                        f"loads safetensors only (pickled .bin weights can run code): choose a repo with "
                        f"*.safetensors or convert it locally")
    return path


def download_dataset(repo_id: str, hub: str = "huggingface", split: str = "train", revision: str | None = None, *,
                     timeout: float | None = None) -> list[Path]:
    """The dataset's data files for `split`, downloaded (json/jsonl/csv/parquet only, never a loading
    script). Splits are told apart by file and folder names, as `datasets` does (train*.jsonl, data/test-*...)."""
    root = _download(repo_id, hub, "dataset", revision, DATA_FILES, PICKLES + CODE_FILES, timeout)
    return split_files(root, split, label=_where(hub, "dataset", repo_id))


def split_files(root: Path, split: str, label: str = "") -> list[Path]:
    """The files of `split` under a downloaded dataset folder, by `datasets`' own naming conventions."""
    from datasets.data_files import EmptyDatasetError, get_data_patterns, resolve_pattern

    label = label or str(root)
    try:
        patterns = get_data_patterns(str(root))
    except EmptyDatasetError:
        patterns = {}
    ext = tuple(p.lstrip("*") for p in DATA_FILES)
    found: dict[str, list[Path]] = {}
    for name, globs in patterns.items():
        files = {Path(f) for g in globs for f in _resolve(resolve_pattern, g, root)}
        found[str(name)] = sorted(f for f in files if f.suffix.lower() in ext and f.is_file())
    found = {k: v for k, v in found.items() if v}
    if not found:
        raise UserError(f"{label}: no {', '.join(DATA_FILES)} files in the download; nekotune reads data files "
                        f"only (no loading scripts): download the data and point data.path at a file")
    if split not in found:
        raise UserError(f"{label} has no split {split!r}; its splits: {', '.join(sorted(found))}; set data.split")
    return found[split]


def _resolve(resolve_pattern, pattern: str, root: Path) -> list[str]:
    try:
        return [str(f).removeprefix("file://") for f in resolve_pattern(pattern, str(root))]
    except FileNotFoundError:
        return []


def _where(hub: str, kind: str, repo_id: str) -> str:
    return f"{HUB_LABELS[hub]} {kind} {repo_id}"


def _advice(hub: str, kind: str) -> str:
    key = "model.hub" if kind == "model" else "data.hub"
    other = "modelscope" if hub == "huggingface" else "huggingface"
    where = "give a local path" if kind == "model" else "point data.path at the downloaded file"
    mirror = f"set HF_ENDPOINT to a mirror (e.g. {MIRROR_EXAMPLE}), " if hub == "huggingface" else \
        "set MODELSCOPE_ENDPOINT to a ModelScope site you can reach, "
    return f"download it and {where}, {mirror}or use {key}={other}"


def _download(repo_id: str, hub: str, kind: str, revision: str | None, patterns: list[str], ignore: list[str],
              timeout: float | None) -> Path:
    if hub not in HUBS:
        raise UserError(f"unknown hub {hub!r}; use one of {', '.join(HUBS)}")
    if not _REPO_ID.match(repo_id or ""):
        raise UserError(f"{repo_id!r} is not a {HUB_LABELS[hub]} {kind} id (owner/name) nor an existing local path")
    timeout = timeout if timeout is not None else hub_timeout()
    if hub == "modelscope":
        return _modelscope(repo_id, kind, revision, patterns, ignore, timeout)
    return _huggingface(repo_id, kind, revision, patterns, ignore, timeout)


def _huggingface(repo_id: str, kind: str, revision: str | None, patterns: list[str], ignore: list[str],
                 timeout: float) -> Path:
    from huggingface_hub import HfApi, constants, snapshot_download

    endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")  # env read now, not at import
    repo_type = None if kind == "model" else "dataset"
    where = f"Hugging Face ({endpoint}) {kind} {repo_id}"
    if offline():
        try:
            return Path(snapshot_download(repo_id, repo_type=repo_type, revision=revision, allow_patterns=patterns,
                                          ignore_patterns=ignore, local_files_only=True))
        except _hf_failures() as exc:
            raise _offline_error(where, kind, exc) from None
    failures = _hf_failures()
    api = HfApi(endpoint=endpoint)
    probe = api.model_info if kind == "model" else api.dataset_info
    try:
        info = probe(repo_id, revision=revision, timeout=timeout)
    except failures as exc:
        raise _hf_error(where, kind, revision, exc) from None
    if kind == "model":
        _check_hf_listing(where, [s.rfilename for s in (info.siblings or [])])
    try:  # at the probed commit: snapshot_download skips its own unbounded repo_info call
        return Path(snapshot_download(repo_id, repo_type=repo_type, revision=info.sha, endpoint=endpoint,
                                      allow_patterns=patterns, ignore_patterns=ignore, etag_timeout=timeout))
    except failures as exc:
        raise _hf_error(where, kind, revision, exc, during="download of") from None


def _hf_failures() -> tuple[type[Exception], ...]:
    """What a hub call raises for network, HTTP, auth and cache problems (bugs still surface)."""
    from huggingface_hub import errors as hf_errors

    try:  # huggingface_hub 2.x ships its client as httpx2, 1.x used httpx
        import httpx2 as httpx
    except ImportError:
        import httpx  # type: ignore[no-redef]

    return (httpx.HTTPError, OSError, hf_errors.EntryNotFoundError, hf_errors.HFValidationError)


def _check_hf_listing(where: str, files: list[str]) -> None:
    """Refuse before downloading gigabytes: a repo without safetensors cannot be loaded safely."""
    if files and not any(f.endswith(".safetensors") for f in files):
        pickled = [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
        raise UserError(f"{where} has no safetensors weights{' (only ' + pickled[0] + ', a pickle)' if pickled else ''}"
                        f"; nekotune loads safetensors only (pickles can run code): choose a repo with "
                        f"*.safetensors or convert it locally")


def _hf_error(where: str, kind: str, revision: str | None, exc: Exception, during: str = "") -> UserError:
    from huggingface_hub import errors as hf_errors

    name = type(exc).__name__
    if isinstance(exc, hf_errors.OfflineModeIsEnabled):
        return _offline_error(where, kind, exc)
    if isinstance(exc, hf_errors.GatedRepoError):
        return UserError(f"{where} is gated: accept its licence on the hub page and log in (`hf auth login` or "
                         f"HF_TOKEN), or {_advice('huggingface', kind)}")
    if isinstance(exc, hf_errors.RepositoryNotFoundError):
        return UserError(f"{where} not found (or private: log in with `hf auth login` or HF_TOKEN); check the id")
    if isinstance(exc, hf_errors.RevisionNotFoundError):
        return UserError(f"{where}: revision {revision!r} not found; check model.revision")
    action = f"{during} {where} failed" if during else f"cannot reach {where}"
    return UserError(f"{action} ({name}); {_advice('huggingface', kind)}")


def _offline_error(where: str, kind: str, exc: Exception) -> UserError:
    local = "give a local path" if kind == "model" else "point data.path at the downloaded file"
    return UserError(f"{where} is not in the local cache and HF_HUB_OFFLINE is set ({type(exc).__name__}); "
                     f"unset HF_HUB_OFFLINE to download it, or download it elsewhere and {local}")


# ModelScope reads these when `modelscope_hub.constants` is imported: bound the first request (the
# file listing) and do not retry it, so an unreachable host fails in seconds (67 s with defaults).
_MS_ENV = ("MODELSCOPE_REPO_TREE_PAGE_TIMEOUT_SECONDS", "MODELSCOPE_REPO_TREE_PAGE_MAX_ATTEMPTS",
           "MODELSCOPE_API_CONNECT_TIMEOUT")


def _modelscope(repo_id: str, kind: str, revision: str | None, patterns: list[str], ignore: list[str],
                timeout: float) -> Path:
    seconds = str(max(1, round(timeout)))
    for var, value in zip(_MS_ENV, (seconds, "1", seconds), strict=True):
        os.environ.setdefault(var, value)
    try:
        import modelscope  # lazy: 3-7 s to import, and an optional extra
    except ImportError:
        key = "model.hub" if kind == "model" else "data.hub"
        raise UserError(f"{key}=modelscope needs the modelscope package: pip install 'nekotune[modelscope]'") from None
    endpoint = os.environ.get("MODELSCOPE_ENDPOINT") or os.environ.get("MODELSCOPE_DOMAIN") or "https://modelscope.cn"
    where = f"ModelScope ({endpoint}) {kind} {repo_id}"
    download = modelscope.snapshot_download if kind == "model" else modelscope.dataset_snapshot_download
    kwargs = {"local_files_only": True} if offline() else {}
    try:
        return Path(download(repo_id, revision=revision, allow_patterns=patterns, ignore_patterns=ignore, **kwargs))
    except Exception as exc:  # modelscope_hub.errors.*: NetworkError, RequestTimeoutError, NotExistError, ...
        raise _modelscope_error(where, kind, exc, bool(kwargs)) from None


def _modelscope_error(where: str, kind: str, exc: Exception, was_offline: bool) -> UserError:
    name = type(exc).__name__
    first = (str(exc).strip().splitlines() or [""])[0][:120]
    if was_offline:
        local = "give a local path" if kind == "model" else "point data.path at the downloaded file"
        return UserError(f"{where} is not in the local cache and HF_HUB_OFFLINE is set ({name}); unset "
                         f"HF_HUB_OFFLINE to download it, or download it elsewhere and {local}")
    if name in ("NotExistError", "NotFoundError", "FileNotFoundError"):
        return UserError(f"{where} not found ({first}); check the id (ModelScope ids can differ from Hugging Face's)")
    if name in ("PermissionDeniedError", "AuthenticationError"):
        return UserError(f"{where}: access denied ({first}); set MODELSCOPE_API_TOKEN or {_advice('modelscope', kind)}")
    reach = "cannot reach" if isinstance(exc, (ConnectionError, TimeoutError)) or "Network" in name else "cannot get"
    return UserError(f"{reach} {where} ({name}: {first}); {_advice('modelscope', kind)}")
