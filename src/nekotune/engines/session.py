"""The engine a command generates with: `generate.engine` (or --engine) resolved against this
machine and this model, opened once, and used through Conversations.

Every engine gets the same prompt ids (the Renderer's, never text it would template again), the
same stop ids and the same GenSettings; the Session is the one place that turns a Conversation
into those, so chat, ask, predict, eval, compare and the UI cannot drift apart per engine.

Which engine was picked and why is a note on the "nekotune" logger, which the command layer
prints ("engine: llama.cpp (auto: CPU, llama-cpp-python installed)").
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from nekotune.config import Config
from nekotune.data.formats import Conversation
from nekotune.engines.base import Engine
from nekotune.engines.choose import Choice, llamacpp_refusal, pick_engine
from nekotune.errors import UserError
from nekotune.generate import GenSettings
from nekotune.model.source import ModelSource

log = logging.getLogger(__name__)


@dataclass
class Session:
    engine: Engine
    renderer: Any  # the Renderer the model trained with: prompt ids and stop ids for every engine
    cfg: Config  # the effective config (the run's prompt and sampling settings under the user's)
    source: ModelSource
    choice: Choice
    adapter: str | None = None  # the adapter name the engine applies per call (None: the engine's default)
    loaded: Any = None  # the transformers model (model.Loaded) when the engine is transformers

    @property
    def label(self) -> str:
        return self.source.label

    def settings(self, **overrides: Any) -> GenSettings:
        return GenSettings.from_config(self.cfg.generate, **overrides)

    def prompt_ids(self, conv: Conversation) -> list[int]:
        return list(self.renderer.prompt_ids(conv))

    @property
    def _images(self) -> bool:
        """A vision-language model (transformers only): pixels travel beside the ids, so its
        conversations go through generate.py with the model's own renderer (issue 17)."""
        return self.loaded is not None and bool(getattr(self.renderer, "takes_images", False))

    def stream(self, conv: Conversation, settings: GenSettings, stop: threading.Event | None = None,
               adapter: str | None = None) -> Iterator[str]:
        if self._images:
            from nekotune.generate import stream

            return stream(self.loaded.model, self.renderer, conv, settings, stop=stop)
        return self.engine.stream(self.prompt_ids(conv), settings, self.renderer.stop_token_ids, stop,
                                  adapter=adapter or self.adapter)

    def generate(self, conv: Conversation, settings: GenSettings) -> str:
        return self.generate_batch([conv], settings)[0]

    def generate_batch(self, convs: Sequence[Conversation], settings: GenSettings, batch_size: int | None = None,
                       on_batch: Callable[[int], None] | None = None, base: bool = False) -> list[str]:
        """Answers in input order; `base`: the bare base model (needs an engine that switches adapters)."""
        adapter = None if base else self.adapter
        if base and self.adapter is None and self.source.adapter:
            raise ValueError("this session cannot answer as the base model (open it with merge=False)")
        if self._images and not base:
            from nekotune.generate import generate_batch

            return generate_batch(self.loaded.model, self.renderer, list(convs), settings,
                                  batch_size=batch_size or self.cfg.generate.batch_size, on_batch=on_batch)
        return self.engine.generate_batch([self.prompt_ids(c) for c in convs], settings, self.renderer.stop_token_ids,
                                          adapter=adapter, batch_size=batch_size or self.cfg.generate.batch_size,
                                          on_batch=on_batch)

    def describe(self) -> str:
        describe = getattr(self.engine, "describe", None)
        return describe() if describe else self.choice.name

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def choose(cfg: Config, source: ModelSource, serving: bool = False, lora: bool = False) -> Choice:
    """generate.engine for this model on this machine (auto resolved); note() says it.
    `lora`: the adapter would run as a LoRA GGUF (not merged), which some adapters have no form for."""
    from nekotune.model import pick_device

    requested = cfg.generate.engine
    device = pick_device(cfg.model.device)
    refusal = _refusal(cfg, source, lora) if requested in ("auto", "llama.cpp") else None
    return pick_engine(requested, device, serving=serving, llamacpp_refusal=refusal)


