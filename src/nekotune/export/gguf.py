"""GGUF export in pure Python: the `gguf` package writes, nekotune maps names and metadata.

The source is a merged directory, an HF model, or base + adapter merged on the fly: tensors are
merged, converted and written one at a time (nekotune.weights.open_merged), so the export needs
about one tensor of memory beyond the adapter.

Llama-family Q/K rows are permuted into llama.cpp's rotary layout (HF uses the "half split"
rotary form, llama.cpp the interleaved one); which architectures need it, and which are written
at all, is registry.ARCHITECTURES. The metadata (hyperparameters, tokenizer, chat template) is
gguf_meta.py. The types are registry.GGUF_TYPES: Q8_0 and Q4_0..Q5_1 from gguf.quants; the
K-quant files (q2_k..q6_k, with llama.cpp's per-tensor mixture, export/mixture.py) and anything
weighted by an importance matrix from export/quants.py, in pure NumPy: no llama.cpp build is needed.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from nekotune.config import Config
from nekotune.errors import UserError
from nekotune.export.gguf_meta import add_hparams, add_tokenizer, llama3_rope_factors
from nekotune.model.source import ModelSource
from nekotune.registry import ARCHITECTURES, GGUF_TYPES, gguf_architectures

log = logging.getLogger(__name__)
TYPE_NAMES = tuple(GGUF_TYPES)  # --type choices
Progress = Callable[[int, int], None]  # (bytes written, bytes in all)


def _types(name: str) -> tuple[Any, Any]:
    """(tensor type, file type) of a --type; looked up late because gguf is imported late."""
    from gguf import GGMLQuantizationType, LlamaFileType

    t = GGUF_TYPES[name]
    return GGMLQuantizationType[t.tensor_type], LlamaFileType[t.file_type]


# -- the model being exported ------------------------------------------------------------------
@dataclass
class Source:
    spec: ModelSource
    cfg: Config
    tokenizer: Any
    renderer: Any

    @property
    def name(self) -> str:
        return self.spec.name


def prepare(cfg: Config, model_arg: str | None) -> Source:
    """Resolve --model, and the prompt settings it was trained with (run config or merge info)."""
    from nekotune.data.render import Renderer
    from nekotune.model import load_tokenizer, resolve_source
    from nekotune.model.load import base_config
    from nekotune.vision.families import gguf_refusal, is_vlm

    spec, cfg = resolve_source(cfg, model_arg, merged_prompts=True)
    config = base_config(spec, cfg.model)
    if is_vlm(config):  # issue 17: llama.cpp needs the vision projector as its own mmproj file
        raise gguf_refusal(config)
    tokenizer = load_tokenizer(spec, cfg.model)
    return Source(spec, cfg, tokenizer, Renderer.from_config(tokenizer, cfg.data))


def architecture(config: dict) -> str:
    """llama.cpp's architecture name for a config.json."""
    model_type = config.get("model_type", "?")
    arch = ARCHITECTURES.get(model_type)
    if arch is None or arch.gguf_arch is None:
        classes = ", ".join(config.get("architectures") or []) or "unknown class"
        raise UserError(f"model_type {model_type} ({classes}) is not supported by the GGUF export; "
                        f"supported: {gguf_architectures()}")
    return arch.gguf_arch


# -- tensors ---------------------------------------------------------------------------------
def permute_for_rope(weight: Any, n_head: int) -> Any:
    """HF's rotary layout (first half / second half of each head) -> llama.cpp's interleaved pairs."""
    shape = weight.shape
    return weight.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def gguf_tensors(merged: Any, config: dict, arch: str) -> list[tuple[str, str, tuple]]:
    """(HF name, GGUF name, shape) for every tensor llama.cpp needs, in the checkpoint's order."""
    import gguf

    names = gguf.TensorNameMap(_arch_enum(arch), config["num_hidden_layers"])
    out = []
    for hf_name in merged.names():
        if hf_name.endswith(("rotary_emb.inv_freq", ".masked_bias")):
            continue  # recomputed by llama.cpp
        if hf_name == "lm_head.weight" and config.get("tie_word_embeddings") and "model.embed_tokens.weight" \
                in merged.shapes:
            continue  # tied: llama.cpp reuses token_embd as the output matrix
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None or gguf_name.endswith("attn_rot_embd"):
            raise UserError(f"tensor {hf_name} has no GGUF name for architecture {arch}; this checkpoint is not a "
                            f"standard {config.get('model_type')} model")
        out.append((hf_name, gguf_name, tuple(merged.shapes[hf_name])))
    return out


