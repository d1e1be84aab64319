"""Merge a LoRA adapter into its base model: a standalone HF model directory.

Two ways, the same weights (both match peft's `merge_and_unload`):
- default: transformers + peft load the whole model, `merge_and_unload()` merges it;
- `--low-memory`: the base's safetensors shards are read one tensor at a time, the adapter's
  delta is added to that tensor, and the result is streamed into the output shard. Peak memory
  is one tensor in fp32 plus the adapter, far below one shard.

Either way the output keeps the base's shard layout (same file names, same tensors per file),
so the two modes produce byte-identical directories and a model sharded for a small GPU stays so.

The merge exposes `open_merged(...)`, a tensor-by-tensor view of the merged weights, which the
GGUF export reads without ever writing the merged model to disk.

Adapters trained on a 4-bit (QLoRA) base learned a correction to the NF4-rounded weights, so
they are merged into the weights dequantized the same way (bitsandbytes round trip) when
bitsandbytes and a CUDA GPU are present; otherwise into the original full-precision weights,
with a note (the difference is the NF4 rounding error; `nekotune export verify` measures it).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from nekotune.errors import UserError
from nekotune.io import read_json
from nekotune.model.source import MERGE_INFO, merge_info  # noqa: F401  (merge_info: read back by export)

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
ADAPTER_PREFIX = "base_model.model."
WRITTEN_BY = "nekotune merge"  # the marker of a merged directory (nekotune.io)
EMBED_NAMES = ("model.embed_tokens.weight",)
LM_HEAD = "lm_head.weight"


class NotStreamable(UserError):
    """An adapter feature the tensor-by-tensor merge does not reproduce; peft's own merge does."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(f"{reason}; run `nekotune merge` without --low-memory")


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


# -- the base checkpoint ---------------------------------------------------------------------
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

    def get(self, name: str):
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


# -- the adapter -----------------------------------------------------------------------------
@dataclass
class LoraLayer:
    a: object  # [r, in]; embeddings: [r, num_embeddings]
    b: object  # [out, r]; embeddings: [dim, r]
    scaling: float
    magnitude: object | None = None  # DoRA: one learned norm per output row
    embedding: bool = False

    def delta(self):
        product = self.b.float() @ self.a.float()
        return (product.T if self.embedding else product) * self.scaling

    def merge_into(self, weight):
        merged = weight + self.delta()
        if self.magnitude is None:
            return merged
        # DoRA: W' = m * (W + dW) / ||W + dW||, the norm taken over each output row.
        import torch

        norm = torch.linalg.norm(merged, dim=1)
        return (self.magnitude.float() / norm).view(-1, 1) * merged


@dataclass
class Adapter:
    path: Path
    config: dict
    layers: dict[str, LoraLayer] = field(default_factory=dict)  # base tensor name -> LoRA
    replacements: dict[str, object] = field(default_factory=dict)  # modules_to_save: name -> full tensor
    nbytes: int = 0

    @classmethod
    def load(cls, path: str | Path) -> "Adapter":
        from peft.utils import load_peft_weights

        path = Path(path)
        config = read_json(path / "adapter_config.json")
        _check_streamable(config, path)
        try:
            state = load_peft_weights(str(path), device="cpu")
        except Exception as exc:
            raise UserError(f"{path}: cannot read the adapter weights ({str(exc).splitlines()[0][:160]})") from None
        adapter = cls(path, config, nbytes=sum(t.numel() * t.element_size() for t in state.values()))
        adapter._parse(state)
        return adapter

    def _parse(self, state: dict) -> None:
        parts: dict[str, dict] = {}
        for key, tensor in state.items():
            name = key[len(ADAPTER_PREFIX):] if key.startswith(ADAPTER_PREFIX) else key
            module, kind = _split_lora_key(name, self.path)
            if kind is None:
                if ".base_layer." not in name:  # base_layer: a copy of the base embedding peft saves too
                    self.replacements[name] = tensor
                continue
            parts.setdefault(module, {})[kind] = tensor
        for module, p in parts.items():
            self.layers[module + ".weight"] = self._layer(module, p)

    def _layer(self, module: str, p: dict) -> LoraLayer:
        embedding = "embedding_A" in p
        a, b = (p.get("embedding_A"), p.get("embedding_B")) if embedding else (p.get("A"), p.get("B"))
        if a is None or b is None:
            raise UserError(f"{self.path}: {module} has only half of its LoRA weights; the adapter file is damaged")
        if embedding and "magnitude" in p:
            raise NotStreamable(f"{self.path}: DoRA on the embedding layer ({module}) is not supported by the "
                                f"low-memory merge")
        return LoraLayer(a, b, self._scaling(module, a.shape[0]), p.get("magnitude"), embedding)

    def _scaling(self, module: str, rank: int) -> float:
        from peft.utils.other import get_pattern_key

        alphas = self.config.get("alpha_pattern") or {}
        alpha = alphas.get(get_pattern_key(alphas.keys(), module), self.config.get("lora_alpha", 8))
        return alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank

    def merge(self, name: str, weight):
        """The merged value of one base tensor (fp32 in, fp32 out)."""
        if name in self.replacements:
            return self.replacements[name].float()
        layer = self.layers.get(name)
        return layer.merge_into(weight) if layer is not None else weight

    def touched(self) -> set[str]:
        return set(self.layers) | set(self.replacements)


