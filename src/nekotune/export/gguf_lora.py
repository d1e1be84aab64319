"""A PEFT LoRA adapter as llama.cpp's LoRA GGUF, in pure Python (`gguf` writes, nekotune maps).

llama.cpp loads a base GGUF once and applies such files without merging: per request in the
server, or as Ollama's ADAPTER. What the format needs (llama.cpp's llama-adapter.cpp and
convert_lora_to_gguf.py):
- `general.type = adapter`, `adapter.type = lora`, the base's architecture string, and
  `adapter.lora.alpha`; llama.cpp scales each pair by alpha / rank (rank read per tensor), or
  by 1 when alpha is 0;
- `<base tensor name>.lora_a` = PEFT's A [r, in] and `.lora_b` = B [out, r], in torch order;
  the names come from the model export's own name map (export/gguf.py), so they match the base;
- Llama-family Q/K rows are in llama.cpp's rotary order in the base, and the rows of B*A are the
  rows of B: B is permuted as the base weight is, A is not;
- embeddings: llama.cpp looks rows up in lora_a, so A is stored transposed [vocab, r].

rsLoRA, rank_pattern and alpha_pattern give tensors scales no single alpha expresses; then each
tensor's own PEFT scale is folded into B and alpha is written as 0.

Refused, with the way out (merge): DoRA (the format has no magnitude), modules_to_save (no full
tensors), and LoRA on the embeddings or lm_head of a model with tied embeddings: llama.cpp uses
token_embd as the output matrix there and would apply the embedding LoRA to that matmul too,
which aborts the whole process (GGML_ASSERT), so it is refused before anything is loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nekotune.errors import UserError

WRITTEN_BY = "nekotune export gguf-lora"
SHA_KEY = "nekotune.adapter.sha256"
DTYPES = ("f16", "f32")  # q8_0 needs rows of 32; lora_b rows are r long
# Adapter settings llama.cpp's LoRA has no form for (merge.py's low-memory list, plus DoRA and
# modules_to_save); a LoRA GGUF of such an adapter would silently answer differently.
UNSUPPORTED_KEYS = ("use_dora", "modules_to_save", "fan_in_fan_out", "lora_bias", "trainable_token_indices",
                    "layer_replication", "use_qalora", "alora_invocation_tokens", "target_parameters")
EMBEDDING_MODULES = ("embed_tokens", "lm_head")
# Architectures whose Ollama runner applies ADAPTER (llama.cpp runner). Ollama runs qwen3, gemma3
# and others on its own engine, which fails at load with "loras are not yet implemented".
OLLAMA_ADAPTER_ARCHS = frozenset({"llama", "qwen2"})


@dataclass(frozen=True)
class LoraGGUF:
    path: Path
    arch: str
    tensors: int  # LoRA pairs written
    folded: bool  # per-tensor scales folded into lora_b (alpha written as 0)
    alpha: float


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object; the file is damaged")
    return data


def _is_tied(base_config: dict) -> bool:
    return bool(base_config.get("tie_word_embeddings", False))


def check_exportable(adapter_dir: Path, base_config: dict) -> dict:
    """Refuse, from the configs alone, what a LoRA GGUF cannot carry; returns the adapter config."""
    from nekotune.export.gguf import architecture

    where = adapter_dir / "adapter_config.json"
    config = _read_json(where)
    architecture(base_config)  # an architecture the model export does not write has no base GGUF either
    if config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{where}: peft_type {config.get('peft_type')} is not LoRA; llama.cpp applies LoRA "
                        f"adapters only (merge it: nekotune export gguf --model {adapter_dir})")
    for key in UNSUPPORTED_KEYS:
        if config.get(key):
            what = "DoRA" if key == "use_dora" else f"`{key}`"
            raise UserError(f"{where}: {what} has no llama.cpp LoRA GGUF form; export the merged model "
                            f"instead: nekotune export gguf --model {adapter_dir}")
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise UserError(f"{adapter_dir} has no adapter_model.safetensors; nekotune reads adapters from "
                        f"safetensors only (convert the .bin with peft, or retrain)")
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    if _is_tied(base_config) and any(t.split(".")[-1] in EMBEDDING_MODULES for t in targets):
        raise UserError(_tied_message(where))
    return config


def _tied_message(where: Path) -> str:
    return (f"{where}: LoRA on the embeddings or lm_head of a model with tied embeddings has no llama.cpp "
            f"form (llama.cpp would apply it to the output matrix too and abort); export the merged model "
            f"instead: nekotune export gguf --model {where.parent}")


def lora_pairs(adapter, base_config: dict, arch: str) -> tuple[list[tuple[str, Any, Any]], float | None]:
    """[(GGUF base tensor name, lora_a, lora_b)] as float32 torch tensors, and the one alpha that
    expresses every tensor's scale (None: scales folded into lora_b)."""
    from nekotune.export.gguf import gguf_tensors, prepare_tensor

    tied = _is_tied(base_config)
    for hf_name, layer in adapter.layers.items():
        if layer.magnitude is not None:
            raise UserError(f"{adapter.path}: {hf_name} is DoRA, which has no llama.cpp LoRA GGUF form; export "
                            f"the merged model instead")
        if tied and (layer.embedding or hf_name.startswith("lm_head.")):
            raise UserError(_tied_message(adapter.path / "adapter_config.json"))
    if adapter.replacements:
        raise UserError(f"{adapter.path}: full tensors ({sorted(adapter.replacements)[0]}, modules_to_save) have "
                        f"no llama.cpp LoRA GGUF form; export the merged model instead")
    alphas = {round(layer.scaling * layer.a.shape[0], 6) for layer in adapter.layers.values()}
    alpha = alphas.pop() if len(alphas) == 1 and not adapter.config.get("use_rslora") else None
    # export/gguf's name map and rules (skips, errors) on the adapter's target tensors, untied for the lookup
    view = _NameView(list(adapter.layers), {n: tuple(layer.b.shape) for n, layer in adapter.layers.items()})
    names = {hf: g for hf, g, _ in gguf_tensors(view, {**base_config, "tie_word_embeddings": False}, arch)}
    pairs = []
    for hf_name, layer in adapter.layers.items():
        a, b = layer.a.float(), layer.b.float()
        if alpha is None:
            b = b * layer.scaling
        if layer.embedding:
            a = a.T.contiguous()  # llama.cpp: get_rows(lora_a, ids), then lora_b times that
        else:
            b = prepare_tensor(b, hf_name, base_config)  # the base weight's rotary row order
        pairs.append((names[hf_name], a, b))
    return pairs, alpha


