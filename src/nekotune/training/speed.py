"""Two speed paths the libraries leave out (measured by `make bench`, checked by tests/test_speed.py).

1. Packed rows attend per example. transformers turns restarting position ids into a block-diagonal
   mask over the whole packed row, so SDPA computes (sum of lengths)^2 scores and throws most away;
   on CPU there is no varlen kernel. `packed_sdpa` runs causal attention on each example instead:
   torch's SDPA, or for short bf16 examples on CPU two grouped matmuls, faster than its kernel there.
   Anything that is not a packed training row (padding masks, generation with a KV cache) goes
   to transformers' own SDPA function unchanged.
2. LoRA's update is added inside the GEMM. peft computes `base + lora_B(lora_A(x)) * scaling`,
   which multiplies and adds full [tokens, out_features] tensors in every adapted layer;
   `torch.addmm(base, u, B.T, alpha=scaling)` does both in the matrix product. Used only where it
   is exactly equivalent: one active adapter, no dropout, no DoRA, not merged.
"""

from __future__ import annotations

import types
from typing import Any

ATTENTION_NAME = "nekotune_packed_sdpa"


def packed_sdpa(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
                scaling: float | None = None, is_causal: bool | None = None, **kwargs: Any) -> tuple[Any, None]:
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids: Any = kwargs.get("position_ids")
    packed = (position_ids is not None and query.shape[0] == 1 and query.shape[2] == key.shape[2]
              and position_ids.shape[-1] == query.shape[2] and dropout == 0.0)
    if not packed:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0] + starts
    bounds = starts + [query.shape[2]]
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    # split, not slicing: the gradient of N slices is N full-size zero tensors added together,
    # the gradient of one split is a single concatenation
    pieces = [causal_attention(q, k, v, scaling)
              for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2))]
    out = torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0]
    return out.transpose(1, 2).contiguous(), None


# Longest example for which the bf16 CPU path uses grouped matmuls instead of the flash kernel: the
# scores it keeps for the backward pass grow with length squared (9 heads x 256^2 x 6 bytes = 3.5 MB
# per layer for SmolLM2), and beyond about 256 tokens the time saved no longer pays for that memory.
MATMUL_ATTENTION_MAX_LEN = 256


def causal_attention(q: Any, k: Any, v: Any, scaling: float | None = None) -> Any:
    """Causal attention of one example, q [1, heads, L, d], k/v [1, kv_heads, L, d]."""
    import torch
    import torch.nn.functional as F

    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.shape[2] <= MATMUL_ATTENTION_MAX_LEN:
        return grouped_matmul_attention(q, k, v, scaling)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=q.shape[1] != k.shape[1])


def grouped_matmul_attention(q: Any, k: Any, v: Any, scaling: float | None = None) -> Any:
    """Causal attention as two batched matmuls per key/value head, each query group stacked along
    the rows (no copies of key/value heads); softmax in fp32. On CPUs with bf16 units torch's flash
    kernel spends most of a training step's attention time in its backward pass; this is 1.6-2.0x
    faster for examples up to 256 tokens (bench/attention.py)."""
    import torch

    _, heads, length, dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    # the causal mask enters as baddbmm's addend, so scaling and masking cost no extra passes
    mask = _causal_bias(length, group, q.dtype, q.device)
    scores = torch.baddbmm(mask, q.reshape(kv_heads, group * length, dim), k[0].transpose(1, 2),
                           alpha=scaling if scaling is not None else dim ** -0.5)
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return torch.bmm(probs, v[0]).view(1, heads, length, dim)


_BIASES: dict = {}


def _causal_bias(length: int, group: int, dtype, device):
    """[group * length, length]: 0 on and below the diagonal, -inf above, once per query group."""
    import torch

    key = (length, group, dtype, str(device))
    bias = _BIASES.get(key)
    if bias is None:
        if len(_BIASES) > 256:  # one entry per example length seen; bounded all the same
            _BIASES.clear()
        future = torch.ones(length, length, dtype=torch.bool, device=device).triu(1)
        bias = torch.zeros(length, length, dtype=dtype, device=device).masked_fill(future, float("-inf"))
        bias = _BIASES[key] = bias.repeat(group, 1)
    return bias


def register_packed_attention() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, packed_sdpa)
    # padded batches still need the mask transformers builds for SDPA
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)
    return ATTENTION_NAME


def use_packed_attention(model: Any) -> bool:
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
    flat = result.reshape(-1, result.shape[-1])
    if torch.is_autocast_enabled(x.device.type):
        # autocast casts the small LoRA weights to bf16 itself; peft's cast of x to the fp32 LoRA
        # dtype would copy every activation to fp32 only for autocast to copy it back
        u = F.linear(x, a)
        fused = torch.addmm(flat, u.reshape(-1, u.shape[-1]), b.t(), alpha=self.scaling[name])
    else:
        u = F.linear(x.to(a.dtype), a)
        fused = torch.addmm(flat, u.reshape(-1, u.shape[-1]).to(flat.dtype), b.t().to(flat.dtype),
                            alpha=self.scaling[name])
    return fused.view(result.shape)


def fuse_lora_adds(model: Any) -> int:
    """Give every plain LoRA Linear the fused forward; returns how many layers were changed."""
    from peft.tuners.lora import Linear as LoraLinear

    count = 0
    for module in model.modules():
        if type(module) is LoraLinear and type(module.base_layer).__name__ == "Linear":
            # an instance patch, applied from trainer.install_speedups only
            module.forward = types.MethodType(_fused_lora_forward, module)  # type: ignore[method-assign]
            count += 1
    return count
