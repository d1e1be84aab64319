"""Fixtures for the engine, LoRA GGUF and vLLM tests (issue 19).

The tiny models of conftest start with weights of std 0.02, whose greedy answers are mostly
empty; these are built with std 0.1 so that answers run to the token limit and a difference
between engines shows. Adapters are random PEFT LoRAs (non-zero B) saved like trained ones.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from conftest import build_tiny

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed")
QUESTIONS = ["What is the capital of France?", "Write a haiku about cats.", "hi", "List three prime numbers.",
             "Who wrote Hamlet?", "What is 12 times 7?"]


def make_adapter(base: Path, out: Path, seed: int = 1, std: float | None = None, **lora) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(seed)
    options = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"], "init_lora_weights": False}
    options.update(lora)
    peft_model = get_peft_model(model, LoraConfig(**options))
    if std is not None:
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_" in name:
                    param.normal_(0, std)
    peft_model.save_pretrained(out)
    return out


def cfg(*overrides):
    from nekotune.config import load_config

    return load_config(None, list(overrides), default_to_demo=False)


@pytest.fixture(scope="session")
def engine_bases(smol_dir, tmp_path_factory) -> dict[str, Path]:
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("engine-bases")
    return {arch: build_tiny(arch, AutoTokenizer.from_pretrained(smol_dir), root / arch, init_std=0.1)
            for arch in ("llama", "qwen2", "qwen3")}


@pytest.fixture(scope="session")
def renderer(smol_tokenizer):
    from nekotune.data.render import Renderer

    return Renderer(smol_tokenizer)


@pytest.fixture(scope="session")
def prompts(renderer) -> list[list[int]]:
    from nekotune.data.formats import Conversation, Turn

    return [renderer.prompt_ids(Conversation(turns=[Turn("user", q)])) for q in QUESTIONS]


@pytest.fixture
def gguf_cache(tmp_path, monkeypatch) -> Path:
    """nekotune's GGUF cache in a temporary directory (the user's cache stays untouched)."""
    from nekotune.export import gguf_cache

    root = tmp_path / "gguf-cache"
    monkeypatch.setattr(gguf_cache, "cache_root", lambda: root)
    return root
