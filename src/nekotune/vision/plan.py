"""What `estimate` needs about a VLM, from config.json (and preprocessor_config.json where known):
the vision tower's size and how many tokens an image becomes at the configured pixel bounds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nekotune.errors import UserError
from nekotune.vision.families import family_of


@dataclass
class VisionPlan:
    family: str
    vision_params: int  # vision tower + merger (+ deepstack mergers), exact
    patch_size: int
    merge_size: int
    min_pixels: int
    max_pixels: int
    vision_hidden: int
    vision_intermediate: int
    vision_depth: int

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def tokens(self, height: int, width: int) -> int:
        """Image tokens of one height x width image (the processor's own resize rule)."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        h, w = smart_resize(height, width, factor=self.factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        return (h // self.factor) * (w // self.factor)

    @property
    def max_tokens_per_image(self) -> int:
        """The most tokens any image can become (one filling max_pixels)."""
        return max(1, self.max_pixels // self.factor ** 2)

    def activation_elems(self, images: int, trained: bool) -> float:
        """Vision-tower activations held for a micro-batch with `images` images at max_pixels. A frozen
        tower (lora.vision=false) keeps nothing for backward: only one block's working set is alive.
        A trained one keeps each block's inputs, like the text layers (same per-token tensor count;
        not yet measured for the vision tower: see docs/vision.md)."""
        patches = images * self.max_tokens_per_image * self.merge_size ** 2
        per_block = patches * (10 * self.vision_hidden + 4 * self.vision_intermediate)
        return per_block * (self.vision_depth if trained else 1)


def _pixel_bounds(fam: Any, preprocessor: dict | None) -> tuple[int, int]:
    pre = preprocessor or {}
    size: dict = pre["size"] if isinstance(pre.get("size"), dict) else {}
    low = pre.get("min_pixels") or size.get("shortest_edge") or fam.default_min_pixels
    high = pre.get("max_pixels") or size.get("longest_edge") or fam.default_max_pixels
    return int(low), int(high)


def count_vision_params(config: dict) -> int:
    """Parameters under the model's `visual` module, counted on a weightless (meta) model."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForImageTextToText

    kwargs = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "transformers_version")}
    try:
        cfg = AutoConfig.for_model(config["model_type"], **kwargs)
        with init_empty_weights():
            model = AutoModelForImageTextToText.from_config(cfg)
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"config.json: cannot build the vision tower from it ({str(exc).splitlines()[0][:160]})") \
            from None
    return sum(p.numel() for name, p in model.named_parameters() if ".visual." in f".{name}")


def vision_plan(config: dict, preprocessor: dict | None = None, min_pixels: int | None = None,
                max_pixels: int | None = None) -> VisionPlan | None:
    """None for a text model. `min_pixels`/`max_pixels`: data.image_min_pixels/image_max_pixels."""
    fam = family_of(config)
    if fam is None:
        return None
    vision = config.get("vision_config") or {}
    low, high = _pixel_bounds(fam, preprocessor)
    low, high = min_pixels or low, max_pixels or high
    if low > high:
        raise UserError(f"data.image_min_pixels={low} is above data.image_max_pixels={high}")
    hidden = int(vision.get("embed_dim") or vision.get("hidden_size") or 0)  # Qwen2-VL: embed_dim is the width
    mlp = vision.get("intermediate_size") or hidden * int(vision.get("mlp_ratio") or 4)
    return VisionPlan(fam.model_type, count_vision_params(config), int(vision.get("patch_size") or 14),
                      int(vision.get("spatial_merge_size") or 2), low, high, hidden, int(mlp),
                      int(vision.get("depth") or 0))
