"""The inference engines, one table: config validation, the CLI's --engine choices, the UI and the
docs read it. Plain data and cheap checks only (no torch, no llama_cpp import), so config.py can
import it. Phase B merges it into the refactor's registry module.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
from dataclasses import dataclass
from typing import Callable

from nekotune.errors import UserError

AUTO = "auto"


@dataclass(frozen=True)
class EngineInfo:
    name: str
    summary: str
    install: str  # what to install when missing
    serve_only: bool  # runs as its own server process (vLLM); chat/predict/eval cannot use it
    missing: Callable[[], str | None]  # None when usable here, else why not


def _llama_cpp_missing() -> str | None:
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed"
    return None


def vllm_executable() -> str | None:
    """vLLM pins its own CUDA torch, so it lives in its own environment: NEKOTUNE_VLLM or `vllm` on PATH."""
    return os.environ.get("NEKOTUNE_VLLM") or shutil.which("vllm")


def _vllm_missing() -> str | None:
    if vllm_executable() is None:
        return "no `vllm` executable on PATH (or NEKOTUNE_VLLM)"
    return None


ENGINES: dict[str, EngineInfo] = {
    "transformers": EngineInfo("transformers", "transformers generate (every device, every model)",
                               "included", False, lambda: None),
    "llama.cpp": EngineInfo("llama.cpp", "llama.cpp on a cached GGUF of the model; adapters as LoRA GGUFs "
                            "(fastest on CPUs and Apple silicon)", "pip install 'nekotune[llamacpp]'", False,
                            lambda: _llama_cpp_missing()),
    "vllm": EngineInfo("vllm", "vLLM's OpenAI server as a subprocess, LoRA adapters switched per request "
                       "(NVIDIA GPUs; serve only)", "install vLLM in its own environment (pip install vllm)",
                       True, lambda: _vllm_missing()),
}
CHOICES = (AUTO, *ENGINES)


@dataclass(frozen=True)
class Choice:
    name: str
    reason: str  # why, for the line the command prints ("engine: llama.cpp (auto: CPU, ...)")


def apple_silicon() -> bool:
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def pick_engine(requested: str, device: str, serving: bool = False, llamacpp_refusal: str | None = None) -> Choice:
    """The engine to run. `device` is model.pick_device's answer; `llamacpp_refusal` says why this
    model cannot run on llama.cpp (unsupported architecture, remote code, ...), if it cannot.

    auto: llama.cpp on a CPU or Apple silicon when llama-cpp-python is installed and the model
    converts; transformers otherwise. vLLM is never picked automatically."""
    if requested not in CHOICES:
        raise UserError(f"engine {requested!r} is not one of {', '.join(CHOICES)}")
    if requested != AUTO:
        info = ENGINES[requested]
        if info.serve_only and not serving:
            raise UserError(f"engine {requested} serves only (nekotune serve --engine {requested}); use "
                            f"transformers or llama.cpp here")
        if (why := info.missing()) is not None:
            raise UserError(f"engine {requested}: {why}; {info.install}")
        if requested == "llama.cpp" and llamacpp_refusal:
            raise UserError(f"engine llama.cpp: {llamacpp_refusal}; use --engine transformers")
        return Choice(requested, "requested")
    local = device == "cpu" or (device == "mps" and apple_silicon())
    if not local:
        return Choice("transformers", f"auto: {device} device")
    if (why := _llama_cpp_missing()) is not None:
        return Choice("transformers", f"auto: {why} ({ENGINES['llama.cpp'].install} for faster CPU generation)")
    if llamacpp_refusal:
        return Choice("transformers", f"auto: {llamacpp_refusal}")
    return Choice("llama.cpp", f"auto: {'Apple silicon' if device == 'mps' else 'CPU'}, llama-cpp-python installed")


def llamacpp_refusal(model_config: dict, adapter_config: dict | None = None, trust_remote_code: bool = False,
                     quantization: str | None = None) -> str | None:
    """Why this model cannot run on the llama.cpp engine (None: it can). Config-level only."""
    from nekotune.export.gguf import ARCHS

    if trust_remote_code:
        return "a model with remote code has no GGUF export"
    if quantization:
        return f"model.quantization={quantization} (bitsandbytes) runs on transformers only"
    if model_config.get("model_type") not in ARCHS:
        return f"model_type {model_config.get('model_type')} has no GGUF export"
    if adapter_config and adapter_config.get("peft_type", "LORA") != "LORA":
        return f"peft_type {adapter_config.get('peft_type')} is not LoRA"
    return None
