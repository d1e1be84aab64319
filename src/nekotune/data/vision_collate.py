"""Batches of image rows.

Padded batches: right padding as for text, plus `mm_token_type_ids` (1 on image tokens), always:
without it Qwen2-VL/Qwen3-VL refuse a training forward, and Qwen2.5-VL and every `generate()`
silently fall back to 1-D positions. `pixel_values` and `image_grid_thw` are concatenated in row
order, which is the order the model assigns image features to image tokens; text-only rows mix in.

Packing (padding-free, `data.packing`) stays available for image rows, because the one thing that
breaks it is solvable: M-RoPE positions. The text collator's 2-D position ids would turn M-RoPE
off without an error. Here each example gets its own (t, h, w) positions from the model's
`get_rope_index`, with a plain text-position row on top (4 rows: the text model reads row 0 to
find the example boundaries). Measured identical to the padded loss on all three families.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import Dataset

from nekotune.data.collate import flatten_batch, pad_batch
from nekotune.data.vision_render import VisionEncoded, VisionRenderer

RopeIndex = Callable[..., tuple[torch.Tensor, torch.Tensor]]


class VisionDataset(Dataset):
    """Encoded rows; the pixels are decoded when the row is fetched (in the DataLoader's workers
    where there are any), never all at once."""

    def __init__(self, items: list[VisionEncoded], renderer: VisionRenderer):
        self.items = items
        self.renderer = renderer

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        e = self.items[i]
        return {"input_ids": e.input_ids, "labels": e.labels,
                **self.renderer.pixel_inputs(e.images, e.grids, e.where)}


def _vision(features: list[dict]) -> dict[str, torch.Tensor]:
    with_images = [f for f in features if f.get("pixel_values") is not None]
    if not with_images:
        return {}
    return {"pixel_values": torch.cat([f["pixel_values"] for f in with_images]),
            "image_grid_thw": torch.cat([f["image_grid_thw"] for f in with_images])}


def packed_positions(ids: list[int], grid: torch.Tensor | None, image_token_id: int,
                     rope_index: RopeIndex) -> torch.Tensor:
    """(4, 1, n) position ids of one example: text positions, then M-RoPE's t/h/w rows."""
    x = torch.tensor([ids])
    text = torch.arange(len(ids)).view(1, 1, -1)
    if grid is None:  # text only: M-RoPE's three rows are the text positions
        return text.expand(4, 1, -1)
    mrope, _ = rope_index(x, mm_token_type_ids=(x == image_token_id).long(), image_grid_thw=grid)
    return torch.cat([text, mrope.to(text.dtype)], dim=0)


class VisionCollator:
    """`packing=True` needs `rope_index` (the model's `get_rope_index`, see loss.rope_index_of);
    `side="left"` pads for generation."""

    def __init__(self, pad_id: int, image_token_id: int, packing: bool = False,
                 rope_index: RopeIndex | None = None, side: str = "right"):
        if packing and rope_index is None:
            raise ValueError("packing image rows needs the model's get_rope_index")
        self.pad_id, self.image_token_id = pad_id, image_token_id
        self.packing, self.rope_index, self.side = packing, rope_index, side

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        text = [{"input_ids": list(f["input_ids"]), "labels": list(f["labels"])} for f in features]
        if self.packing:
            return self._packed(features, text)
        batch = pad_batch(text, self.pad_id, side=self.side)
        batch["mm_token_type_ids"] = (batch["input_ids"] == self.image_token_id).long() * batch["attention_mask"]
        return {**batch, **_vision(features)}

    def _packed(self, features: list[dict], text: list[dict]) -> dict[str, torch.Tensor]:
        assert self.rope_index is not None
        batch = flatten_batch(text)
        batch["position_ids"] = torch.cat([packed_positions(t["input_ids"], f.get("image_grid_thw"),
                                                            self.image_token_id, self.rope_index)
                                           for t, f in zip(text, features, strict=True)], dim=2)
        batch["mm_token_type_ids"] = (batch["input_ids"] == self.image_token_id).long()
        return {**batch, **_vision(features)}
