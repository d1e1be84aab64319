"""The command line: `--key value` forms of config keys and aliases -> `key=value`, and hints
for unknown keys."""

from __future__ import annotations

import difflib
import re
from typing import Iterable

from nekotune import llamafactory as lf
from nekotune.aliases.tables import ALIASES, SAME_NAME, known_names


# -- hints for unknown keys ------------------------------------------------------------------------
def suggest(key: str, config_keys: Iterable[str]) -> str | None:
    """The right key for a misspelt or foreign one: `lr` -> train.lr, `learnig_rate` ->
    learning_rate (train.lr), `val_splt` -> val_split (data.val_size). None when nothing is close."""
    keys = list(config_keys)
    tail = key.split(".")[-1]
    same_tail = [k for k in keys if k.split(".")[-1] == tail]
    if same_tail:
        return same_tail[0]
    names = {**{n: a.target for n, a in ALIASES.items()}, **SAME_NAME}
    close = difflib.get_close_matches(tail, list(names), n=1, cutoff=0.8)
    if close:
        return f"{close[0]}` (= `{names[close[0]]}"
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if close:
        return close[0]
    tails = difflib.get_close_matches(tail, [k.split(".")[-1] for k in keys], n=1, cutoff=0.6)
    return next((k for k in keys if tails and k.split(".")[-1] == tails[0]), None)


# -- the command line --------------------------------------------------------------------------
_OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*=")
_BOOL_WORDS = {"true", "false", "yes", "no", "1", "0", "on", "off"}
# Every option of nekotune's own parser (cli.build_parser; tests/test_aliases.py keeps it in step).
RESERVED = {"-h", "--help", "--version", "--no-progress", "--progress", "--no-samples", "--nproc", "--model", "-m",
            "--system", "--json", "--out", "--limit", "--baseline", "--no-generate", "--models", "--prompts",
            "--eval-file", "--low-memory", "--dtype", "--type", "--adapter", "--host", "--port", "--allow-host",
            "--api-key", "--max-concurrency", "--max-tokens-cap", "--max-queue", "--max-body", "--cors", "--auth",
            "--fit", "--engine", "--image", "--imatrix", "--reference", "--allow-remote-images", "--names"}


def _kind(name: str, config_keys: set[str]) -> str | None:
    if name in ALIASES:
        return ALIASES[name].kind
    if name in lf.LIST_KEYS or name in ("dataset", "eval_dataset"):
        return "list"
    if name in known_names() or name in config_keys or name == "preset":
        return "value"
    return None


def normalize_argv(argv: list[str], config_keys: Iterable[str] = (),
                   reserved: Iterable[str] = RESERVED) -> list[str]:
    """`--key value`, `--key=value`, a bare `--flag` (true) and `--key a b` (lists, as TRL writes
    them) -> `key=value`, for config keys (`--train.lr 1e-4`) and the names this module knows.
    Everything else, nekotune's own options first, is left for argparse."""
    keys, own = set(config_keys), set(reserved)
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        flag = token.split("=", 1)[0]
        name = flag[2:].replace("-", "_") if flag.startswith("--") and flag not in own else ""
        kind = _kind(name, keys) if name else None
        if kind is None:
            out.append(token)
            i += 1
            continue
        if "=" in token:
            out.append(f"{name}={token.split('=', 1)[1]}")
            i += 1
            continue
        values: list[str] = []
        i += 1
        while i < len(argv) and _is_value(argv[i], kind, values, keys):
            values.append(argv[i])
            i += 1
        out.append(f"{name}={','.join(values) if values else 'true'}")
    return out


def _is_override(token: str, config_keys: set[str]) -> bool:
    """`lora.r=4`, `preset=8gb`, `learning_rate=1e-4`; not a value such as `a=b` in a prompt."""
    if not _OVERRIDE.match(token):
        return False
    key = token.split("=", 1)[0]
    return "." in key or key == "preset" or key in known_names() or key in config_keys


def _is_value(token: str, kind: str, taken: list[str], config_keys: set[str]) -> bool:
    """Whether `token` is (part of) the value of the flag before it. A value is never an option
    (`-1` is a value, `--x` is not) nor a `key=value` override; lists take several values but
    never the config file; a bool flag takes only a true/false word."""
    if (token.startswith("--") and len(token) > 2) or token in ("-m", "-h") or _is_override(token, config_keys):
        return False
    if kind == "bool":
        return not taken and token.lower() in _BOOL_WORDS
    if kind == "list":
        return not token.lower().endswith((".yaml", ".yml"))
    return not taken
