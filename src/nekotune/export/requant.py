"""Quantize an f32/f16/bf16 GGUF into another type in pure Python: llama-quantize's job.

`nekotune export gguf` quantizes while it converts; this reads a GGUF written earlier (by
nekotune or llama.cpp's converter), copies its metadata, and re-encodes each tensor with the
same per-tensor rules and encoders. It is what bench/kquant_speed.py times against
llama.cpp's llama_model_quantize on the same file. Tensors are read and written one at a time,
so memory stays near the largest tensor (its float16 data plus its quantized bytes).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from nekotune.errors import UserError
from nekotune.io import atomic_file, check_output_file
from nekotune.registry import GGUF_TYPES

SKIP_KEYS = ("GGUF.", "general.architecture", "general.file_type", "general.quantization_version")


def _model_shape(reader, arch: str, names: set[str]):
    from nekotune.export.mixture import ModelShape

    def field(key: str):
        value = reader.fields.get(f"{arch}.{key}")
        if value is None:
            raise UserError(f"the GGUF has no {arch}.{key}; it is not a complete {arch} model")
        return int(value.contents())

    config = {"num_attention_heads": field("attention.head_count"),
              "num_key_value_heads": field("attention.head_count_kv"), "num_hidden_layers": field("block_count")}
    return ModelShape.from_config(config, arch, "output.weight" in names)


def _copy_metadata(reader, writer) -> None:
    import gguf

    for name, item in reader.fields.items():
        if name.startswith(SKIP_KEYS):
            continue
        main = item.types[0]
        sub = item.types[-1] if main == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, item.contents(), main, sub_type=sub)


def _read(path: Path, tensor, dtype) -> np.ndarray:
    """The tensor's elements as a fresh array (not a view of a file mapping, whose pages would
    stay resident), shape rows x columns."""
    count = math.prod(int(n) for n in tensor.shape)
    rows = count // int(tensor.shape[0])
    with open(path, "rb") as fh:
        data = np.fromfile(fh, dtype=dtype, count=count, offset=int(tensor.data_offset))
    return data.reshape(rows, int(tensor.shape[0]))


def quantize_gguf(source: str | Path, target: str | Path, type_name: str, imatrix: str | None = None,
                  threads: int | None = None) -> dict[str, str]:
    """Write `target` in `type_name` from the float GGUF `source`; returns {tensor: type}."""
    import gguf

    from nekotune.export import gguf as export
    from nekotune.export import quants
    from nekotune.export.imatrix import importance_for, load_imatrix

    source, target = Path(source), Path(target)
    if type_name not in GGUF_TYPES:
        raise UserError(f"--type {type_name} is not one of {', '.join(GGUF_TYPES)}")
    try:
        reader = gguf.GGUFReader(source)
    except (OSError, ValueError) as exc:
        raise UserError(f"{source}: not a readable GGUF file ({exc})") from None
    Q = gguf.GGMLQuantizationType
    floats = {Q.F32: np.float32, Q.F16: np.float16}
    odd = [t.name for t in reader.tensors if t.tensor_type not in floats]
    if odd:
        raise UserError(f"{source}: tensor {odd[0]} is already quantized; quantize from an f32 or f16 GGUF")
    arch = reader.fields["general.architecture"].contents()
    names = {t.name for t in reader.tensors}
    model = _model_shape(reader, arch, names)
    importance = load_imatrix(imatrix) if imatrix else None
    plan = []
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape))  # rows first, as in HF
        plan.append((t, shape, export.tensor_type(t.name, shape, type_name, "output.weight" in names, model)))
    writer = gguf.GGUFWriter(path=None, arch=arch)
    _copy_metadata(reader, writer)
    writer.add_file_type(export._types(type_name)[1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for t, shape, qtype in plan:
        export._tensor_info(writer, t.name, shape, qtype)
    check_output_file(target, [source], ours=export.written_by_nekotune)
    with atomic_file(target) as tmp:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t, shape, qtype in plan:
            data = _read(source, t, floats[t.tensor_type])
            out: np.ndarray
            if qtype == Q.F32:
                out = data.astype(np.float32).reshape(shape)
            elif qtype == Q.F16:
                out = data.astype(np.float16).reshape(shape)
            else:
                out = quants.quantize(data, qtype, importance_for(importance, t.name, shape[-1]), threads)
            del data
            writer.write_tensor_data(out)
            del out
        writer.close()
    return {t.name: qtype.name for t, _, qtype in plan}