def note(choice: Choice, detail: str | None = None) -> None:
    """The one line that says which engine runs, logged once it has loaded (so that a model that
    fails to load still fails with one line)."""
    log.warning("engine: %s (%s)%s", choice.name, choice.reason, f"; {detail}" if detail else "")


def _refusal(cfg: Config, source: ModelSource, lora: bool) -> str | None:
    """Why llama.cpp cannot run this model, from its config files alone."""
    from pathlib import Path

    from nekotune.errors import UserError
    from nekotune.export.gguf_lora import check_exportable
    from nekotune.io import read_json
    from nekotune.weights import local_model_dir

    if source.adapter:
        adapter_config = read_json(f"{source.adapter}/adapter_config.json")
    else:
        adapter_config = None
    model_config = read_json(local_model_dir(source.base, cfg.model.revision) / "config.json")
    why = llamacpp_refusal(model_config, adapter_config, trust_remote_code=cfg.model.trust_remote_code,
                           quantization=cfg.model.quantization)
    if why is None and lora and source.adapter:
        try:  # DoRA, modules_to_save, embedding LoRA on a tied model: only a merged GGUF holds those
            check_exportable(Path(source.adapter), model_config)
        except UserError as exc:
            why = str(exc).split(";")[0]
    return why


def text_model_error(label: str) -> UserError:
    return UserError(f"--image needs a vision-language model (Qwen2-VL, Qwen2.5-VL, Qwen3-VL); {label} is a text model")


def open_session(cfg: Config, model_arg: str | None, merge: bool = True,
                 adapters: Sequence[tuple[str, str]] = (), images: bool = False) -> Session:
    """The model `model_arg` names on the engine generate.engine picks.

    llama.cpp, `merge` (chat, ask, predict): one cached merged GGUF, no LoRA matmuls per token;
    otherwise the cached base GGUF with the adapter as a LoRA GGUF, applied per call (eval's
    baseline, compare, extra `adapters`). `images`: the caller has images for it, so a text
    model is refused before anything loads or converts."""
    from nekotune.model import resolve_source
    from nekotune.model.load import is_vision_model, require_safetensors_adapter

    source, effective = resolve_source(cfg, model_arg)
    if source.adapter:  # before any engine reads the adapter (a GGUF conversion included)
        require_safetensors_adapter(source.adapter)
    if images and not is_vision_model(source, effective.model):
        raise text_model_error(source.label)
    choice = choose(effective, source, lora=not merge or bool(adapters))
    if choice.name == "llama.cpp":
        session = _open_llamacpp(cfg, model_arg, source, effective, choice, merge and not adapters, adapters)
    else:
        session = _open_transformers(effective, source, choice)
    note(choice, session.describe() if choice.name != "transformers" else None)
    return session


def _open_transformers(effective: Config, source: ModelSource, choice: Choice) -> Session:
    from nekotune.engines.transformers import TransformersEngine
    from nekotune.model import load_source

    loaded = load_source(source, effective)
    # peft's adapter is "default" and active; the engine names it so a call can ask for the base (None)
    names = {"default": "default"} if source.adapter else {}
    engine = TransformersEngine(loaded.model, loaded.renderer.tokenizer, names)
    return Session(engine, loaded.renderer, effective, source, choice, "default" if source.adapter else None, loaded)


def _open_llamacpp(cfg: Config, model_arg: str | None, source: ModelSource, effective: Config, choice: Choice,
                   merge: bool, adapters: Sequence[tuple[str, str]]) -> Session:
    from nekotune.engines.gguf_files import open_llamacpp

    engine, files = open_llamacpp(cfg, model_arg, effective.generate.gguf_type, merge=merge, adapters=adapters)
    renderer = files.renderer
    if source.merge_info and not source.adapter:
        # the export wrote a merged directory's remembered prompt settings into the GGUF; prompts
        # here are rendered as the transformers engine renders them (the user's settings)
        from nekotune.data.render import Renderer

        renderer = Renderer.from_config(renderer.tokenizer, effective.data)
    own = None if files.merged or not source.adapter else next(iter(files.adapters))
    return Session(engine, renderer, effective, source, choice, own)