def _arch_enum(arch: str):
    import gguf

    return next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)


def tensor_type(gguf_name: str, shape: tuple, requested: str, has_output: bool, model: Any = None) -> Any:
    """The type one tensor is written in: vectors stay f32; rows that do not fill whole blocks fall
    back to f16, as llama.cpp does; at 4-5 bits the output matrix keeps 8 bits (llama.cpp keeps
    it at Q6_K, which gguf cannot write). At q8_0 the output matrix stays f16, where llama.cpp
    would write q8_0: every logit goes through it, and on the demo model that one tensor decides
    whether llama.cpp's greedy answers follow transformers' (7 of 12 prompts equal for 20 tokens
    instead of 2; docs/export.md), for about 12% more file. K-quant files follow llama.cpp's
    own rules (export/mixture.py), given `model`, a mixture.ModelShape."""
    import gguf

    if GGUF_TYPES[requested].k_mixture:
        from nekotune.export.mixture import k_tensor_type

        return k_tensor_type(gguf_name, shape, requested, model)
    Q = gguf.GGMLQuantizationType
    qtype = _types(requested)[0]
    if len(shape) < 2:
        return Q.F32
    is_output = gguf_name == "output.weight" or (gguf_name == "token_embd.weight" and not has_output)
    if GGUF_TYPES[requested].low_bit and is_output:
        qtype = Q.Q8_0
    elif requested == "q8_0" and is_output:
        return Q.F16
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block:
        return Q.F16
    return qtype


def encode(tensor: Any, qtype: Any, importance: Any = None) -> Any:
    """A float32 torch tensor -> the numpy array GGUFWriter writes for `qtype`; `importance`
    (one value per column, from --imatrix) weights the quantization error."""
    import gguf
    import numpy as np

    from nekotune.export import quants

    data = tensor.float().contiguous().numpy()
    if qtype == gguf.GGMLQuantizationType.F32:
        return data
    if qtype == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16)
    return quants.quantize(data, qtype, importance)


def _tensor_info(writer, name: str, shape: tuple, qtype) -> None:
    import gguf
    import numpy as np

    Q = gguf.GGMLQuantizationType
    if qtype in (Q.F32, Q.F16):
        dtype = np.float32 if qtype == Q.F32 else np.float16
        writer.add_tensor_info(name, shape, np.dtype(dtype), math.prod(shape) * np.dtype(dtype).itemsize)
        return
    byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
    writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=qtype)


# -- writing ---------------------------------------------------------------------------------
WRITTEN_BY_KEY = "nekotune.written_by"  # a GGUF nekotune wrote; only such a file is ever overwritten
WRITTEN_BY = "nekotune export gguf"


def written_by_nekotune(path: Path) -> bool:
    """Whether `path` is a GGUF this exporter wrote (its metadata says so)."""
    import gguf

    try:
        field = gguf.GGUFReader(path).fields.get(WRITTEN_BY_KEY)
        return field is not None and str(field.contents()).startswith("nekotune")
    except Exception:  # not a GGUF, truncated, unreadable: not ours
        return False


