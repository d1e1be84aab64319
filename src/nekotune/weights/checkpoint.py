"""The base model's checkpoint: a local HF directory whose safetensors are read one tensor at a time."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nekotune.errors import UserError
from nekotune.io import read_json

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # merge --dtype
SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)


@dataclass
class BaseCheckpoint:
    """A local HF directory whose weights are safetensors, read one tensor at a time."""

    path: Path
    shards: dict[str, list[str]]  # file name -> tensor names, in the base's order
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]  # tensor name -> torch dtype name
    config: dict

    @classmethod
    def open(cls, path: Path) -> "BaseCheckpoint":
        from safetensors import safe_open

        files = _shard_files(path)
        shards, shapes, dtypes = {}, {}, {}
        for file in files:
            with safe_open(path / file, framework="pt") as fh:
                shards[file] = list(fh.keys())
                for name in shards[file]:
                    piece = fh.get_slice(name)
                    shapes[name] = tuple(piece.get_shape())
                    dtypes[name] = _dtype_from_safetensors(piece.get_dtype(), path / file)
        return cls(path, shards, shapes, dtypes, read_json(path / "config.json"))

    @property
    def file_of(self) -> dict[str, str]:
        return {name: file for file, names in self.shards.items() for name in names}

    def get(self, name: str) -> Any:
        from safetensors import safe_open

        # Opened per tensor so the memory map (counted in RSS once touched) is released at once.
        with safe_open(self.path / self.file_of[name], framework="pt") as fh:
            return fh.get_tensor(name)

    @property
    def weights_dtype(self) -> str:
        """The dtype of the matrices (config.json's `dtype` is sometimes wrong after conversions)."""
        for name, shape in self.shapes.items():
            if len(shape) == 2:
                return self.dtypes[name]
        return next(iter(self.dtypes.values()), "float32")

    def shard_bytes(self) -> dict[str, int]:
        return {file: (self.path / file).stat().st_size for file in self.shards}


def _shard_files(path: Path) -> list[str]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{index}: no weight_map; the checkpoint index is damaged")
        files = list(dict.fromkeys(weight_map.values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise UserError(f"{path}: shard {missing[0]} listed in model.safetensors.index.json is missing; "
                            f"download the model again")
        return files
    if (path / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise UserError(f"{path} has no safetensors weights (model.safetensors or an index); --low-memory and "
                    f"the GGUF export read safetensors: run `nekotune merge` without --low-memory first")


def _dtype_from_safetensors(code: str, where: Path) -> str:
    table = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}
    if code not in table:
        raise UserError(f"{where}: tensors of type {code} (already quantized?) cannot be merged; "
                        f"use the unquantized base model")
    return table[code]


def local_model_dir(base: str, revision: str | None = None) -> Path:
    """The base as a local directory (hub ids come from the HF cache, downloading if needed)."""
    if Path(base).is_dir():
        return Path(base)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(base, revision=revision,
                                      allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"]))
    except Exception as exc:  # offline, unknown repo, gated model
        raise UserError(f"cannot fetch base model {base} ({str(exc).splitlines()[0][:160]}); download it and "
                        f"pass its directory") from None


def has_safetensors(path: Path) -> bool:
    return (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
