"""The fast chunked loss for vision-language models.

The text fast loss runs `get_decoder()`, which on a VLM is the *text* model: it never sees
`pixel_values`, so image A and image B give the same loss, silently. For a VLM the forward must
run the multimodal backbone `self.model` (vision tower, feature merge at the image tokens,
M-RoPE, deepstack, language model) and only then the chunked loss over trained positions, which
still never builds the full logits tensor.
"""

from __future__ import annotations

import functools
import types
from typing import Any


def vlm_fast_forward(self: Any, input_ids: Any = None, attention_mask: Any = None, position_ids: Any = None,
                     labels: Any = None, inputs_embeds: Any = None, **kwargs: Any) -> Any:
    """Installed as the forward of a *ForConditionalGeneration (see install_vlm_fast_loss).
    kwargs: pixel_values, image_grid_thw, mm_token_type_ids (and what generate passes)."""
    if labels is None:  # generation and plain calls keep the model's own forward
        return type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask,
                                  position_ids=position_ids, inputs_embeds=inputs_embeds, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from nekotune.training.loss import chunked_trained_loss

    kwargs.pop("use_cache", None)
    kwargs.pop("num_items_in_batch", None)
    hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        inputs_embeds=inputs_embeds, use_cache=False, **kwargs).last_hidden_state
    loss = chunked_trained_loss(hidden, self.get_output_embeddings().weight, labels)
    return CausalLMOutputWithPast(loss=loss, logits=None)


def install_vlm_fast_loss(model: Any) -> bool:
    """Route `model(..., labels=...)` of a VLM through the multimodal chunked loss. Marks the model
    as the text `install_fast_loss` does, so that one then leaves it alone."""
    from nekotune.training.loss import causal_lm, supports_fast_loss

    if not supports_fast_loss(model):
        return False
    base = causal_lm(model)
    if not hasattr(base, "model") or not hasattr(base.model, "get_rope_index"):
        return False  # not a Qwen-VL-style model: keep its own forward and loss
    if getattr(base, "_nekotune_fast_loss", None) != "vlm":
        # generate() validates its kwargs (pixel_values, image_grid_thw, mm_token_type_ids) against
        # inspect.signature(model.forward): keep the model's own signature visible (__wrapped__).
        @functools.wraps(type(base).forward)
        def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
            return vlm_fast_forward(self, *args, **kwargs)

        base.forward = types.MethodType(forward, base)
        base._nekotune_fast_loss = "vlm"  # truthy: the text installer's "already installed" test
    return True


def rope_index_of(model: Any) -> Any:
    """The model's M-RoPE position function, for packing image rows (collate.VisionCollator)."""
    from nekotune.training.loss import causal_lm

    return causal_lm(model).model.get_rope_index
