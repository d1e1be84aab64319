"""Value converters: another tool's value -> nekotune's (`torch.float16` -> `fp16`, `all` ->
`all-linear`, a comma list -> a list). Each raises ValueError with the reason; translate adds
the key and the file to it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

SECTIONS = ("model", "data", "lora", "train", "output", "generate")
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
TRACKERS = ("tensorboard", "wandb", "swanlab", "mlflow")


class Note(str):
    """One line for `config show`; `kind` is "alias" (a translated key), "warning" (a key that
    has no effect in nekotune) or "default" (a default of the other tool applied)."""

    kind: str

    def __new__(cls, text: str, kind: str = "alias") -> "Note":
        note = super().__new__(cls, text)
        note.kind = kind
        return note


class _Skip:
    """A converter's answer for "this value means: keep nekotune's default"."""


SKIP = _Skip()
Converter = Callable[[Any], Any]


# -- value converters: each raises ValueError with the reason; translate adds the key ----------
def to_bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in ("1", "true", "yes", "y", "on", "0", "false", "no", "n", "off"):
        return v.strip().lower() in ("1", "true", "yes", "y", "on")
    raise ValueError("expected true or false")


def to_int(v: Any) -> int:
    if isinstance(v, bool):
        raise ValueError("expected a whole number")
    if isinstance(v, float) and v.is_integer():
        return int(v)
    try:
        return int(str(v).strip()) if not isinstance(v, int) else v
    except ValueError:
        raise ValueError("expected a whole number") from None


def to_float(v: Any) -> float:
    if isinstance(v, bool):
        raise ValueError("expected a number")
    try:
        return float(v)
    except (TypeError, ValueError):
        raise ValueError("expected a number") from None


_DTYPES = {"float16": "fp16", "fp16": "fp16", "half": "fp16", "bfloat16": "bf16", "bf16": "bf16",
           "float32": "fp32", "fp32": "fp32", "float": "fp32", "auto": "auto"}


def dtype(v: Any) -> str:
    key = "auto" if v is None else str(v).strip().lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError("use float16/fp16, bfloat16/bf16, float32/fp32 or auto")
    return _DTYPES[key]


def flag_to(value_if_true: Any) -> Converter:
    """`bf16: true` -> model.dtype=bf16; `bf16: false` keeps nekotune's choice (auto)."""
    return lambda v: value_if_true if to_bool(v) else SKIP


def negate(v: Any) -> bool:
    return not to_bool(v)


def only_false(value: Any) -> Converter:
    """`disable_gradient_checkpointing: true` -> false; `false` keeps nekotune's auto choice."""
    return lambda v: value if to_bool(v) else SKIP


def bits(v: Any) -> Any:
    if v in (None, "", 16, "16", 32, "32", "none", "None"):
        return SKIP
    table = {4: "4bit", "4": "4bit", "4bit": "4bit", 8: "8bit", "8": "8bit", "8bit": "8bit"}
    if v not in table:
        raise ValueError("nekotune quantizes to 4 or 8 bits (bitsandbytes, CUDA)")
    return table[v]


def csv_list(v: Any) -> list[str]:
    if isinstance(v, str):
        return [s.strip() for s in v.split(",") if s.strip()]
    if isinstance(v, (list, tuple)):
        return [str(s).strip() for s in v]
    raise ValueError("expected a list or a comma-separated text")


def targets(v: Any) -> Any:
    items = csv_list(v)
    if len(items) == 1 and items[0].lower() in ("all", "all-linear", "all_linear"):
        return "all-linear"
    return items


def scheduler(v: Any) -> str:
    name = str(v).strip().lower()
    if name not in SCHEDULERS:
        raise ValueError(f"nekotune's train.scheduler is one of {', '.join(SCHEDULERS)}")
    return name


def report_to(v: Any) -> list[str]:
    items = [s.lower() for s in csv_list(v if v is not None else "none")]
    if items in ([], ["none"]):
        return ["none"]
    if items == ["all"]:
        return list(TRACKERS)
    bad = [i for i in items if i not in TRACKERS]
    if bad:
        raise ValueError(f"{', '.join(bad)} is not supported; use {', '.join(TRACKERS)} or none")
    return items


def metric(v: Any) -> str:
    name = str(v).strip()
    return name if name.startswith("eval_") else f"eval_{name}"


def percent(v: Any) -> float:
    return to_float(v) / 100


def device(v: Any) -> str:
    if isinstance(v, dict):
        raise ValueError("a device map places layers on several devices; nekotune puts the model on one "
                         "(model.device=auto|cpu|cuda|mps; several GPUs: --nproc)")
    name = str(v).strip().lower()
    if name in ("auto", "cpu", "cuda", "mps"):
        return name
    if name.startswith("cuda:") or name.isdigit():
        return "cuda"  # the GPU index is CUDA_VISIBLE_DEVICES' job
    raise ValueError("use auto, cpu, cuda or mps")


def flash_attn(v: Any) -> Any:
    table = {"auto": SKIP, "disabled": "eager", "sdpa": "sdpa", "fa2": "flash_attention_2",
             "fa3": "flash_attention_3"}
    name = str(v).strip().lower()
    if name not in table:
        raise ValueError("use auto, disabled, sdpa, fa2 or fa3")
    return table[name]


def resume(v: Any) -> Any:
    if v is None or v is False or (isinstance(v, str) and v.strip().lower() in ("", "false", "none", "null")):
        return SKIP
    if v is True or str(v).strip().lower() == "true":
        return True
    raise ValueError("nekotune resumes a run directory, not a checkpoint path: set output.dir to the run "
                     "and train.resume=true")


def revision(v: Any) -> Any:
    return SKIP if v in (None, "", "main", "master") else str(v)


def qlora_format(v: Any) -> str:
    name = str(v).strip().lower()
    if name in ("alpaca", "input-output"):
        return "alpaca"  # nekotune's alpaca reader also takes input/output pairs
    raise ValueError("nekotune reads alpaca and input-output rows; for other layouts map the columns with "
                     "data.columns (or data.format=messages|sharegpt|text)")


def steps(v: Any) -> Any:
    """save_steps / eval_steps: whole steps, or (HF, LF) a float below 1 = a ratio of all steps,
    resolved together with the epochs in `_steps_and_strategies`."""
    number = to_float(v)
    if number <= 0:
        raise ValueError("expected a positive number")
    return to_int(number) if number >= 1 else number


@dataclass(frozen=True)
class Alias:
    target: str  # nekotune's nested key
    convert: Converter | None = None
    kind: str = "value"  # "bool" | "list" | "value": how normalize_argv reads `--flag [values]`


def _a(target: str, convert: Converter | None = None) -> Alias:
    kind = "bool" if convert in (to_bool, negate) or getattr(convert, "__qualname__", "").startswith(
        ("flag_to", "only_false")) else "list" if convert in (csv_list, targets, report_to) else "value"
    return Alias(target, convert, kind)


