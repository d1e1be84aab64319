"""What each device can run, decided in one place from plain facts.

`probe()` reads the facts of this machine (lazy torch import; nothing here needs a GPU), and
the rest are pure functions of a `DeviceFacts`, so tests fake a Mac or a GPU by building one.
Both `train` and `estimate` are meant to ask these functions, so the estimate follows the
trainer's own decisions:

- `choose_precision`: the dtype of the frozen weights and of autocast for a device, including
  Apple's MPS, where the right choice depends on the macOS and torch versions;
- `capability` / `fit_options` / `adapt_preset`: options a device cannot run are never proposed
  (bitsandbytes QLoRA needs CUDA: not on a CPU, not on MPS) and the alternative is said;
- `memory_budget_mb` and `unified_items`: on Apple silicon the GPU and the CPU share one pool of
  memory, so the Python runtime and Metal's own overhead count against the same budget;
- `peak_rss_mb`: the process's peak memory on Linux, macOS and Windows.

MPS rules, from the sources they come from (torch 2.13, accelerate 1.15, transformers 5.24):
- bf16 tensors on MPS need macOS 14 (Sonoma) or newer (torch refuses: "MPS BFloat16 is only
  supported on MacOS 14 or newer"; transformers' is_torch_bf16_gpu_available and accelerate's
  is_bf16_available both test `torch.backends.mps.is_macos_or_newer(14, 0)`).
- bf16 mixed-precision training on MPS needs torch >= 2.6, fp16 mixed precision torch >= 2.5
  and its GradScaler on MPS torch >= 2.8 (accelerate.Accelerator / get_grad_scaler), so fp16
  *training* needs torch >= 2.8; fp16 inference works on any torch with MPS.
- On M1/M2, Metal emulates bf16 with fp32 arithmetic (transformers' note): memory halves, speed
  does not improve. bf16 is still the default there, since fp16 training can overflow.
"""

from __future__ import annotations

import os
import platform
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from nekotune.errors import UserError

MB = 2**20
# Unified memory (Apple silicon): what an MPS training adds beyond its tensors. NOT measured
# on a Mac yet (no Mac here): a starting point that bench/estimate_memory.py's MPS rows are
# to calibrate. Metal rounds heap allocations up and MPSGraph caches compiled graphs.
MPS_OVERHEAD_FRACTION = 0.10
MPS_FIXED_MB = 300
CPU_RUNTIME_MB = 440  # RSS of Python + torch + transformers + peft (estimate.py measures the same figure)
SYSTEM_RESERVE_MB = 3 * 1024  # macOS and a browser keep about this much of the shared pool


@dataclass(frozen=True)
class DeviceFacts:
    kind: str  # "cuda" | "mps" | "cpu"
    torch_version: tuple[int, int] = (0, 0)
    macos_version: tuple[int, int] | None = None
    chip: str = ""  # GPU name on CUDA, "Apple M2 Pro" on a Mac
    total_memory_mb: float | None = None  # GPU memory on CUDA; RAM on MPS and CPU
    recommended_max_mb: float | None = None  # MPS: Metal's recommendedMaxWorkingSetSize
    cuda_bf16: bool = False
    cpu_fast_bf16: bool = False
    bitsandbytes: bool = False

    @property
    def unified(self) -> bool:
        """One memory pool for the GPU, the CPU and the system (Apple silicon)."""
        return self.kind == "mps"

    def to_dict(self) -> dict:
        return {**asdict(self), "unified_memory": self.unified}


def _version(text: str) -> tuple[int, int]:
    found = re.match(r"(\d+)\.(\d+)", text or "")
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


def probe(kind: str | None = None) -> DeviceFacts:
    """This machine's facts for `kind` (default: the device nekotune would pick)."""
    import importlib.util

    import psutil
    import torch

    has_mps = hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    kind = kind or ("cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu")
    torch_v = _version(torch.__version__)
    ram = psutil.virtual_memory().total / MB
    bnb = importlib.util.find_spec("bitsandbytes") is not None
    if kind == "cuda":
        props = torch.cuda.get_device_properties(0)
        return DeviceFacts(kind, torch_v, chip=props.name, total_memory_mb=props.total_memory / MB,
                           cuda_bf16=bool(torch.cuda.is_bf16_supported()), bitsandbytes=bnb)
    if kind == "mps":
        recommended = torch.mps.recommended_max_memory() / MB if hasattr(torch.mps, "recommended_max_memory") else None
        return DeviceFacts(kind, torch_v, macos_version=_version(platform.mac_ver()[0]), chip=_mac_chip(),
                           total_memory_mb=ram, recommended_max_mb=recommended, bitsandbytes=bnb)
    return DeviceFacts(kind, torch_v, total_memory_mb=ram, cpu_fast_bf16=cpu_has_fast_bf16(), bitsandbytes=bnb)


