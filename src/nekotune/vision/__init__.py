"""Vision-language models (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): images in the data, the processor,
rendering with image tokens, collation, the multimodal loss and LoRA targets.

Light to import: the heavy libraries (torch, transformers, PIL) are imported inside functions, so
config validation and `estimate` can read `families` without loading them.
"""

from nekotune.vision.families import FAMILIES, VisionFamily, family_of, is_vlm, lora_targets

__all__ = ["FAMILIES", "VisionFamily", "family_of", "is_vlm", "lora_targets"]
