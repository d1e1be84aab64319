"""GGUF metadata beside the weights: hyperparameters, rotary scaling and the tokenizer.

llama.cpp needs the tokenizer as a "gpt2" BPE vocabulary with merges and a pre-tokenizer name (it
knows a pre-tokenizer by the hash of a reference text's token ids: its convert_hf_to_gguf
convention), the chat template nekotune trained with, so llama.cpp renders the same prompt as
transformers, and the special token ids including end-of-turn, with whether BOS is added.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from hashlib import sha256
from typing import Any

from nekotune.errors import UserError

log = logging.getLogger(__name__)

# Pre-tokenizers llama.cpp recognises, by the hash of CHKTXT's token ids (convert_hf_to_gguf's scheme).
CHKTXT = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
          "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
          "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
          "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE "
          "you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")
PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5/2/2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo and later
}
# A fine-tune with a changed vocabulary has a new hash but the same split rules: recognise the regex.
PRE_TOKENIZER_REGEX = {r"\p{N}{1,3}": "llama-bpe", r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*": "qwen2"}



def llama3_rope_factors(rope: dict, head_dim: int, theta: float) -> Any:
    """Llama 3.1+ long-context rotary frequencies, as llama.cpp's rope_freqs tensor."""
    import numpy as np

    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    factors = np.where(wavelen < old_ctx / high, 1.0,
                       np.where(wavelen > old_ctx / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
    return factors.astype(np.float32)


# -- metadata --------------------------------------------------------------------------------
def rope_parameters(config: dict) -> dict:
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def add_hparams(writer: Any, config: dict, n_vocab: int) -> dict:
    import gguf

    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope = rope_parameters(config)
    writer.add_context_length(config.get("max_position_embeddings", 4096))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(n_vocab)
    kind = rope["rope_type"]
    if kind in ("linear", "yarn"):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR if kind == "linear" else gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        if kind == "yarn":
            writer.add_rope_scaling_orig_ctx_len(int(rope.get("original_max_position_embeddings",
                                                                config.get("max_position_embeddings", 4096))))
    elif kind not in ("default", "llama3"):
        raise UserError(f"config.json: rope type {kind} is not supported by the GGUF export "
                        f"(supported: default, linear, yarn, llama3)")
    return {"head_dim": head_dim, "rope": rope}


def pre_tokenizer(tokenizer: Any, backend: dict) -> str:
    digest = sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()
    if digest in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[digest]
    pattern = str(backend.get("pre_tokenizer"))
    for needle, name in PRE_TOKENIZER_REGEX.items():
        if needle.replace("\\", "\\\\") in pattern:
            return name
    log.warning("warning: llama.cpp knows no pre-tokenizer for this tokenizer (hash %s); writing 'default'. "
                "Check tokenization with `nekotune export verify`.", digest[:12])
    return "default"


def looks_special(text: str) -> bool:
    return (text.startswith("<|") and text.endswith("|>")) or (text.startswith("<｜") and text.endswith("｜>"))


def bpe_vocab(tokenizer: Any, n_vocab: int) -> tuple[list[str], list[Any]]:
    import gguf

    T = gguf.TokenType
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    if reverse and max(reverse) >= n_vocab:
        raise UserError(f"the tokenizer has {max(reverse) + 1} tokens but the embedding only {n_vocab} rows; "
                        f"resize the model's embeddings (or use the tokenizer it was trained with)")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(T.CONTROL if added[i].special or looks_special(reverse[i]) else T.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(T.NORMAL)
    return tokens, types


def add_tokenizer(writer: Any, tokenizer: Any, renderer: Any, n_vocab: int) -> None:
    import gguf

    backend = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else {}
    model = backend.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = "SentencePiece-style (byte fallback)" if model.get("byte_fallback") else model.get("type", "slow")
        raise UserError(f"the tokenizer is {kind}; the GGUF export writes byte-level BPE tokenizers "
                        f"(SmolLM2, Llama 3, Qwen, Mistral Nemo); convert this model with llama.cpp's "
                        f"convert_hf_to_gguf.py")
    tokens, types = bpe_vocab(tokenizer, n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer(tokenizer, backend))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as tmp:  # SpecialVocab reads merges from a saved tokenizer
        tokenizer.save_pretrained(tmp)
        special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=n_vocab)
    special.special_token_ids.update(special_token_ids(tokenizer, renderer))
    special.add_special_token = adds_special_tokens(tokenizer)
    special.chat_template = renderer.template
    special.add_to_gguf(writer, quiet=True)


def special_token_ids(tokenizer: Any, renderer: Any) -> dict[str, int]:
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id,
           "pad": tokenizer.pad_token_id}
    eot = tokenizer.convert_tokens_to_ids(renderer.eot_text) if renderer.eot_text else None
    if isinstance(eot, int) and eot != tokenizer.unk_token_id:
        ids["eot"] = eot
    return {k: v for k, v in ids.items() if isinstance(v, int)}


def adds_special_tokens(tokenizer: Any) -> dict[str, bool]:
    """What the HF tokenizer adds on its own, measured rather than read from configs that may lie."""
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return {"bos": bos is not None and len(ids) > len(plain) and ids[0] == bos,
            "eos": eos is not None and len(ids) > len(plain) and ids[-1] == eos}