@dataclass
class _NameView:
    """The two attributes export.gguf.gguf_tensors reads from a merged model."""

    tensor_names: list[str]
    shapes: dict

    def names(self) -> list[str]:
        return self.tensor_names


def write_lora_gguf(adapter_dir: str | Path, base_config: dict, out: str | Path, dtype: str = "f16",
                    name: str | None = None) -> LoraGGUF:
    """Convert the PEFT adapter in `adapter_dir` (trained on the model `base_config` describes) to `out`."""
    import gguf
    import numpy as np

    from nekotune.export.gguf import WRITTEN_BY_KEY, architecture
    from nekotune.export.gguf_cache import file_digest
    from nekotune.io import atomic_file
    from nekotune.weights import Adapter

    if dtype not in DTYPES:
        raise UserError(f"LoRA GGUF type {dtype} is not one of {', '.join(DTYPES)}")
    adapter_dir, out = Path(adapter_dir), Path(out)
    check_exportable(adapter_dir, base_config)
    arch = architecture(base_config)
    adapter = Adapter.load(adapter_dir)
    pairs, alpha = lora_pairs(adapter, base_config, arch)
    np_dtype = np.float16 if dtype == "f16" else np.float32
    with atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(tmp, arch=arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0 if alpha is None else float(alpha))
        writer.add_name(name or adapter_dir.name)
        writer.add_string(WRITTEN_BY_KEY, WRITTEN_BY)
        writer.add_string(SHA_KEY, file_digest(adapter_dir / "adapter_model.safetensors"))
        for gguf_name, a, b in pairs:
            writer.add_tensor(gguf_name + ".lora_a", a.numpy().astype(np_dtype))
            writer.add_tensor(gguf_name + ".lora_b", b.numpy().astype(np_dtype))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return LoraGGUF(out, arch, len(pairs), alpha is None, 0.0 if alpha is None else float(alpha))


def cached_lora_gguf(adapter_dir: str | Path, base_dir: str | Path, dtype: str = "f16") -> Path:
    """The LoRA GGUF of `adapter_dir` from nekotune's cache, converted on first use."""
    from nekotune.export.gguf_cache import cached_gguf

    adapter_dir, base_dir = Path(adapter_dir), Path(base_dir)
    base_config = _read_json(base_dir / "config.json")
    check_exportable(adapter_dir, base_config)  # refusals before any hashing or conversion
    sources = [adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors",
               base_dir / "config.json"]

    def build(tmp: Path) -> None:
        write_lora_gguf(adapter_dir, base_config, tmp, dtype, name=adapter_dir.name)

    return cached_gguf("lora", sources, {"dtype": dtype}, build, slot=str(adapter_dir.resolve()))


def export_lora(cfg, model_arg: str | None, out: str | Path, dtype: str = "f16") -> LoraGGUF:
    """`nekotune export gguf-lora --model RUN --out neko-lora.gguf`: the run's adapter as a LoRA GGUF
    for the base it was trained on (write that base with `nekotune export gguf` on the base model)."""
    from nekotune.export.gguf import written_by_nekotune
    from nekotune.io import check_output_file
    from nekotune.model import resolve_source
    from nekotune.weights import local_model_dir, source_paths

    out = Path(out).expanduser()
    if out.suffix != ".gguf" or out.is_dir():
        raise UserError(f"--out {out} should name a .gguf file, e.g. --out neko-lora.gguf")
    spec, cfg = resolve_source(cfg, model_arg)
    if not spec.adapter:
        raise UserError(f"--model {model_arg or spec.base} holds no LoRA adapter; export gguf-lora converts a run or "
                        f"adapter directory (a whole model: nekotune export gguf)")
    base_dir = local_model_dir(spec.base, cfg.model.revision)
    check_output_file(out, source_paths(spec, base_dir, model_arg), ours=written_by_nekotune)
    return write_lora_gguf(spec.adapter, _read_json(base_dir / "config.json"), out, dtype,
                           name=Path(spec.run_dir or spec.adapter).name)


def ollama_takes_adapter(arch: str) -> bool:
    """Whether Ollama applies a LoRA GGUF (ADAPTER line) on this architecture; otherwise merge."""
    return arch in OLLAMA_ADAPTER_ARCHS
