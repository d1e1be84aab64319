"""Which engine runs: registry.ENGINES is the table (config validation, the CLI's --engine
choices, the UI and the docs read it); this is the `auto` rule and the checks of what an engine
needs, cheap ones only (no torch, no llama_cpp import).
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
from dataclasses import dataclass

from nekotune.errors import UserError
from nekotune.registry import ENGINE_CHOICES, ENGINES

AUTO = "auto"
CHOICES = ENGINE_CHOICES


def vllm_executable() -> str | None:
    """vLLM pins its own CUDA torch, so it lives in its own environment: NEKOTUNE_VLLM or `vllm` on PATH."""
    info = ENGINES["vllm"]
    return (os.environ.get(info.executable_env or "") or None) or shutil.which(info.executable or "vllm")


def missing(name: str) -> str | None:
    """None when engine `name` can run here, else why not."""
    info = ENGINES[name]
    if info.python_module and importlib.util.find_spec(info.python_module) is None:
        return f"{info.python_module.replace('_', '-')}-python is not installed" if name == "llama.cpp" \
            else f"python module {info.python_module} is not installed"
    if info.executable and (os.environ.get(info.executable_env or "") or shutil.which(info.executable)) is None:
        where = f" (or {info.executable_env})" if info.executable_env else ""
        return f"no `{info.executable}` executable on PATH{where}"
    return None


def _llama_cpp_missing() -> str | None:
    return missing("llama.cpp")


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
        why = _llama_cpp_missing() if requested == "llama.cpp" else missing(requested)
        if why is not None:
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
    from nekotune.registry import ARCHITECTURES

    if trust_remote_code:
        return "a model with remote code has no GGUF export"
    if quantization:
        return f"model.quantization={quantization} (bitsandbytes) runs on transformers only"
    arch = ARCHITECTURES.get(str(model_config.get("model_type")))
    if arch is None or arch.gguf_arch is None:
        return f"model_type {model_config.get('model_type')} has no GGUF export"
    if adapter_config and adapter_config.get("peft_type", "LORA") != "LORA":
        return f"peft_type {adapter_config.get('peft_type')} is not LoRA"
    return None
