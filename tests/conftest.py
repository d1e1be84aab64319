"""Fixtures: tiny random models of real architectures, built from a config (no downloads).

The tokenizer is SmolLM2's (from the embedded GGUF, converted once and cached); the Qwen3-
and Llama-3-style variants add those families' special tokens and a chat template written for
these tests that behaves like theirs (Qwen3's empty think block, Llama 3's <|eot_id|>).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

QWEN3_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}{{ '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'user' %}{{ '<|im_start|>user\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- elif m.role == 'assistant' %}"
    "{%- if loop.index0 > ns.last_user %}{{ '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- else %}{{ '<|im_start|>assistant\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for m in messages %}"
    "{{ '<|start_header_id|>' + m.role + '<|end_header_id|>\\n\\n' + m.content | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def _cache_env():
    os.environ.setdefault("NEKOTUNE_CACHE", str(Path.home() / ".cache" / "nekotune"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


_cache_env()


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    """The embedded SmolLM2 converted to an HF directory (cached across runs)."""
    from nekotune.model import embedded_gguf, gguf_to_hf_dir

    return gguf_to_hf_dir(embedded_gguf())


@pytest.fixture(scope="session")
def smol_tokenizer(smol_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_dir)


def _tokenizer_variant(smol_dir: Path, family: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_dir)
    if family == "qwen3":
        tok.add_tokens(["<think>", "</think>"], special_tokens=False)
        tok.chat_template = QWEN3_TEMPLATE
    elif family == "llama3":
        tok.add_special_tokens({"bos_token": "<|begin_of_text|>",
                                "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
        tok.chat_template = LLAMA3_TEMPLATE
    return tok


def build_tiny(arch: str, tokenizer, path: Path, seed: int = 0, init_std: float = 0.02) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, initializer_range=init_std)
    if arch == "llama":
        cfg = LlamaConfig(tie_word_embeddings=True, **common)
    elif arch == "qwen3":
        cfg = Qwen3Config(head_dim=16, tie_word_embeddings=True, **common)
    elif arch == "qwen2":
        cfg = Qwen2Config(tie_word_embeddings=False, **common)
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(smol_dir, tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    return build_tiny("llama", AutoTokenizer.from_pretrained(smol_dir), tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_qwen3(smol_dir, tmp_path_factory) -> Path:
    return build_tiny("qwen3", _tokenizer_variant(smol_dir, "qwen3"), tmp_path_factory.mktemp("tiny-qwen3"))


@pytest.fixture(scope="session")
def tiny_qwen2(smol_dir, tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    return build_tiny("qwen2", AutoTokenizer.from_pretrained(smol_dir), tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="session")
def qwen3_tokenizer(smol_dir):
    return _tokenizer_variant(smol_dir, "qwen3")


@pytest.fixture(scope="session")
def llama3_tokenizer(smol_dir):
    return _tokenizer_variant(smol_dir, "llama3")


@pytest.fixture
def qa_file(tmp_path) -> Path:
    rows = [{"instruction": f"Question number {i}?", "output": f"(purrs) Answer {i}, nya~"} for i in range(24)]
    path = tmp_path / "qa.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def tiny_overrides(model_dir: Path, data: Path, out: Path, **extra) -> list[str]:
    base = {"model.name_or_path": str(model_dir), "data.path": str(data), "output.dir": str(out),
            "data.max_seq_len": 128, "train.batch_size": 4, "train.max_steps": 6, "train.lr": 5e-3,
            "train.logging_steps": 1, "lora.r": 4, "lora.alpha": 8, "output.sample_prompts": "null",
            "output.tensorboard": "false", "train.save_steps": 3}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def shared(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} not available (../shared is absent)")
    return path