def write_gguf(source: Source, merged: Any, path: Path, type_name: str, progress: Progress | None = None,
               imatrix: dict | None = None) -> None:
    import gguf

    from nekotune.export.imatrix import importance_for
    from nekotune.export.mixture import ModelShape

    config = merged.config
    arch = architecture(config)
    plan = gguf_tensors(merged, config, arch)
    n_vocab = merged.shapes.get("model.embed_tokens.weight", (config.get("vocab_size"),))[0]
    has_output = any(g == "output.weight" for _, g, _ in plan)
    writer = gguf.GGUFWriter(path=None, arch=arch)
    writer.add_type("model")
    writer.add_name(source.name)
    writer.add_string(WRITTEN_BY_KEY, WRITTEN_BY)
    hp = add_hparams(writer, config, n_vocab)
    writer.add_file_type(_types(type_name)[1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(writer, source.tokenizer, source.renderer, n_vocab)
    model = ModelShape.from_config(config, arch, has_output)
    types = {g: tensor_type(g, shape, type_name, has_output, model) for _, g, shape in plan}
    rope_freqs = llama3_rope_factors(hp["rope"], hp["head_dim"], float(hp["rope"]["rope_theta"])) \
        if hp["rope"]["rope_type"] == "llama3" else None
    for _, g, shape in plan:
        _tensor_info(writer, g, shape, types[g])
    if rope_freqs is not None:
        _tensor_info(writer, "rope_freqs.weight", rope_freqs.shape, gguf.GGMLQuantizationType.F32)
    total, done = sum(math.prod(s) for _, _, s in plan) * 4, 0
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for hf_name, g, shape in plan:
        tensor = prepare_tensor(merged.get(hf_name), hf_name, config)
        writer.write_tensor_data(encode(tensor, types[g], importance_for(imatrix, g, shape[-1])))
        done += math.prod(shape) * 4
        if progress is not None:
            progress(done, total)
    if rope_freqs is not None:
        writer.write_tensor_data(rope_freqs)
    writer.close()


def prepare_tensor(tensor: Any, hf_name: str, config: dict) -> Any:
    if ARCHITECTURES[config["model_type"]].permute_qk:
        heads = config["num_attention_heads"]
        if ".q_proj." in hf_name:
            return permute_for_rope(tensor, heads)
        if ".k_proj." in hf_name:
            return permute_for_rope(tensor, config.get("num_key_value_heads") or heads)
    return tensor


def quantize_k(source_path: Path, target: Path, type_name: str = "q4_k_m") -> None:
    """llama.cpp's own quantizer (llama-cpp-python) on an f32/f16 GGUF: the reference the pure-Python
    K-quants are measured against (tests, bench/kquant_*.py, docs/export.md); the export does not use it."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{GGUF_TYPES[type_name].file_type}")
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(source_path).encode(), str(target).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed with code {rc}")


def export_gguf(source: Source, out: Path, type_name: str, progress: Progress | None = None,
                imatrix: str | None = None) -> str:
    """Write `out`; returns the type written. `imatrix`: a llama.cpp importance matrix file."""
    from nekotune.export.imatrix import load_imatrix
    from nekotune.io import atomic_file
    from nekotune.weights import NotStreamable, open_merged

    if type_name not in GGUF_TYPES:
        raise UserError(f"--type {type_name} is not one of {', '.join(GGUF_TYPES)}")
    architecture(_config_of(source))  # fail before any weight is read
    importance = load_imatrix(imatrix) if imatrix else None
    if importance is not None and type_name in ("f32", "f16", "bf16", "q8_0"):
        log.warning("note: --imatrix has no effect on %s (it weights the 2-6 bit types)", type_name)
    try:
        merged = open_merged(source.spec, source.cfg, low_memory=True)
    except NotStreamable as exc:  # an adapter variant only peft itself merges: merge in memory
        log.warning("note: %s; merging in memory with peft", exc.reason)
        merged = open_merged(source.spec, source.cfg, low_memory=False, compute_dtype="float32")
    with atomic_file(out) as tmp:
        write_gguf(source, merged, tmp, type_name, progress, importance)
    return type_name


def _config_of(source: Source) -> dict:
    from nekotune.io import read_json
    from nekotune.weights import local_model_dir

    return read_json(local_model_dir(source.spec.base, source.cfg.model.revision) / "config.json")


def file_size(path: Path) -> str:
    size = path.stat().st_size
    return f"{size / 2**20:.1f} MB" if size < 2**30 else f"{size / 2**30:.2f} GB"


# -- the stage -------------------------------------------------------------------------------
@dataclass
class ExportResult:
    path: Path  # the .gguf file, or the Ollama directory
    type: str  # the GGUF type written
    source: str  # what it was made from (run, adapter or model directory)
    gguf: Path  # the .gguf file itself

    @property
    def size(self) -> str:
        return file_size(self.gguf)


def gguf_file(cfg: Config, model_arg: str | None, out: str, type: str = "q8_0",
              progress: Progress | None = None, imatrix: str | None = None) -> ExportResult:
    """`nekotune export gguf`: the model `model_arg` names (merged on the fly) as one .gguf file."""
    from nekotune.io import check_output_file
    from nekotune.weights import local_model_dir, source_paths

    out_path = Path(out).expanduser()
    if out_path.suffix != ".gguf":
        raise UserError(f"--out {out} should name a .gguf file, e.g. --out model-{type}.gguf")
    if out_path.is_dir():
        raise UserError(f"--out {out} is a directory; give a file name ending in .gguf")
    source = prepare(cfg, model_arg)
    check_output_file(out_path, source_paths(source.spec, local_model_dir(source.spec.base, source.cfg.model.revision),
                                             model_arg), ours=written_by_nekotune)
    written = export_gguf(source, out_path, type, progress, imatrix)
    return ExportResult(out_path, written, source.spec.label, out_path)
