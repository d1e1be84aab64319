"""Merge a LoRA adapter into its base model: a standalone HF model directory.

Two ways, the same weights (both match peft's `merge_and_unload`, see merged.py):
- default: transformers + peft load the whole model, `merge_and_unload()` merges it;
- `--low-memory`: the base's safetensors shards are read one tensor at a time, the adapter's
  delta is added to that tensor, and the result is streamed into the output shard. Peak memory
  is one tensor in fp32 plus the adapter, far below one shard.

Either way the output keeps the base's shard layout (same file names, same tensors per file),
so the two modes produce byte-identical directories and a model sharded for a small GPU stays so."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from nekotune.config import Config
from nekotune.errors import UserError
from nekotune.io import read_json
from nekotune.model.source import MERGE_INFO, ModelSource
from nekotune.weights.checkpoint import (
    DTYPES,
    SAFETENSORS_DTYPES,
    BaseCheckpoint,
    has_safetensors,
    local_model_dir,
    torch_dtype,
)
from nekotune.weights.merged import MergedModel, open_merged

WRITTEN_BY = "nekotune merge"  # the marker of a merged directory (nekotune.io)
Progress = Callable[[int, int], None]  # (tensors written, tensors in all)


def write_safetensors(path: Path, names: list[str], shapes: dict, dtype: str, get: Callable,
                      on_tensor: Callable[[str], None] = lambda name: None) -> None:
    """Stream tensors into a safetensors file, one at a time: the header is known up front
    (merging keeps shapes), so no shard-sized buffer is ever built."""
    import torch

    itemsize = torch.empty((), dtype=torch_dtype(dtype)).element_size()
    header, offset = {}, 0
    for name in names:
        size = math.prod(shapes[name]) * itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shapes[name]),
                        "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # the format pads the header to 8 bytes
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for name in names:
            tensor = get(name).to(torch_dtype(dtype)).contiguous()
            if tuple(tensor.shape) != tuple(shapes[name]):
                raise RuntimeError(f"{name}: merged shape {tuple(tensor.shape)} != {shapes[name]}")
            fh.write(tensor.view(torch.uint8).numpy().data)
            on_tensor(name)


def write_merged(merged: MergedModel, out: Path, dtype: str, progress: Progress | None = None) -> int:
    total, done, count = 0, 0, len(merged.names())

    def one_more(name: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, count)

    for file, names in merged.shards.items():
        write_safetensors(out / file, names, merged.shapes, dtype, merged.get, on_tensor=one_more)
        total += (out / file).stat().st_size
    if len(merged.shards) > 1:
        weight_map = {n: f for f, names in merged.shards.items() for n in names}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return total


def _write_config(merged: MergedModel, out: Path, dtype: str) -> None:
    config = dict(merged.config)
    config["dtype"] = dtype
    config.pop("torch_dtype", None)
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_generation_config(base_dir: Path, out: Path, config: dict, renderer) -> None:
    """The base's generation config, stopping also at the chat template's end-of-turn token."""
    path = base_dir / "generation_config.json"
    gen = read_json(path) if path.is_file() else {k: config[k] for k in ("bos_token_id", "eos_token_id",
                                                                         "pad_token_id") if k in config}
    eos = gen.get("eos_token_id")
    eos = list(eos) if isinstance(eos, list) else ([eos] if eos is not None else [])
    for tid in renderer.stop_token_ids:
        if tid not in eos:
            eos.append(tid)
    if eos:
        gen["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")


def _write_merge_info(out: Path, spec: ModelSource, cfg: Config, dtype: str, low_memory: bool) -> None:
    info = {"base": spec.base, "adapter": spec.adapter, "run": spec.run_dir, "dtype": dtype,
            "low_memory": low_memory, "system_prompt": cfg.data.system_prompt,
            "enable_thinking": cfg.data.enable_thinking}
    (out / MERGE_INFO).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def source_paths(spec: ModelSource, base_dir: Path | None = None, model_arg: str | None = None) -> list[Path]:
    """What a merge or export reads (run, adapter, base model directory, a .gguf given as --model):
    its output may be none of them, inside none and above none."""
    paths = [Path(p) for p in (spec.run_dir, spec.adapter, spec.base, model_arg) if p and Path(p).exists()]
    return paths + ([base_dir] if base_dir is not None else [])


# -- the stage -------------------------------------------------------------------------------
@dataclass
class MergeResult:
    out: Path
    adapter: str
    base: str
    shards: int
    bytes: int
    dtype: str
    low_memory: bool


def merge(cfg: Config, model_arg: str | None, out: str, low_memory: bool = False, dtype: str | None = None,
          progress: Progress | None = None) -> MergeResult:
    """`nekotune merge`: the adapter `model_arg` names merged into its base, as a model directory
    at `out`. `progress(done, total)` counts the tensors written."""
    from nekotune.data.render import Renderer
    from nekotune.io import atomic_dir, claim_output_dir
    from nekotune.model import load_tokenizer, resolve_source
    from nekotune.model.processor import has_processor_files

    spec, cfg = resolve_source(cfg, model_arg)
    if spec.adapter is None:
        raise UserError(f"{spec.label} has no adapter to merge; pass a run directory or an adapter directory "
                        f"with --model")
    out_path = Path(out).expanduser()
    claim_output_dir(out_path, WRITTEN_BY, source_paths(spec, model_arg=model_arg))
    base_dir = local_model_dir(spec.base, cfg.model.revision)
    claim_output_dir(out_path, WRITTEN_BY, source_paths(spec, base_dir, model_arg))  # a hub base: now local
    tokenizer = load_tokenizer(spec, cfg.model)
    renderer = Renderer.from_config(tokenizer, cfg.data)
    base_dtype = BaseCheckpoint.open(base_dir).weights_dtype if has_safetensors(base_dir) else "float32"
    out_dtype = DTYPES[dtype] if dtype else base_dtype
    # Merging happens in fp32 unless base and output are both half precision: then in that precision,
    # as peft does, which halves the memory of the default mode.
    compute = base_dtype if base_dtype == out_dtype and base_dtype != "float32" else "float32"
    merged = open_merged(spec, cfg, low_memory=low_memory, compute_dtype=compute)
    with atomic_dir(out_path, WRITTEN_BY) as tmp:
        total = write_merged(merged, tmp, out_dtype, progress)
        _write_config(merged, tmp, out_dtype)
        _write_generation_config(merged.base_dir, tmp, merged.config, renderer)
        if merged.config.get("vision_config") is not None:  # loads as a VLM elsewhere (issue 17)
            from nekotune.model.processor import copy_processor_files

            copy_processor_files(spec.adapter if spec.adapter and has_processor_files(spec.adapter) else spec.base,
                                 tmp, cfg.model.revision)
        tokenizer.save_pretrained(tmp)
        _write_merge_info(tmp, spec, cfg, out_dtype, low_memory)
    return MergeResult(out_path, spec.adapter, spec.base, len(merged.shards), total, out_dtype, low_memory)


def size_text(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1024 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} GB"