def cpu_has_fast_bf16() -> bool:
    """bf16 matmul is ~4x fp32 on CPUs with AVX512-BF16/AMX and much slower elsewhere."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and "avx512_bf16" in _cpu_flags() \
            or "amx_bf16" in _cpu_flags()
    except Exception:
        return False


def _cpu_flags() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def light_facts(requested: str = "auto") -> DeviceFacts:
    """This machine's facts without importing torch, for `estimate` (it answers in well under a
    second): a GPU when nvidia-smi exists, Apple silicon from the platform. A CUDA GPU is taken
    as able to run bf16 and QLoRA (bitsandbytes installs there); the CPU's bf16 units come from
    its flags, as cpu_has_fast_bf16 reads them."""
    import importlib.metadata
    import importlib.util
    import shutil

    import psutil

    apple = sys.platform == "darwin" and platform.machine() == "arm64"
    kind = requested if requested != "auto" else "cuda" if shutil.which("nvidia-smi") else "mps" if apple else "cpu"
    try:
        torch_v = _version(importlib.metadata.version("torch"))
    except importlib.metadata.PackageNotFoundError:
        torch_v = (0, 0)
    ram = psutil.virtual_memory().total / MB
    if kind == "cuda":
        return DeviceFacts("cuda", torch_v, cuda_bf16=True, bitsandbytes=True)
    bnb = importlib.util.find_spec("bitsandbytes") is not None
    if kind == "mps":
        return DeviceFacts("mps", torch_v, macos_version=_version(platform.mac_ver()[0]), chip=_mac_chip(),
                           total_memory_mb=ram, bitsandbytes=bnb)
    flags = _cpu_flags()
    return DeviceFacts("cpu", torch_v, total_memory_mb=ram, cpu_fast_bf16="avx512_bf16" in flags or "amx_bf16" in flags,
                       bitsandbytes=bnb)


def _mac_chip() -> str:
    import subprocess

    try:
        out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                             encoding="utf-8", errors="replace", timeout=5)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


# -- precision ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class PrecisionChoice:
    weights: str  # dtype of the frozen base weights: "bf16" | "fp16" | "fp32"
    autocast: str | None  # autocast dtype, None for none
    note: str = ""  # why, when the choice is not the obvious one

    @property
    def name(self) -> str:
        return self.autocast or self.weights

    @property
    def weight_bytes(self) -> float:
        return 4.0 if self.weights == "fp32" else 2.0


def choose_precision(facts: DeviceFacts, requested: str = "auto", training: bool = True) -> PrecisionChoice:
    """The dtype for `model.dtype=requested` on this device; a UserError for a choice the device
    cannot run, saying what to use instead."""
    if facts.kind == "cuda":
        dtype = ("bf16" if facts.cuda_bf16 else "fp16") if requested == "auto" else requested
        return PrecisionChoice(dtype, None if dtype == "fp32" else dtype)
    if facts.kind == "mps":
        return _mps_precision(facts, requested, training)
    if requested == "fp16":
        raise UserError("model.dtype=fp16 on CPU is about 100x slower than fp32; use model.dtype=auto or bf16")
    # frozen weights in bf16 with bf16 autocast where the CPU has bf16 units; inference stays
    # fp32 by default so that answers match exported GGUFs
    if requested == "bf16" or (requested == "auto" and training and facts.cpu_fast_bf16):
        return PrecisionChoice("bf16", "bf16")
    return PrecisionChoice("fp32", None)


def _mps_precision(facts: DeviceFacts, requested: str, training: bool) -> PrecisionChoice:
    macos = facts.macos_version or (0, 0)
    torch_v = facts.torch_version
    shown = f"macOS {macos[0]}.{macos[1]}, torch {torch_v[0]}.{torch_v[1]}"
    bf16_ok = macos >= (14, 0) and torch_v >= (2, 3)
    bf16_train_ok = bf16_ok and torch_v >= (2, 6)
    fp16_train_ok = torch_v >= (2, 8)
    if requested == "fp32":
        return PrecisionChoice("fp32", None)
    if requested == "bf16":
        if not bf16_ok:
            raise UserError(f"model.dtype=bf16 on MPS needs macOS 14 (Sonoma) or newer and torch 2.3+ ({shown}); "
                            f"use model.dtype=fp16 or auto")
        if training and not bf16_train_ok:
            raise UserError(f"bf16 training on MPS needs torch 2.6 or newer ({shown}); upgrade torch or use "
                            f"model.dtype=auto")
        return PrecisionChoice("bf16", "bf16" if training else None)
    if requested == "fp16":
        if training and not fp16_train_ok:
            raise UserError(f"fp16 training on MPS needs torch 2.8 or newer for loss scaling ({shown}); upgrade "
                            f"torch or use model.dtype=auto")
        return PrecisionChoice("fp16", "fp16" if training else None)
    emulated = re.search(r"\bM[12]\b", facts.chip) is not None
    if (bf16_train_ok if training else bf16_ok):
        note = ("this chip emulates bf16 (memory halves, speed does not improve); model.dtype=fp16 may be faster"
                if emulated else "")
        return PrecisionChoice("bf16", "bf16" if training else None, note)
    if not training:
        return PrecisionChoice("fp16", None, f"no bf16 on MPS with {shown}: fp16")
    if fp16_train_ok:
        return PrecisionChoice("fp16", "fp16", f"no bf16 on MPS with {shown}: fp16 with loss scaling")
    return PrecisionChoice("fp32", None, f"{shown} trains neither bf16 (macOS 14 + torch 2.6) nor fp16 (torch 2.8) "
                                         f"on MPS: fp32 needs twice the memory; upgrade torch (and macOS)")


# -- the plan both train and estimate follow -------------------------------------------------------
@dataclass(frozen=True)
class TrainingPlan:
    """What a training on this device will do; `estimate` counts memory from the same plan."""

    device: str
    precision: PrecisionChoice
    quantization: str | None  # "4bit" | "8bit" | None
    grad_checkpointing: bool
    packing: bool
    notes: tuple[str, ...] = ()


def plan_training(facts: DeviceFacts, dtype: str = "auto", quantization: str | None = None,
                  grad_checkpointing: bool | str = "auto", packing: bool = True) -> TrainingPlan:
    """model.dtype, model.quantization, train.grad_checkpointing and data.packing on this device.
    Gradient checkpointing on `auto` is on only for QLoRA on CUDA, where memory is what is
    short; on a CPU or a Mac recomputation costs ~30% speed and the RAM is usually there."""
    if quantization:
        ok, why = capability(facts, "qlora")
        if not ok:
            raise UserError(f"model.quantization={quantization}: {why}")
    precision = choose_precision(facts, dtype, training=True)
    ckpt = wants_grad_checkpointing(facts.kind, quantization, grad_checkpointing)
    notes = tuple(n for n in (precision.note,) if n)
    return TrainingPlan(facts.kind, precision, quantization, ckpt, packing, notes)


def wants_grad_checkpointing(device: str, quantization: str | None, requested: bool | str = "auto") -> bool:
    """train.grad_checkpointing: `auto` is on only for QLoRA on CUDA (training and estimate ask here)."""
    return bool(requested) if requested != "auto" else device == "cuda" and bool(quantization)


def adapt_config(cfg: Any, facts: DeviceFacts) -> tuple[Any, list[str]]:
    """The config as this device trains it: a preset's QLoRA (6gb, 8gb) on a CPU or a Mac is left
    out with a note (adapt_preset), so the preset still runs there as LoRA. A quantization the
    user set beside a preset that sets the same one cannot be told apart and is left out too."""
    from nekotune.config import PRESETS

    preset = PRESETS.get(cfg.preset or "", {})
    wanted = preset.get("model", {}).get("quantization")
    if not wanted or cfg.model.quantization != wanted:
        return cfg, []
    adapted, notes = adapt_preset(cfg.preset, preset, facts)
    if "quantization" in adapted.get("model", {}):
        return cfg, []
    out = cfg.model_copy(deep=True)
    out.model.quantization = None
    return out, notes


# -- what a device can run ---------------------------------------------------------------------
def capability(facts: DeviceFacts, option: str) -> tuple[bool, str]:
    """(can run, what to do instead) for "qlora", "flash_attention", "liger", "grad_checkpointing"."""
    if option == "qlora":
        if facts.kind != "cuda":
            return False, (f"QLoRA (bitsandbytes 4-bit) needs an NVIDIA GPU with CUDA; on {facts.kind} train LoRA "
                           f"without quantization: a smaller model, a shorter data.max_seq_len, a smaller "
                           f"train.batch_size or train.grad_checkpointing=true")
        if not facts.bitsandbytes:
            return False, "QLoRA needs bitsandbytes: pip install 'nekotune[qlora]'"
        return True, ""
    if option in ("flash_attention", "liger"):
        return (facts.kind == "cuda", "" if facts.kind == "cuda" else f"{option} runs on CUDA only; "
                f"nekotune uses PyTorch's SDPA attention on {facts.kind}")
    if option == "grad_checkpointing":
        return True, ""
    raise ValueError(f"unknown option {option!r}")


@dataclass(frozen=True)
class FitOptions:
    """The knobs `estimate --fit` may turn on this device, in order of preference."""

    quantization: tuple[bool, ...]  # (False,) or (False, True)
    grad_checkpointing: tuple[bool, ...] = (False, True)
    note: str = ""  # what the device cannot do, said when nothing fits


def fit_options(facts: DeviceFacts) -> FitOptions:
    ok, why = capability(facts, "qlora")
    if ok:
        return FitOptions(quantization=(False, True))
    return FitOptions(quantization=(False,), note=why)


def adapt_preset(name: str, preset: dict, facts: DeviceFacts) -> tuple[dict, list[str]]:
    """A preset without what this device cannot run: `6gb`'s 4-bit QLoRA on a CPU or a Mac
    becomes LoRA in the device's own precision, with a note saying so."""
    out = {section: dict(values) for section, values in preset.items()}
    notes: list[str] = []
    model = out.get("model", {})
    if model.get("quantization"):
        ok, why = capability(facts, "qlora")
        if not ok:
            model.pop("quantization")
            notes.append(f"preset {name}: model.quantization={preset['model']['quantization']} left out: {why}")
    return out, notes


