"""What a run directory may decide, and what `model.trust_remote_code` lets run.

A run directory is data, often downloaded from someone else. Its config.yaml supplies prompt
settings (system prompt, enable_thinking, sampling) so inference renders prompts as training
did, but never anything that makes transformers run or fetch code: `trust_remote_code`,
`revision`, `attn_implementation` (which may name a hub kernel repository), or a template file
outside the run directory. Those come from the user's own command line or YAML only, and
turning on trust_remote_code logs a warning naming the code that may then run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from nekotune.errors import UserError

log = logging.getLogger(__name__)

# model.* keys a run's config.yaml passes on to chat/ask/eval/serve/merge/export (an allowlist:
# a key added later stays the user's own until someone decides otherwise)
RUN_MODEL_KEYS = ("dtype", "device", "quantization", "chat_template")
NEVER_FROM_A_RUN = ("trust_remote_code", "revision", "attn_implementation")
CODE_FILES = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")


def run_model_settings(section: Any, run_dir: str | None) -> dict:
    """The part of a run's `model:` section that inference may take over."""
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise UserError(f"{run_dir}/config.yaml: `model` must be a mapping of keys to values; the file is damaged")
    kept = {k: v for k, v in section.items() if k in RUN_MODEL_KEYS}
    ignored = [k for k in NEVER_FROM_A_RUN if section.get(k)]
    if ignored:
        log.info("ignoring %s from %s/config.yaml: a run directory cannot turn these on; set them yourself "
                 "(command line or your YAML) if you trust its files", ", ".join(f"model.{k}" for k in ignored),
                 run_dir)
    if section.get("revision") and _once(("revision", run_dir)):  # it changes which weights load: say so
        log.warning("%s was trained on revision %s of its base model; a run directory cannot choose the revision: "
                    "add model.revision=%s to the command to use it", run_dir, section["revision"],
                    section["revision"])
    template = kept.pop("chat_template", None)
    inside = _inside(template, run_dir) if isinstance(template, str) and template else None
    if inside is not None:
        kept["chat_template"] = str(inside)
    # else: the adapter's tokenizer already carries the template it was trained with
    return kept


def _inside(path: str, run_dir: str | None) -> Path | None:
    """`path` (relative paths meaning relative to the run) when it resolves to a file inside the run."""
    if not run_dir:
        return None
    root = Path(run_dir).resolve()
    p = Path(path).expanduser()
    p = (p if p.is_absolute() else root / p).resolve()  # resolve(): a symlink out of the run is outside
    return p if p.is_relative_to(root) and p.is_file() else None


# -- custom code -----------------------------------------------------------------------------
def _auto_map_entries(folder: Path) -> list[str]:
    entries = []
    for name in CODE_FILES:
        try:
            data = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        if not isinstance(auto_map, dict):
            continue
        for auto, ref in auto_map.items():
            refs = ref if isinstance(ref, (list, tuple)) else [ref]
            entries += [f"{auto} -> {r}" for r in refs if isinstance(r, str)]
    return entries


def custom_code(folders: Any) -> list[str]:
    """One line per local folder that ships code transformers would run with trust_remote_code:
    its auto_map classes and its .py files."""
    found, seen = [], set()
    for folder in folders:
        if not folder or not Path(folder).is_dir() or Path(folder).resolve() in seen:
            continue
        folder = Path(folder)
        seen.add(folder.resolve())
        entries = _auto_map_entries(folder)
        scripts = sorted(p.name for p in folder.glob("*.py"))
        if entries or scripts:
            what = "; ".join(filter(None, [", ".join(entries), "files " + ", ".join(scripts) if scripts else ""]))
            found.append(f"{folder}: {what}")
    return found


_warned: set = set()


def _once(key) -> bool:
    """A command resolves the same run several times (merge, export, verify); warn the first time."""
    if key in _warned:
        return False
    _warned.add(key)
    return True


def warn_trusted(sources: Any) -> None:
    """The user turned trust_remote_code on: say which code that lets run (each folder or hub
    repository once per process, however many times a command loads from it)."""
    fresh = [str(s) for s in sources if s and _once(("trusted", str(Path(str(s)).expanduser())))]
    found = custom_code([s for s in fresh if Path(s).is_dir()])
    hub = [s for s in fresh if not Path(s).exists()]
    if found:
        log.warning("model.trust_remote_code=true: transformers will run Python code from these files: %s. "
                    "Only do this with files you trust.", " | ".join(found))
    if hub:
        log.warning("model.trust_remote_code=true: transformers will run any Python code the hub repository %s "
                    "ships (its auto_map). Only do this with repositories you trust.", ", ".join(hub))
    if fresh and not found and not hub:
        log.info("model.trust_remote_code=true, but %s ship no custom code (no auto_map, no .py files)",
                 ", ".join(fresh))


def needs_code_error(source: str, what: str) -> UserError:
    """transformers refused to load `source` without running its own code."""
    found = custom_code([source])
    detail = f" ({found[0].split(': ', 1)[1]})" if found else ""
    return UserError(f"{source} needs its own Python code to load its {what}{detail}; nekotune does not run code "
                     f"from model files unless you set model.trust_remote_code=true yourself (command line or "
                     f"your YAML) after reading that code; a run directory's config.yaml cannot turn it on")


def is_needs_code(exc: Exception) -> bool:
    text = str(exc)
    return "trust_remote_code" in text or "contains custom code" in text