def _split_lora_key(name: str, where: Path) -> tuple[str, str | None]:
    suffixes = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_embedding_A": "embedding_A",
                ".lora_embedding_B": "embedding_B", ".lora_magnitude_vector": "magnitude",
                ".lora_magnitude_vector.weight": "magnitude"}
    for suffix, kind in suffixes.items():
        if name.endswith(suffix):
            return name[: -len(suffix)], kind
    if ".lora_" in name:
        raise NotStreamable(f"{where}: adapter tensor {name} is of a LoRA variant the low-memory merge "
                            f"does not handle")
    return name, None


def _check_streamable(config: dict, path: Path) -> None:
    """Refuse, with the way out, what the tensor-by-tensor merge does not reproduce exactly."""
    where = path / "adapter_config.json"
    if config.get("peft_type", "LORA") != "LORA":
        raise NotStreamable(f"{where}: peft_type {config.get('peft_type')} is not LoRA, which the low-memory "
                            f"merge handles only")
    unsupported = [key for key in ("fan_in_fan_out", "lora_bias", "trainable_token_indices", "layer_replication",
                                   "use_qalora", "alora_invocation_tokens", "target_parameters")
                   if config.get(key)]
    if unsupported:
        raise NotStreamable(f"{where}: `{unsupported[0]}` is not supported by the low-memory merge")


# -- the merged view -------------------------------------------------------------------------
@dataclass
class MergedModel:
    """Merged weights, tensor by tensor, in the base's layout; plus the config to write with them."""

    shards: dict[str, list[str]]
    shapes: dict[str, tuple[int, ...]]
    config: dict
    get: Callable[[str], object]  # name -> fp32 tensor
    base_dir: Path

    def names(self) -> list[str]:
        return [n for names in self.shards.values() for n in names]


def streamed_merge(base: BaseCheckpoint, adapter: Adapter | None, roundtrip=None) -> MergedModel:
    """The low-memory merge: each tensor is read, merged and handed on alone."""
    shards = {f: list(n) for f, n in base.shards.items()}
    shapes = dict(base.shapes)
    config = dict(base.config)
    sources = {n: n for n in base.shapes}  # output name -> base tensor it starts from
    if adapter is not None:
        _check_targets(adapter, base)
        _untie_if_needed(adapter, base, shards, shapes, config, sources)

    def get(name: str):
        weight = base.get(sources[name]).float()
        if roundtrip is not None:
            weight = roundtrip(sources[name], weight)
        return adapter.merge(name, weight) if adapter is not None else weight

    return MergedModel(shards, shapes, config, get, base.path)


def _check_targets(adapter: Adapter, base: BaseCheckpoint) -> None:
    tied = LM_HEAD not in base.shapes  # the checkpoint stores one matrix for both
    for name in sorted(adapter.touched()):
        if name == LM_HEAD and tied and name in adapter.layers:
            raise NotStreamable(f"{adapter.path}: the adapter has LoRA on lm_head, which shares its weights "
                                f"with the embeddings in this model")
        if name not in base.shapes and not (name == LM_HEAD and tied):
            raise UserError(f"{adapter.path}: adapter weight for {name} has no tensor in base model {base.path}; "
                            f"load the adapter on the base it was trained on")
        if name in adapter.replacements and name in base.shapes \
                and tuple(adapter.replacements[name].shape) != base.shapes[name]:
            raise NotStreamable(f"{adapter.path}: {name} has shape {tuple(adapter.replacements[name].shape)} but "
                                f"the base has {base.shapes[name]} (resized vocabulary?)")


