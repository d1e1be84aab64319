"""The GGUF files the llama.cpp engine runs, converted once and cached by content (export/gguf_cache).

Two shapes, both answering as the run does:
- base GGUF + one LoRA GGUF per adapter: the base loads once and adapters switch per request
  (the server, `--adapter NAME=PATH`, compare);
- one merged GGUF: no LoRA matmuls per token, so decoding runs at the bare model's speed
  (single-adapter chat and predict); DoRA and modules_to_save adapters only go this way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from nekotune.errors import UserError

SMALL_MODEL = 1_000_000_000  # parameters; below it q8_0 costs little and keeps answers closest to fp32


@dataclass(frozen=True)
class LlamaCppFiles:
    model: Path  # the base GGUF, or the merged one
    gguf_type: str
    merged: bool
    adapters: dict[str, Path] = field(default_factory=dict)  # name -> LoRA GGUF
    renderer: Any = None  # the Renderer the run trained with (effective config): prompts and stop ids
    cfg: Any = None  # the effective config (the run's generate settings under the user's)


def default_gguf_type(n_params: int) -> str:
    """q8_0 under 1B parameters (the issue's default); q4_k_m above, llama.cpp's usual CPU choice."""
    return "q8_0" if n_params < SMALL_MODEL else "q4_k_m"


def count_parameters(base_dir: Path) -> int:
    from nekotune.weights import BaseCheckpoint

    return sum(math.prod(shape) for shape in BaseCheckpoint.open(base_dir).shapes.values())


def check_fits(adapter_dir: str | Path, base_dir: Path, base_label: str) -> None:
    """An adapter trained on another base is refused in one line before any conversion, as the
    transformers engine refuses it (the GGUF writer would otherwise fail on a tensor's size)."""
    from nekotune.weights import Adapter, BaseCheckpoint, NotStreamable

    try:
        adapter = Adapter.load(adapter_dir)
    except NotStreamable:
        return  # merged in memory by peft, which says itself what does not fit
    shapes = BaseCheckpoint.open(base_dir).shapes
    wanted = {name: (layer.a.shape[1], layer.b.shape[0]) if layer.embedding else (layer.b.shape[0], layer.a.shape[1])
              for name, layer in adapter.layers.items()}
    wanted.update({name: tuple(t.shape) for name, t in adapter.replacements.items()})
    for name, shape in wanted.items():
        if tuple(shapes.get(name, ())) != tuple(shape):
            found = f"shape {tuple(shapes[name])}" if name in shapes else "no such tensor"
            raise UserError(f"adapter {adapter_dir} does not fit base model {base_label} ({name}: adapter "
                            f"{tuple(shape)}, base {found}); load it on the base it was trained on")


def _model_gguf(source, gguf_type: str, merged: bool, revision: str | None) -> Path:
    from nekotune.export.gguf import export_gguf
    from nekotune.export.gguf_cache import cached_gguf, model_files
    from nekotune.weights import local_model_dir

    spec: Any = source.spec
    sources = model_files(local_model_dir(spec.base, revision))
    if merged and spec.adapter:
        sources += model_files(spec.adapter)
    # The template and special tokens written into the file: llama_cpp.server and Ollama read them.
    params = {"type": gguf_type, "merged": bool(merged and spec.adapter), "template": source.renderer.template}
    slot = str(Path(spec.adapter).resolve()) if merged and spec.adapter else str(Path(spec.base).resolve())

    def build(tmp: Path) -> None:
        written = export_gguf(source, tmp, gguf_type)
        if written != gguf_type:
            raise UserError(f"GGUF type {gguf_type} needs llama.cpp's quantizer; pick q8_0 or f16")

    return cached_gguf("merged" if params["merged"] else "base", sources, params, build, slot=slot)


def llamacpp_files(cfg, model_arg: str | None, gguf_type: str = "auto", merge: bool = False,
                   adapters: Sequence[tuple[str, str]] = ()) -> LlamaCppFiles:
    """Cached GGUFs for `--model` (a run, adapter, merged or HF directory) and extra `adapters`
    [(name, adapter directory)]. `merge`: one merged GGUF instead of base + LoRA (no extra adapters)."""
    from dataclasses import replace

    from nekotune.export.gguf import prepare
    from nekotune.export.gguf_lora import cached_lora_gguf
    from nekotune.weights import local_model_dir

    source = prepare(cfg, model_arg)
    spec: Any = source.spec
    effective: Any = source.cfg
    revision = effective.model.revision
    base_dir = local_model_dir(spec.base, revision)
    if gguf_type == "auto":
        gguf_type = default_gguf_type(count_parameters(base_dir))
    if spec.adapter:
        check_fits(spec.adapter, base_dir, spec.base)
    if merge:
        if adapters:
            raise UserError("a merged GGUF holds one adapter; serve extra adapters on base + LoRA GGUFs")
        return LlamaCppFiles(_model_gguf(source, gguf_type, True, revision), gguf_type, True,
                             renderer=source.renderer, cfg=source.cfg)
    from nekotune.model import ModelSource, resolve

    base_source = replace(source, spec=ModelSource(base=spec.base))
    model = _model_gguf(base_source, gguf_type, False, revision)
    loras: dict[str, Path] = {}
    if spec.adapter:
        from nekotune.serve.pool import safe_name

        loras[safe_name(Path(spec.run_dir or spec.adapter).name)] = cached_lora_gguf(spec.adapter, base_dir)
    for name, path in adapters:
        if name in loras:
            raise UserError(f"model name {name!r} is used twice; give each --adapter its own NAME")
        aspec = resolve(path, outputs_root=cfg.output.root)
        if not aspec.adapter:
            raise UserError(f"--adapter {name}={path}: {path} holds no LoRA adapter (no adapter_config.json)")
        check_fits(aspec.adapter, base_dir, spec.base)
        loras[name] = cached_lora_gguf(aspec.adapter, base_dir)
    return LlamaCppFiles(model, gguf_type, False, loras, renderer=source.renderer, cfg=source.cfg)


def open_llamacpp(cfg, model_arg: str | None, gguf_type: str = "auto", merge: bool = False,
                  adapters: Sequence[tuple[str, str]] = (), options=None):
    """(engine, files): the llama.cpp engine on `--model`'s cached GGUFs, its adapters loaded."""
    from nekotune.engines.llamacpp import LlamaCppEngine

    files = llamacpp_files(cfg, model_arg, gguf_type, merge, adapters)
    engine = LlamaCppEngine(files.model, files.renderer.tokenizer, files.adapters, options)
    return engine, files
