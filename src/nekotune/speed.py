"""Two speed paths the libraries leave out (measured by `make bench`, checked by tests/test_speed.py).

1. Packed rows attend per example. transformers turns restarting position ids into a block-diagonal
   mask over the whole packed row, so SDPA computes (sum of lengths)^2 scores and throws most away;
   on CPU there is no varlen kernel. `packed_sdpa` runs causal SDPA on each example's slice instead.
   Anything that is not a packed training row (padding masks, generation with a KV cache) goes
   to transformers' own SDPA function unchanged.
2. LoRA's update is added inside the GEMM. peft computes `base + lora_B(lora_A(x)) * scaling`,
   which multiplies and adds full [tokens, out_features] tensors in every adapted layer;
   `torch.addmm(base, u, B.T, alpha=scaling)` does both in the matrix product. Used only where it
   is exactly equivalent: one active adapter, no dropout, no DoRA, not merged.
"""

from __future__ import annotations

import types

ATTENTION_NAME = "nekotune_packed_sdpa"


def packed_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    import torch
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    packed = (position_ids is not None and query.shape[0] == 1 and query.shape[2] == key.shape[2]
              and position_ids.shape[-1] == query.shape[2] and dropout == 0.0)
    if not packed:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0] + starts
    bounds = starts + [query.shape[2]]
    gqa = query.shape[1] != key.shape[1]  # grouped-query attention without copying key/value heads
    pieces = [F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True,
                                             scale=scaling, enable_gqa=gqa)
              for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    out = torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0]
    return out.transpose(1, 2).contiguous(), None


def register_packed_attention() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, packed_sdpa)
    # padded batches still need the mask transformers builds for SDPA
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)
    return ATTENTION_NAME


def use_packed_attention(model) -> bool:
    """Switch a model that runs SDPA to the per-example version (no-op for flash attention)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "_attn_implementation", None) != "sdpa":
        return False
    name = register_packed_attention()
    try:
        base.set_attn_implementation(name)
    except (ValueError, AttributeError, TypeError):
        return False
    return True


# -- fused LoRA add --------------------------------------------------------------------------
def _fused_lora_forward(self, x, *args, **kwargs):
    import torch
    import torch.nn.functional as F

    active = self.active_adapters
    if (args or kwargs or self.disable_adapters or self.merged or len(active) != 1
            or active[0] not in self.lora_A or self.use_dora.get(active[0], False)):
        return type(self).forward(self, x, *args, **kwargs)
    name = active[0]
    if not isinstance(self.lora_dropout[name], torch.nn.Identity):
        return type(self).forward(self, x, *args, **kwargs)
    base = self.base_layer
    a, b = self.lora_A[name].weight, self.lora_B[name].weight
    result = base(x)
    u = F.linear(x.to(a.dtype), a)
    flat = result.reshape(-1, result.shape[-1])
    fused = torch.addmm(flat, u.reshape(-1, u.shape[-1]).to(flat.dtype), b.t().to(flat.dtype),
                        alpha=self.scaling[name])
    return fused.view(result.shape)


def fuse_lora_adds(model) -> int:
    """Give every plain LoRA Linear the fused forward; returns how many layers were changed."""
    from peft.tuners.lora import Linear as LoraLinear

    count = 0
    for module in model.modules():
        if type(module) is LoraLinear and type(module.base_layer).__name__ == "Linear":
            module.forward = types.MethodType(_fused_lora_forward, module)
            count += 1
    return count
