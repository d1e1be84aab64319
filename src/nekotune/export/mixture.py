"""Which GGML type each tensor gets in a K-quant file: llama.cpp's mixture rules.

A Q4_K_M file is not all Q4_K: llama.cpp (llama-quant.cpp, llama_tensor_get_type) gives the
tensors quantization hurts most more bits - the output matrix Q6_K, attention V and FFN down
Q6_K in the first and last eighth of the layers and every third layer between - and falls back
to a 32-block type when a row is not a multiple of 256 (SmolLM2's hidden size 576 sends most of
its matrices there). Files that follow the same rules load and behave like llama.cpp's own,
so the rules are reproduced here for the dense architectures nekotune exports (llama, mistral,
qwen2, qwen3); the branches for MoE, Falcon and the IQ types are left out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from nekotune.registry import GGUF_TYPES

# A 256-block type on a row that is not a multiple of 256 (tensor_type_fallback).
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


@dataclass(frozen=True)
class ModelShape:
    """What the rules read from the model: layer count, heads per KV head, whether the output
    matrix is tied to the embeddings (then token_embd is quantized as the output), and whether
    llama.cpp would call it a 70B (an 80-layer Llama with grouped KV heads)."""

    n_layer: int
    n_gqa: int
    tied: bool
    is_70b: bool = False

    @classmethod
    def from_config(cls, config: dict, arch: str, has_output: bool) -> ModelShape:
        heads = config["num_attention_heads"]
        kv = config.get("num_key_value_heads") or heads
        n_layer = config["num_hidden_layers"]
        return cls(n_layer, heads // kv, not has_output, arch == "llama" and n_layer == 80 and kv != heads)


def use_more_bits(i_layer: int, n_layer: int) -> bool:
    """The first and last eighth of the layers, and every third layer in between."""
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


def category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    for part in ("attn_qkv.weight", "attn_v.weight", "attn_k.weight", "attn_q.weight", "attn_output.weight"):
        if part in name:
            return part.removesuffix(".weight")
    for part in ("ffn_up", "ffn_gate", "ffn_down"):
        if part in name:
            return part
    return "other"


def _layer(name: str) -> int:
    match = re.match(r"blk\.(\d+)\.", name)
    return int(match.group(1)) if match else 0


def mixture_type(name: str, type_name: str, model: ModelShape, n_cols: int) -> str:
    """The type llama.cpp's rules choose for a 2-D weight, before the row-size fallback."""
    default = GGUF_TYPES[type_name].tensor_type
    cat = category(name)
    if cat == "output" or (cat == "token_embd" and model.tied):
        return "Q8_0" if n_cols % 256 else "Q6_K"
    i, n = _layer(name), model.n_layer
    # attention V: llama.cpp counts attn_v tensors in layer order, i.e. the layer index here
    rules = {
        ("attn_v", "q2_k"): "Q4_K" if model.n_gqa >= 4 else "Q3_K",
        ("attn_v", "q3_k_m"): "Q5_K" if i < 2 else "Q4_K",
        ("attn_v", "q4_k_m"): "Q6_K" if use_more_bits(i, n) else default,
        ("attn_v", "q5_k_m"): "Q6_K" if use_more_bits(i, n) else default,
        ("attn_v", "q4_k_s"): "Q5_K" if i < 4 else default,
        ("ffn_down", "q2_k"): "Q3_K",
        ("ffn_down", "q3_k_m"): "Q5_K" if i < n // 16 else "Q4_K",
        ("ffn_down", "q4_k_m"): "Q6_K" if use_more_bits(i, n) else default,
        ("ffn_down", "q5_k_m"): "Q6_K" if use_more_bits(i, n) else default,
        ("ffn_down", "q4_k_s"): "Q5_K" if i < n // 8 else default,
        ("attn_output", "q2_k"): "Q3_K",
        ("attn_output", "q3_k_m"): "Q4_K",
        ("attn_qkv", "q3_k_m"): "Q4_K",
        ("attn_qkv", "q4_k_m"): "Q5_K",
        ("attn_qkv", "q5_k_m"): "Q6_K",
    }
    chosen = rules.get((cat, type_name), default)
    if cat in ("attn_v", "attn_qkv") and model.is_70b and chosen in ("Q3_K", "Q4_K"):
        chosen = "Q5_K"  # 8 query heads share each V there: more bits cost little
    return chosen


def fallback(qtype_name: str, n_cols: int) -> str:
    """A type whose blocks fit the row: 256-block K types drop to a 32-block type, then F16."""
    if qtype_name in FALLBACK and n_cols % 256:
        qtype_name = FALLBACK[qtype_name]
    if qtype_name not in ("F32", "F16", "BF16") and n_cols % 32:
        return "F16"
    return qtype_name


def k_tensor_type(name: str, shape: tuple, type_name: str, model: ModelShape):
    """The gguf.GGMLQuantizationType of one tensor (shape in HF order, rows first) in a K file."""
    from gguf import GGMLQuantizationType as Q

    if len(shape) < 2 or not name.endswith("weight") or "_norm.weight" in name:
        return Q.F32  # norms, biases, rope factors: llama.cpp keeps them as converted (f32 here)
    n_cols = shape[-1]
    return Q[fallback(mixture_type(name, type_name, model, n_cols), n_cols)]
