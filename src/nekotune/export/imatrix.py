"""Reading llama.cpp's importance matrix (`llama-imatrix` output) for `--imatrix FILE`.

An importance matrix holds, per weight matrix, the mean square of each input column over a
calibration text; the K-quant searches weight their errors by it. Both formats llama.cpp reads
(common/imatrix-loader.cpp in the llama.cpp that llama-cpp-python 0.3.36 vendors) are read:
- GGUF (what llama-imatrix writes by default since mid-2025): tensors `<name>.in_sum2` (sums of
  squares) and `<name>.counts` (tokens seen, one per expert), plus imatrix.* metadata; the
  importance is in_sum2 / count, or 1 where a count is 0;
- the legacy binary `.dat` (`--output-format dat`): int32 entry count, then per entry an
  int32-length name, int32 ncall, int32 nval and nval float32 values that are mean*ncall, so
  the importance is value / ncall; an optional trailer (chunk count, dataset name) follows.
Names are GGUF tensor names (blk.0.attn_q.weight); token_embd usually has none, and then that
tensor is quantized without one, as llama.cpp does.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from nekotune.errors import UserError

GGUF_MAGIC = b"GGUF"


def load_imatrix(path: str | Path) -> dict[str, np.ndarray]:
    """{GGUF tensor name: float32 importance per column}. Bad files are a UserError."""
    path = Path(path).expanduser()
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise UserError(f"--imatrix {path}: cannot read ({exc.strerror or exc})") from None
    data = _read_gguf(path) if magic == GGUF_MAGIC else _read_legacy(path)
    if not data:
        raise UserError(f"--imatrix {path}: holds no importance data; give a file written by llama-imatrix")
    for name, values in data.items():
        if not np.all(np.isfinite(values)):
            raise UserError(f"--imatrix {path}: entry {name} holds non-finite values; recompute the imatrix")
    return data


def _read_gguf(path: Path) -> dict[str, np.ndarray]:
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, struct.error, IndexError, KeyError, TypeError) as exc:
        raise UserError(f"--imatrix {path}: not a readable GGUF file ({exc})") from None
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        for suffix, table in ((".in_sum2", sums), (".counts", counts)):
            if tensor.name.endswith(suffix):
                if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
                    raise UserError(f"--imatrix {path}: tensor {tensor.name} is {tensor.tensor_type.name}, "
                                    f"expected F32")
                table[tensor.name.removesuffix(suffix)] = np.asarray(tensor.data, dtype=np.float32).reshape(-1)
    if not sums and not counts:
        raise UserError(f"--imatrix {path}: a GGUF file without imatrix tensors (*.in_sum2, *.counts); "
                        f"is it a model rather than an imatrix?")
    out = {}
    for name in sorted(set(sums) | set(counts)):
        if name not in sums or name not in counts:
            raise UserError(f"--imatrix {path}: entry {name} has sums without counts or counts without sums")
        total, count = sums[name], np.rint(counts[name])
        if count.size == 0 or total.size % count.size:
            raise UserError(f"--imatrix {path}: entry {name} has {total.size} sums for {count.size} counts")
        per = total.reshape(count.size, -1)
        with np.errstate(divide="ignore", invalid="ignore"):
            out[name] = np.where(count[:, None] > 0, per / count[:, None], np.float32(1)).astype(np.float32).reshape(-1)
    return out


def _read_legacy(path: Path) -> dict[str, np.ndarray]:
    raw = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(raw):
            raise UserError(f"--imatrix {path}: truncated at byte {pos}; neither a GGUF nor a legacy .dat imatrix")
        values = struct.unpack_from(fmt, raw, pos)
        pos += size
        return values

    (n_entries,) = take("<i")
    if n_entries < 1 or n_entries > len(raw) // 12:
        raise UserError(f"--imatrix {path}: not an imatrix file (GGUF or llama.cpp's legacy .dat format)")
    out = {}
    for i in range(n_entries):
        (length,) = take("<i")
        if length < 1 or length > 4096:
            raise UserError(f"--imatrix {path}: entry {i + 1} has a name of {length} bytes; the file is damaged")
        (name,) = take(f"<{length}s")
        ncall, nval = take("<ii")
        if nval < 1:
            raise UserError(f"--imatrix {path}: entry {i + 1} has {nval} values")
        if pos + 4 * nval > len(raw):
            raise UserError(f"--imatrix {path}: truncated in entry {i + 1}")
        values = np.frombuffer(raw, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        pos += 4 * nval
        out[name.decode("utf-8", "replace")] = values / ncall if ncall > 0 else values
    return out


def importance_for(imatrix: dict[str, np.ndarray] | None, name: str, n_cols: int, path: str = "--imatrix"):
    """The importance vector for tensor `name`, None when the file has none for it.

    llama.cpp refuses an entry whose size does not match the tensor's row (the imatrix of
    another model) except for token_embd, which it then quantizes without one.
    """
    if imatrix is None or name not in imatrix:
        return None
    values = imatrix[name]
    if values.size != n_cols:
        if name == "token_embd.weight":
            return None
        raise UserError(f"{path}: entry {name} has {values.size} values but the tensor's rows have {n_cols}; "
                        f"the imatrix was computed for another model")
    return values
