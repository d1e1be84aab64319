"""A GGUF file's header read by hand: its key/value pairs and its tensor table.

gguf.GGUFReader maps the whole file and builds a numpy view per vocabulary string (14 s for
SmolLM2's 49k tokens here), and llama.cpp's vocabulary-only load prints its whole log; the
engine needs two small facts before loading (the context length, and which tensors are q4_0).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
STRING, ARRAY, U32, U64 = 8, 9, 4, 10


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: int
    dims: tuple[int, ...]  # GGUF order: dims[0] is the row length


class HeaderReader:
    """Sequential reads through a GGUF header; ValueError on a truncated file."""

    def __init__(self, fh: BinaryIO):
        self.fh = fh
        if fh.read(4) != b"GGUF":
            raise ValueError("not a GGUF file")
        _version, self.n_tensors, self.n_kv = self.read("<IQQ")

    def read(self, fmt: str) -> tuple:
        size = struct.calcsize(fmt)
        data = self.fh.read(size)
        if len(data) != size:
            raise ValueError("truncated GGUF header")
        return struct.unpack(fmt, data)

    def string(self) -> str:
        return self.fh.read(self.read("<Q")[0]).decode("utf-8", "replace")

    def skip(self, vtype: int) -> None:
        if vtype == STRING:
            self.fh.seek(self.read("<Q")[0], 1)
        elif vtype == ARRAY:
            etype, count = self.read("<IQ")
            if etype in (STRING, ARRAY):
                for _ in range(count):
                    self.skip(etype)
            else:
                self.fh.seek(_SCALAR_SIZES[etype] * count, 1)
        else:
            self.fh.seek(_SCALAR_SIZES[vtype], 1)


def context_length(path: str | Path) -> int | None:
    """`<arch>.context_length` from a GGUF's header, or None (llama.cpp's own load then says
    what is wrong with a file that cannot be read)."""
    try:
        with open(path, "rb") as fh:
            r = HeaderReader(fh)
            arch = None
            for _ in range(r.n_kv):
                key = r.string()
                (vtype,) = r.read("<I")
                if key == "general.architecture" and vtype == STRING:
                    arch = r.string()
                elif arch and key == f"{arch}.context_length" and vtype in (U32, U64):
                    return int(r.read("<I" if vtype == U32 else "<Q")[0])
                else:
                    r.skip(vtype)
    except (OSError, ValueError, KeyError, struct.error):
        pass
    return None


def tensor_infos(path: str | Path) -> list[TensorInfo]:
    """The tensor table of a GGUF file (after its key/value pairs)."""
    with open(path, "rb") as fh:
        r = HeaderReader(fh)
        for _ in range(r.n_kv):
            r.string()
            r.skip(r.read("<I")[0])
        infos = []
        for _ in range(r.n_tensors):
            name = r.string()
            (n_dims,) = r.read("<I")
            dims = r.read(f"<{n_dims}Q")
            ggml_type, _offset = r.read("<IQ")
            infos.append(TensorInfo(name, ggml_type, tuple(dims)))
        return infos
