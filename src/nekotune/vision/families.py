"""The vision-language families nekotune supports: one table of plain data.

Phase B folds `FAMILIES` into the architectures registry; until then this is the one place that
knows a family's processor class, its vision-tower module names and how its checkpoint names its
tensors. No heavy imports here: config validation and `estimate` read it.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from nekotune.errors import UserError

# The language model's projections; the same names in all three families.
LM_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class VisionFamily:
    model_type: str
    architecture: str  # the transformers class AutoModelForImageTextToText loads
    processor_class: str
    vision_linear: tuple[str, ...]  # linear layers of the vision tower and merger (module-name suffixes)
    # In-memory prefix -> prefix in the checkpoint file, where transformers 5 saves the hub layout.
    checkpoint_renames: tuple[tuple[str, str], ...] = ()
    # The processor's pixel bounds when no preprocessor_config.json is at hand (estimate from a bare
    # config.json); a checkpoint's own file always wins.
    default_min_pixels: int = 56 * 56
    default_max_pixels: int = 28 * 28 * 16384


_QWEN2_RENAMES = (("model.language_model.", "model."), ("model.visual.", "visual."))

FAMILIES: dict[str, VisionFamily] = {
    "qwen2_vl": VisionFamily(
        "qwen2_vl", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor",
        ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "merger.mlp.0", "merger.mlp.2"),
        checkpoint_renames=_QWEN2_RENAMES, default_min_pixels=3136, default_max_pixels=12845056),
    # Qwen2.5-VL's vision MLP is named like the language model's (gate/up/down_proj): a plain suffix
    # list would adapt the vision tower too, which is why the default target is a regex.
    "qwen2_5_vl": VisionFamily(
        "qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor",
        ("attn.qkv", "attn.proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "merger.mlp.0", "merger.mlp.2"),
        checkpoint_renames=_QWEN2_RENAMES, default_min_pixels=3136, default_max_pixels=12845056),
    "qwen3_vl": VisionFamily(
        "qwen3_vl", "Qwen3VLForConditionalGeneration", "Qwen3VLProcessor",
        ("attn.qkv", "attn.proj", "mlp.linear_fc1", "mlp.linear_fc2", "merger.linear_fc1", "merger.linear_fc2"),
        default_min_pixels=65536, default_max_pixels=16777216),
}
_BY_ARCHITECTURE = {f.architecture: f for f in FAMILIES.values()}


def _as_dict(config: Any) -> Mapping[str, Any]:
    return config.to_dict() if hasattr(config, "to_dict") else (config or {})


def is_vlm(config: Any) -> bool:
    """True for a vision-language config (config.json as a dict, or a transformers config): one of
    ours by model_type or architectures, or any config with a vision tower."""
    cfg = _as_dict(config)
    archs = cfg.get("architectures") or []
    return (cfg.get("model_type") in FAMILIES or any(a in _BY_ARCHITECTURE for a in archs)
            or isinstance(cfg.get("vision_config"), Mapping))


def family_of(config: Any) -> VisionFamily | None:
    """The supported family of a config, None for a text model; a UserError for a vision-language
    model of another family (its processor and module layout are not known here)."""
    cfg = _as_dict(config)
    found = FAMILIES.get(cfg.get("model_type") or "")
    for arch in cfg.get("architectures") or []:
        found = found or _BY_ARCHITECTURE.get(arch)
    if found is None and is_vlm(cfg):
        kind = cfg.get("model_type") or ", ".join(cfg.get("architectures") or []) or "unknown"
        raise UserError(f"vision-language model type {kind} is not supported yet; supported: "
                        f"{', '.join(FAMILIES)} (docs/vision.md)")
    return found


def lora_targets(config: Any, targets: str | list[str] = "all-linear", vision: bool = False) -> str | list[str]:
    """peft `target_modules` for a VLM. Default: the language model's linear layers only, as one
    regex (peft fullmatches a string against each module name; it is saved verbatim in
    adapter_config.json). `vision=True` (lora.vision): all linear layers, vision tower and merger
    included, or the user's own list unchanged."""
    if family_of(config) is None:
        return targets
    if vision:
        return targets
    names = LM_PROJECTIONS if targets == "all-linear" else targets
    if isinstance(names, str):
        names = [t.strip() for t in names.split(",") if t.strip()]
    return r".*language_model\..*\.(" + "|".join(re.escape(n) for n in names) + ")"


def checkpoint_name(config: Any, name: str, available: Collection[str]) -> str | None:
    """The checkpoint-file name of an in-memory tensor name, for the low-memory merge: itself when
    the file has it, else the family's hub-layout rename; None when neither is in the file."""
    if name in available:
        return name
    fam = family_of(config)
    for memory, disk in fam.checkpoint_renames if fam else ():
        if name.startswith(memory) and disk + name[len(memory):] in available:
            return disk + name[len(memory):]
    return None


def gguf_refusal(config: Any) -> UserError:
    kind = _as_dict(config).get("model_type", "this model")
    return UserError(f"GGUF export of vision-language models ({kind}) is not supported yet: the vision projector "
                     f"(llama.cpp's mmproj file) is not exported; serve the merged model with `nekotune serve`")
