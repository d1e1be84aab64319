"""ggml's repacked CPU weights without its AMX buffer, for CPUs that report AMX.

On such CPUs llama.cpp puts quantized weights into its AMX buffer first, and decodes then
segfault (see engines/llamacpp.py), so the engine loads models without ggml's extra buffer types.
That also loses the other extra buffer, CPU_REPACK, which interleaves q4_0 rows so that a decode
reads them with wide SIMD loads: SmolLM2 q4_0 decoded 109 tokens/s with it and 95 without on
this project's 2-core AMX machine. llama-cpp-python has no argument for a buffer type, but
llama.cpp's model parameters take a list of (tensor-name regex, buffer type) overrides; here
the q4_0 matrices go to CPU_REPACK by name and everything else stays in plain CPU memory.

Only q4_0 matrices with a multiple of 8 rows are sent: CPU_REPACK's x86 kernels (AVX2, which every
AMX CPU has) take q4_0 in 8-row groups, and a tensor it cannot repack fails an assertion that
ends the process. Other types (q8_0, K-quants) keep the plain kernels, as before.
"""

from __future__ import annotations

import ctypes
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nekotune.engines.gguf_header import TensorInfo, tensor_infos

GGML_TYPE_Q4_0 = 2


def repackable(info: TensorInfo) -> bool:
    return info.ggml_type == GGML_TYPE_Q4_0 and len(info.dims) == 2 and info.dims[1] % 8 == 0


def override_patterns(infos: list[TensorInfo]) -> list[str]:
    """Regexes naming exactly the repackable tensors: one per layer-tensor kind where every layer's
    tensor of that kind qualifies (`blk.N.ffn_up.weight`), exact names otherwise."""
    kinds: dict[str, list[TensorInfo]] = {}
    for info in infos:
        match = re.fullmatch(r"blk\.\d+\.(.+)", info.name)
        kinds.setdefault(match.group(1) if match else info.name, []).append(info)
    patterns = []
    for kind, members in kinds.items():
        good = [m for m in members if repackable(m)]
        if good and len(good) == len(members) and len(members) > 1:
            patterns.append(rf"^blk\.[0-9]+\.{re.escape(kind)}$")
        else:
            patterns += [f"^{re.escape(m.name)}$" for m in good]
    return patterns


class _Override(ctypes.Structure):  # llama.h: struct llama_model_tensor_buft_override
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def _ggml_library(llama_cpp: Any) -> ctypes.CDLL:
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    names = {"win32": ["ggml.dll"], "darwin": ["libggml.dylib"]}.get(sys.platform, ["libggml.so"])
    for name in names:
        if (lib_dir / name).exists():
            return ctypes.CDLL(str(lib_dir / name))
    raise OSError(f"no {names[0]} beside llama-cpp-python")


def cpu_repack_buffer_type(llama_cpp: Any) -> int | None:
    """The CPU device's CPU_REPACK buffer type (a pointer), or None where this build has none."""
    try:
        g = _ggml_library(llama_cpp)
        g.ggml_backend_dev_by_type.restype = ctypes.c_void_p
        g.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
        g.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
        g.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
        g.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
        g.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        g.ggml_backend_buft_name.restype = ctypes.c_char_p
        g.ggml_backend_buft_name.argtypes = [ctypes.c_void_p]
        dev = g.ggml_backend_dev_by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
        reg = g.ggml_backend_dev_backend_reg(dev) if dev else None
        address = g.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts") if reg else None
    except (OSError, AttributeError):
        return None
    if not address:
        return None
    extra_bufts = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(address)(dev)
    i = 0
    while extra_bufts and extra_bufts[i]:
        if g.ggml_backend_buft_name(extra_bufts[i]) == b"CPU_REPACK":
            return extra_bufts[i]
        i += 1
    return None


@dataclass
class Overrides:
    """A NULL-terminated override array for llama_model_params.tensor_buft_overrides; keep this
    object alive while the model loads (llama.cpp reads the patterns then)."""
    patterns: list[str]
    array: Any

    @property
    def address(self) -> int:
        return ctypes.cast(self.array, ctypes.c_void_p).value or 0


def repack_overrides(llama_cpp: Any, model_path: str | Path) -> Overrides | None:
    """Overrides sending the model's repackable q4_0 matrices to CPU_REPACK, or None (nothing to
    repack, an unreadable header, or a build without CPU_REPACK)."""
    try:
        patterns = override_patterns(tensor_infos(model_path))
    except (OSError, ValueError, KeyError, struct.error):
        return None
    limit = int(getattr(llama_cpp, "llama_max_tensor_buft_overrides", lambda: 4096)())
    if not patterns or len(patterns) >= limit:
        return None
    buft = cpu_repack_buffer_type(llama_cpp)
    if buft is None:
        return None
    array = (_Override * (len(patterns) + 1))()
    for slot, pattern in zip(array, patterns):
        slot.pattern, slot.buft = pattern.encode(), buft
    return Overrides(patterns, array)