def _is_tied(config: dict) -> bool:
    return bool(config.get("tie_word_embeddings", config.get("text_config", {}).get("tie_word_embeddings", False)))


def _untie_if_needed(adapter: Adapter, base: BaseCheckpoint, shards, shapes, config, sources) -> None:
    """A tied model whose lm_head or embeddings were trained as modules_to_save has two different
    matrices after the merge: write lm_head as its own tensor and untie."""
    embed = next((n for n in EMBED_NAMES if n in base.shapes), None)
    if LM_HEAD in base.shapes or embed is None:
        return
    trained = [n for n in (LM_HEAD, embed) if n in adapter.replacements]
    if not trained or all(adapter.replacements[n].float().equal(base.get(embed).float()) for n in trained):
        return
    shards[base.file_of[embed]].append(LM_HEAD)
    shapes[LM_HEAD] = base.shapes[embed]
    sources[LM_HEAD] = embed
    config["tie_word_embeddings"] = False


def inmemory_merge(spec, model_cfg, compute_dtype: str, base: BaseCheckpoint | None, roundtrip=None) -> MergedModel:
    """The default merge: peft's own merge_and_unload on the whole model."""
    import torch
    from transformers import AutoModelForCausalLM

    from nekotune.model import attach_adapter

    kwargs = {"dtype": _torch_dtype(compute_dtype), "trust_remote_code": model_cfg.trust_remote_code}
    try:
        model = AutoModelForCausalLM.from_pretrained(spec.base, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load model {spec.base} ({str(exc).splitlines()[0]})") from None
    if roundtrip is not None:
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(roundtrip(name, param.float()).to(param.dtype))
    merged = attach_adapter(model, spec).merge_and_unload()
    state = merged.state_dict()
    config = merged.config.to_dict()
    if base is None:  # .bin checkpoints: shard by size instead of copying a layout
        shards = {"model.safetensors": [n for n in state if not _is_tied_copy(n, config, state)]}
    else:
        shards = {f: list(n) for f, n in base.shards.items()}
        config = dict(base.config)
        _keep_untied_head(shards, state, base, config)
    shapes = {n: tuple(state[n].shape) for names in shards.values() for n in names}
    missing = [n for n in shapes if n not in state]
    if missing:
        raise RuntimeError(f"merged model has no tensor {missing[0]} of the base checkpoint")
    return MergedModel(shards, shapes, config, lambda n: state[n].float(), Path(spec.base))


def _is_tied_copy(name: str, config: dict, state: dict) -> bool:
    return name == LM_HEAD and _is_tied(config) and any(n in state for n in EMBED_NAMES)


def _keep_untied_head(shards, state, base: BaseCheckpoint, config) -> None:
    """modules_to_save on a tied head leaves lm_head different from the embeddings: keep both."""
    embed = next((n for n in EMBED_NAMES if n in base.shapes), None)
    if LM_HEAD in base.shapes or embed is None or LM_HEAD not in state:
        return
    if state[LM_HEAD].data_ptr() != state[embed].data_ptr() and not state[LM_HEAD].equal(state[embed]):
        shards[base.file_of[embed]].append(LM_HEAD)
        config["tie_word_embeddings"] = False


# -- QLoRA bases ------------------------------------------------------------------------------
def quantized_roundtrip(run_config: dict, console) -> Callable | None:
    """For an adapter trained on a 4-bit base: NF4-round the linear weights as training saw them."""
    quant = (run_config.get("model") or {}).get("quantization")
    if not quant:
        return None
    try:
        import bitsandbytes.functional as bnbf
        import torch

        if quant != "4bit" or not torch.cuda.is_available():
            raise ImportError
    except ImportError:
        console.print(f"[yellow]note:[/] the adapter was trained on a {quant} base; merging into the original "
                      f"full-precision weights (the {quant} round trip needs bitsandbytes and a CUDA GPU). "
                      f"Check the result with `nekotune export verify`.")
        return None

    def roundtrip(name: str, weight):
        if weight.ndim != 2 or not name.endswith(".weight") or "embed" in name or name == LM_HEAD:
            return weight
        packed, state = bnbf.quantize_4bit(weight.to("cuda", torch.bfloat16), quant_type="nf4",
                                           compress_statistics=True)
        return bnbf.dequantize_4bit(packed, state).float().cpu()

    return roundtrip


# -- writing ---------------------------------------------------------------------------------
def write_safetensors(path: Path, names: list[str], shapes: dict, dtype: str, get: Callable,
                      on_tensor: Callable[[str], None] = lambda name: None) -> None:
    """Stream tensors into a safetensors file, one at a time: the header is known up front
    (merging keeps shapes), so no shard-sized buffer is ever built."""
    import torch

    itemsize = torch.empty((), dtype=_torch_dtype(dtype)).element_size()
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
            tensor = get(name).to(_torch_dtype(dtype)).contiguous()
            if tuple(tensor.shape) != tuple(shapes[name]):
                raise RuntimeError(f"{name}: merged shape {tuple(tensor.shape)} != {shapes[name]}")
            fh.write(tensor.view(torch.uint8).numpy().data)
            on_tensor(name)


def write_merged(merged: MergedModel, out: Path, dtype: str, console) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    total = 0
    with Progress(TextColumn("merging"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("merge", total=len(merged.names()))
        for file, names in merged.shards.items():
            write_safetensors(out / file, names, merged.shapes, dtype, merged.get,
                              on_tensor=lambda name: bar.advance(task))
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


def _write_merge_info(out: Path, spec, cfg, dtype: str, low_memory: bool) -> None:
    info = {"base": spec.base, "adapter": spec.adapter, "run": spec.run_dir, "dtype": dtype,
            "low_memory": low_memory, "system_prompt": cfg.data.system_prompt,
            "enable_thinking": cfg.data.enable_thinking}
    (out / MERGE_INFO).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def source_paths(spec, base_dir: Path | None = None, model_arg: str | None = None) -> list[Path]:
    """What a merge or export reads (run, adapter, base model directory, a .gguf given as --model):
    its output may be none of them, inside none and above none."""
    paths = [Path(p) for p in (spec.run_dir, spec.adapter, spec.base, model_arg) if p and Path(p).exists()]
    return paths + ([base_dir] if base_dir is not None else [])


def open_merged(spec, cfg, low_memory: bool = True, compute_dtype: str | None = None, console=None) -> MergedModel:
    """The merged weights of `spec` (base alone when it has no adapter), tensor by tensor."""
    from rich.console import Console

    console = console or Console(stderr=True)
    base_dir = local_model_dir(spec.base, cfg.model.revision)
    roundtrip = quantized_roundtrip(spec.run_config, console) if spec.adapter else None
    if spec.adapter is None or low_memory:
        base = BaseCheckpoint.open(base_dir)
        return streamed_merge(base, Adapter.load(spec.adapter) if spec.adapter else None, roundtrip)
    base = BaseCheckpoint.open(base_dir) if _has_safetensors(base_dir) else None
    dtype = compute_dtype or (base.weights_dtype if base else "float32")
    return inmemory_merge(spec, cfg.model, dtype, base, roundtrip)


def _has_safetensors(path: Path) -> bool:
    return (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()


def merge_command(cfg, model_arg: str | None, out: str, low_memory: bool = False, dtype: str | None = None) -> Path:
    from rich.console import Console

    from nekotune.data.render import Renderer
    from nekotune.io import atomic_dir, claim_output_dir
    from nekotune.model import load_tokenizer

    console = Console(stderr=True)
    from nekotune.model import resolve_source

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
    base_dtype = BaseCheckpoint.open(base_dir).weights_dtype if _has_safetensors(base_dir) else "float32"
    out_dtype = DTYPES[dtype] if dtype else base_dtype
    # Merging happens in fp32 unless base and output are both half precision: then in that precision,
    # as peft does, which halves the memory of the default mode.
    compute = base_dtype if base_dtype == out_dtype and base_dtype != "float32" else "float32"
    merged = open_merged(spec, cfg, low_memory=low_memory, compute_dtype=compute, console=console)
    with atomic_dir(out_path, WRITTEN_BY) as tmp:
        total = write_merged(merged, tmp, out_dtype, console)
        _write_config(merged, tmp, out_dtype)
        _write_generation_config(merged.base_dir, tmp, merged.config, renderer)
        tokenizer.save_pretrained(tmp)
        _write_merge_info(tmp, spec, cfg, out_dtype, low_memory)
    console.print(f"merged {spec.adapter} into {spec.base}\n-> {out_path} ({len(merged.shards)} shard"
                  f"{'s' if len(merged.shards) > 1 else ''}, {_size(total)}, {out_dtype}"
                  f"{', low-memory' if low_memory else ''})", soft_wrap=True)
    return out_path


def _size(nbytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1024 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} GB"