# -- memory ------------------------------------------------------------------------------------
def memory_budget_mb(facts: DeviceFacts) -> float | None:
    """What a training may use: GPU memory on CUDA; on MPS the smaller of Metal's recommended
    working set and the RAM the system leaves (one pool); the RAM on a CPU."""
    if facts.kind == "mps":
        left = facts.total_memory_mb - SYSTEM_RESERVE_MB if facts.total_memory_mb else None
        candidates = [v for v in (facts.recommended_max_mb, left) if v]
        return min(candidates) if candidates else None
    return facts.total_memory_mb


def unified_items(device_items_mb: dict[str, float]) -> dict[str, float]:
    """An MPS breakdown: the tensors on the GPU (as a CUDA estimate lists them, without the
    CUDA context), Metal's overhead, and the CPU side of the process, which lives in the same
    memory on Apple silicon."""
    tensors = {k: v for k, v in device_items_mb.items() if not k.startswith("CUDA context")}
    tensor_mb = sum(tensors.values())
    return {**tensors, "Metal / MPSGraph overhead (not yet measured)": MPS_FIXED_MB + MPS_OVERHEAD_FRACTION * tensor_mb,
            "Python + torch runtime (same memory pool)": CPU_RUNTIME_MB}


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB, on Linux, macOS and Windows.

    No Unix-only module (`resource` does not exist on Windows): Linux reports the peak in
    /proc/self/status (VmHWM), macOS through libc's getrusage, Windows as psutil's peak working
    set; psutil's current RSS where none of those answers."""
    peak = _kernel_peak_mb()
    if peak:
        return peak
    import psutil

    info = psutil.Process(os.getpid()).memory_info()
    return float(getattr(info, "peak_wset", info.rss)) / MB


def _kernel_peak_mb() -> float | None:
    if sys.platform.startswith("linux"):
        try:
            status = Path("/proc/self/status").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None
        kib = next((line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")), None)
        return int(kib) / 1024 if kib else None
    if sys.platform == "darwin":
        maxrss = getrusage_maxrss()
        return maxrss / MB if maxrss else None  # bytes on macOS
    return None


def getrusage_maxrss() -> int | None:
    """ru_maxrss of this process from libc's getrusage (bytes on macOS, KiB on Linux), or None."""
    import ctypes

    class Timeval(ctypes.Structure):
        _fields_ = [("sec", ctypes.c_long), ("usec", ctypes.c_long)]  # 16 bytes with padding on both

    class Rusage(ctypes.Structure):
        _fields_ = [("utime", Timeval), ("stime", Timeval), ("maxrss", ctypes.c_long), ("rest", ctypes.c_long * 13)]

    usage = Rusage()
    try:
        libc = ctypes.CDLL(None)
        ok = libc.getrusage(0, ctypes.byref(usage)) == 0  # RUSAGE_SELF
    except (OSError, AttributeError):  # Windows: no libc getrusage
        return None
    return int(usage.maxrss) if ok else None
