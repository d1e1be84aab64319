"""The one Renderer, extended through the processor for conversations with images.

`VisionRenderer` is nekotune's `Renderer` with one hook overridden: `_tokenize`, which every
piece of text passes through (prompt pieces, answer pieces, the generation prompt). Before a
piece is tokenized, each `<|image_pad|>` the chat template wrote is expanded to the number of
tokens its image becomes (t*h*w / merge^2), image by image in order, which is what the processor
does for `processor(text=..., images=...)`. So the loss mask (assistant text only, never an image
token: images live in user turns), the piece-by-piece BPE boundaries and the generation prompt
are exactly the text Renderer's, and the ids are exactly the processor's.

Token counts come from each image's header (`image_size`) and the image processor's own resize
rule; the pixels are decoded only when a batch is built (`pixel_inputs`), so a dataset of photos
never sits in memory as tensors.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from nekotune.data.formats import Conversation
from nekotune.data.images import DATA_POLICY, ImagePolicy, ImageRef, image_grid, image_size, load_image
from nekotune.data.render import Encoded, Renderer
from nekotune.errors import UserError


@dataclass
class VisionEncoded(Encoded):
    images: list[ImageRef] = field(default_factory=list)
    grids: list[tuple[int, int, int]] = field(default_factory=list)  # image_grid_thw rows, in order
    sizes: list[tuple[int, int]] = field(default_factory=list)  # (height, width) as loaded
    image_token_counts: list[int] = field(default_factory=list)
    where: str = ""
    image_end: int = 0  # tokens up to the end of the last image: a cut before it would split an image


class VisionRenderer(Renderer):
    takes_images = True

    def __init__(self, processor: Any, policy: ImagePolicy = DATA_POLICY, **renderer_kwargs: Any):
        self.processor = processor
        self.image_processor = processor.image_processor
        self.image_token: str = processor.image_token
        self.image_token_id: int = processor.image_token_id
        self.policy = policy
        self.cut_image_rows: list[str] = []  # rows dropped because truncation would cut an image
        # Per-conversation state, set only on the copy `_bound` makes.
        self._counts: list[int] = []
        self._grids: list[tuple[int, int, int]] = []
        self._sizes: list[tuple[int, int]] = []
        self._next = 0
        self._where = ""
        renderer_kwargs.setdefault("chat_template", processor.chat_template)
        super().__init__(processor.tokenizer, **renderer_kwargs)

    @classmethod
    def for_processor(cls, processor: Any, data_cfg: Any, policy: ImagePolicy = DATA_POLICY,
                      chat_template: str | None = None) -> "VisionRenderer":
        return cls(processor, policy, system_prompt=data_cfg.system_prompt, enable_thinking=data_cfg.enable_thinking,
                   max_seq_len=data_cfg.max_seq_len, truncation=data_cfg.truncation,
                   train_on_prompt=data_cfg.train_on_prompt, chat_template=chat_template or processor.chat_template)

    # -- image tokens ---------------------------------------------------------------------
    def measure(self, ref: ImageRef, where: str) -> tuple[tuple[int, int], tuple[int, int, int]]:
        """(height, width) and image_grid_thw of one image, from its header."""
        h, w = image_size(ref, where, self.policy)
        try:
            return (h, w), image_grid(self.image_processor, h, w)
        except ValueError as exc:  # smart_resize: aspect ratio over 200
            raise UserError(f"{where}: image {ref.label} cannot be used ({exc}); crop it") from None

    def _bound(self, images: list[ImageRef], where: str) -> "VisionRenderer":
        """A shallow copy carrying this conversation's image token counts: the Renderer's methods
        run unchanged on it, and concurrent requests (the server) never share the counter.
        `cut_image_rows` stays shared with the original on purpose."""
        bound = copy.copy(self)
        measured = [self.measure(ref, where) for ref in images]
        bound._sizes = [m[0] for m in measured]
        bound._grids = [m[1] for m in measured]
        merge = self.image_processor.merge_size ** 2
        bound._counts = [t * h * w // merge for t, h, w in bound._grids]
        bound._next, bound._where = 0, where
        return bound

    def _tokenize(self, text: str) -> list[int]:
        if self.image_token in text:
            pieces = text.split(self.image_token)
            out = [pieces[0]]
            for rest in pieces[1:]:
                if self._next >= len(self._counts):
                    raise UserError(f"{self._where}: the chat template wrote more image tokens than the row has "
                                    f"images; set model.chat_template to the model's own template")
                out.append(self.image_token * self._counts[self._next] + rest)
                self._next += 1
            text = "".join(out)
        return super()._tokenize(text)

    def _check_consumed(self) -> None:
        if self._next != len(self._counts):
            raise UserError(f"{self._where}: the chat template placed {self._next} of {len(self._counts)} images; "
                            f"it must write one {self.image_token} per image part (model.chat_template)")

    def _fit(self, enc: Encoded) -> Encoded | None:
        # Half an image is an error in the model ("Image features and image tokens do not match"):
        # a row whose cut falls before the end of its last image is dropped, never truncated.
        if len(enc.input_ids) > self.max_seq_len and self._counts:
            last = len(enc.input_ids) - enc.input_ids[::-1].index(self.image_token_id)
            if last > self.max_seq_len:
                self.cut_image_rows.append(self._where)
                return None
        return super()._fit(enc)

    # -- training -------------------------------------------------------------------------
    def encode(self, conv: Conversation) -> VisionEncoded | None:
        images = conv.images
        bound = self._bound(images, conv.where)
        enc = Renderer.encode(bound, conv)
        bound._check_consumed()
        if enc is None:
            return None
        ids = enc.input_ids
        end = len(ids) - ids[::-1].index(self.image_token_id) if images else 0
        return VisionEncoded(ids, enc.labels, enc.truncated, images=list(images), grids=bound._grids,
                             sizes=bound._sizes, image_token_counts=bound._counts, where=conv.where, image_end=end)

    def pixel_inputs(self, images: list[ImageRef], grids: list[tuple[int, int, int]], where: str) -> dict:
        """pixel_values and image_grid_thw of a row's images (decoded now), checked against the
        grids its tokens were counted for."""
        if not images:
            return {}
        loaded = [load_image(ref, where, self.policy) for ref in images]
        out = self.image_processor(images=loaded, return_tensors="pt")
        got = [tuple(int(x) for x in g) for g in out["image_grid_thw"]]
        for ref, expected, actual in zip(images, grids, got, strict=True):
            if expected != actual:
                raise UserError(f"{where}: image {ref.label} changed since its tokens were counted "
                                f"({expected} vs {actual} patches); run again")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    # -- generation -----------------------------------------------------------------------
    def prompt_ids(self, conv: Conversation) -> list[int]:
        images = conv.images
        bound = self._bound(images, conv.where)
        ids = Renderer.prompt_ids(bound, conv)
        bound._check_consumed()
        return ids

    def prompt_inputs(self, conv: Conversation, device: Any = None) -> dict:
        """Everything `model.generate` takes for this prompt: input_ids, attention_mask,
        mm_token_type_ids (never left out: without it generation silently drops M-RoPE) and the
        pixels."""
        import torch

        images = conv.images
        bound = self._bound(images, conv.where)
        ids = torch.tensor([Renderer.prompt_ids(bound, conv)])
        bound._check_consumed()
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                  "mm_token_type_ids": (ids == self.image_token_id).long(),
                  **self.pixel_inputs(list(images), bound._grids, conv.where)}
        return {k: v.to(device) for k, v in inputs.items()} if device is not None else inputs


    def prompt_features(self, conv: Conversation) -> dict:
        bound = self._bound(conv.images, conv.where)
        ids = Renderer.prompt_ids(bound, conv)
        bound._check_consumed()
        return {"input_ids": ids, "labels": ids, **self.pixel_inputs(conv.images, bound._grids, conv.where)}

    def batch_collator(self, pad_id: int) -> Any:
        from nekotune.data.vision_collate import VisionCollator

        return VisionCollator(pad_id, self.image_token_id, side="left")


def image_stats(encoded: list[VisionEncoded]) -> dict:
    """For `data check`: images per row, their sizes and image tokens at the configured bounds."""
    per_row = [len(e.images) for e in encoded]
    tokens = [n for e in encoded for n in e.image_token_counts]
    pixels = [h * w for e in encoded for h, w in e.sizes]
    sizes = [s for e in encoded for s in e.sizes]
    return {
        "rows_with_images": sum(1 for n in per_row if n), "images": sum(per_row),
        "images_per_row_max": max(per_row, default=0),
        "image_tokens": sum(tokens), "image_tokens_max": max(tokens, default=0),
        "image_tokens_mean": round(sum(tokens) / len(tokens), 1) if tokens else 0,
        "smallest": sizes[pixels.index(min(pixels))] if sizes else None,
        "largest": sizes[pixels.index(max(pixels))] if sizes else None,
    }
