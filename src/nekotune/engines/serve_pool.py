"""`nekotune serve` on the llama.cpp engine: the base GGUF loaded once, each adapter a LoRA GGUF
applied per request by the name the client sends (the same names, renderers and defaults as the
transformers pool in serve/pool.py, so a client cannot tell the engines apart by their API)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from nekotune.config import Config
from nekotune.errors import UserError
from nekotune.generate import GenSettings
from nekotune.serve.pool import BASE_ALIAS, Entry, ModelPool, adapter_sources, entry_renderer, safe_name


def load_llamacpp_pool(cfg: Config, model_arg: str | None, adapters: Sequence[tuple[str, str]],
                       options: Any = None) -> ModelPool:
    """One llama.cpp model (cached base GGUF) with every adapter as a cached LoRA GGUF on it."""
    from nekotune.engines.gguf_files import llamacpp_files
    from nekotune.engines.llamacpp import LlamaCppEngine
    from nekotune.model import effective_config, resolve_source

    spec, served_cfg = resolve_source(cfg, model_arg)
    named = adapter_sources(spec, list(adapters), cfg.output.root)
    names = [name for name, _ in named]
    if len(set(names)) != len(names) or BASE_ALIAS in names:
        raise UserError("a model name is used twice; give each --adapter its own NAME")
    extra = [(name, aspec.adapter or "") for name, aspec in named if aspec is not spec]
    files = llamacpp_files(cfg, model_arg, served_cfg.generate.gguf_type, merge=False, adapters=extra)
    tokenizer = files.renderer.tokenizer
    engine = LlamaCppEngine(files.model, tokenizer, files.adapters, options)
    try:
        base = Entry(safe_name(f"base-{Path(spec.base.rstrip('/')).name}"), None, entry_renderer(tokenizer, served_cfg),
                     GenSettings.from_config(served_cfg.generate), spec.base)
        entries = [base]
        for name, aspec in named:
            ecfg = served_cfg if aspec is spec else effective_config(cfg, aspec)
            entries.append(Entry(name, name, entry_renderer(tokenizer, ecfg), GenSettings.from_config(ecfg.generate),
                                 aspec.label))
    except BaseException:
        engine.close()
        raise
    return ModelPool(None, tokenizer, entries, engine.n_ctx, engine=engine)
