"""The models one server answers for: one base model in memory with any number of LoRA adapters.

Adapters are loaded once with peft's multi-adapter support and picked per request by name;
picking one is a flag flip (`set_adapter`, or `disable_adapter()` for the bare base), never a
reload. Generations that use the same adapter run side by side; a switch waits until those
are done, and while a request for another adapter waits, no new one joins the current
adapter, so no name starves.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generator, Iterator

from nekotune.data.render import Renderer
from nekotune.errors import UserError
from nekotune.generate import GenSettings
from nekotune.model.source import ModelSource

log = logging.getLogger(__name__)

# Names are what clients send as `model`; paths and traversal are refused so that a name can
# never be mistaken for (or smuggle in) a file system location.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:+-]{0,95}")
BASE_ALIAS = "base"


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name or "") or ".." in name:
        raise UserError(f"adapter name {name!r} is not allowed: use letters, digits and - _ . : + "
                        f"(at most 96, no '/', no '..', not a path), as in --adapter neko=outputs/run")
    if name == BASE_ALIAS:
        raise UserError(f"adapter name {name!r} is reserved for the base model; pick another name")
    return name


def parse_adapter_args(items: list[str]) -> list[tuple[str, str]]:
    """`--adapter NAME=PATH` values -> [(name, path)], names checked."""
    pairs = []
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not path.strip():
            raise UserError(f"--adapter {item!r}: write NAME=PATH, for example --adapter neko=outputs/my-run")
        pairs.append((check_name(name.strip()), path.strip()))
    return pairs


def safe_name(text: str) -> str:
    """A directory name turned into an allowed model name (runs are named by their directory)."""
    name = re.sub(r"[^A-Za-z0-9_.:+-]", "-", text).replace("..", "-").lstrip("-_.:+") or "model"
    return name[:96]


@dataclass
class Entry:
    """One name a client can ask for."""

    name: str
    adapter: str | None  # peft's internal adapter name; None is the bare base model
    renderer: Renderer
    defaults: GenSettings  # the run's own generation settings, under the request's
    source: str


class AdapterSwitch:
    """Lets generations share one adapter at a time and switches only when none is running."""

    def __init__(self, model: Any, active: str | None):
        self.model = model
        self.active = active
        self.users = 0
        self.waiting: Counter = Counter()
        self.cond = threading.Condition()
        self._base_mode = contextlib.ExitStack()

    def _may_enter(self, adapter: str | None) -> bool:
        if self.users == 0:
            return True
        others_waiting = any(n for a, n in self.waiting.items() if a != self.active)
        return adapter == self.active and not others_waiting

    def _switch(self, adapter: str | None) -> None:
        self._base_mode.close()  # leaves disable_adapter() if the base was active
        if adapter is None:
            if hasattr(self.model, "disable_adapter"):
                self._base_mode.enter_context(self.model.disable_adapter())
        else:
            self.model.set_adapter(adapter, inference_mode=True)
        self.active = adapter

    @contextlib.contextmanager
    def use(self, adapter: str | None) -> Iterator[None]:
        with self.cond:
            self.waiting[adapter] += 1
            try:
                while not self._may_enter(adapter):
                    self.cond.wait()
            finally:
                self.waiting[adapter] -= 1
            if adapter != self.active:
                self._switch(adapter)
            self.users += 1
        try:
            yield
        finally:
            with self.cond:
                self.users -= 1
                self.cond.notify_all()


class ModelPool:
    """`engine`: an engines.base.Engine that generates instead of transformers on `model` (issue 19's
    llama.cpp engine, which switches adapters per call under its own lock; entries then name its
    adapters). The pool never imports an engine: engines/serve_pool.py builds such pools."""

    def __init__(self, model: Any, tokenizer: Any, entries: list[Entry], context_length: int, engine: Any = None):
        self.model = model
        self.engine = engine
        self.tokenizer = tokenizer
        self.entries = {e.name: e for e in entries}
        self.context_length = context_length
        self.base_name = entries[0].name
        self.switch = AdapterSwitch(model, active=_initial_adapter(model))

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    def get(self, name: str) -> Entry | None:
        return self.entries.get(self.base_name if name == BASE_ALIAS else name)

    def lease(self, entry: Entry) -> Any:
        """Hold the model set to this entry's adapter for one generation (blocks while it switches)."""
        return self.switch.use(entry.adapter) if self.engine is None else contextlib.nullcontext()

    def stream(self, entry: Entry, conv: Any, settings: GenSettings,
               stop: threading.Event) -> Generator[str, None, None]:
        """One answer's text pieces for `entry`, from the entry's own rendering of `conv`."""
        if self.engine is None:
            from nekotune.generate import stream

            return stream(self.model, entry.renderer, conv, settings, stop=stop)
        return self.engine.stream(entry.renderer.prompt_ids(conv), settings, entry.renderer.stop_token_ids, stop,
                                  adapter=entry.adapter)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0


def _initial_adapter(model) -> str | None:
    return getattr(model, "active_adapter", None) if hasattr(model, "peft_config") else None


# -- loading ---------------------------------------------------------------------------------
def context_length(model: Any, tokenizer: Any) -> int:
    n = getattr(model.config, "max_position_embeddings", None)
    if not n:
        limit = getattr(tokenizer, "model_max_length", None)
        n = limit if isinstance(limit, int) and limit < 10**7 else 2048
    return int(n)


def entry_renderer(tokenizer, cfg, like: Renderer | None = None) -> Renderer:
    """Each name renders with its own run's template (the tokenizer is the served model's);
    `like`: the served model's renderer, whose processor and image policy a VLM's names share."""
    from nekotune.data.vision_render import VisionRenderer
    from nekotune.model import chat_template_text

    template = chat_template_text(cfg.model)
    if isinstance(like, VisionRenderer):
        return VisionRenderer.for_processor(like.processor, cfg.data, like.policy,
                                            chat_template=template or like.template)
    return Renderer.from_config(tokenizer, cfg.data, chat_template=template)


def image_policy(allow_remote_images: bool) -> Any:
    """Requests never name local files; remote URLs only when the operator allows them."""
    from nekotune.data.images import REQUEST_POLICY, ImagePolicy

    return ImagePolicy(allow_files=False, allow_remote=True) if allow_remote_images else REQUEST_POLICY


def _add_adapter(model, spec, internal: str):
    """The first adapter wraps the base in a PeftModel; later ones load beside it."""
    from nekotune.model import attach_adapter, require_safetensors_adapter

    if not hasattr(model, "load_adapter") or not hasattr(model, "peft_config"):
        return attach_adapter(model, spec, trainable=False, adapter_name=internal)
    require_safetensors_adapter(spec.adapter)
    try:
        model.load_adapter(spec.adapter, adapter_name=internal, is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0][:200]
        raise UserError(f"adapter {spec.adapter} does not fit the served base model ({first}); serve it "
                        f"with the base it was trained on") from None
    return model


def _same_base(a: str, b: str) -> bool:
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.resolve() == pb.resolve() if pa.exists() and pb.exists() else a == b


def adapter_sources(spec: ModelSource, adapters: list[tuple[str, str]], outputs_root: str,
                     ) -> list[tuple[str, ModelSource]]:
    from nekotune.model import resolve

    sources = []
    if spec.adapter:  # the served run's own adapter is named after its directory
        sources.append((safe_name(Path(spec.run_dir or spec.adapter).name), spec))
    for name, path in adapters:
        if not Path(path).expanduser().exists():
            raise UserError(f"--adapter {name}={path}: {path} not found; give a run directory or an adapter directory")
        aspec = resolve(path, outputs_root=outputs_root)
        if not aspec.adapter:
            raise UserError(f"--adapter {name}={path}: {path} holds no LoRA adapter (no adapter_config.json)")
        sources.append((name, aspec))
    return sources


def load_pool(cfg: Any, model_arg: str | None, adapters: list[tuple[str, str]],
              allow_remote_images: bool = False) -> ModelPool:
    """Load the base once, then every adapter onto it under its own name."""
    from nekotune.model import (
        ModelSource,
        effective_config,
        load_model,
        load_renderer,
        pick_device,
        pick_precision,
        resolve_source,
    )

    spec, served_cfg = resolve_source(cfg, model_arg)
    precision = pick_precision(pick_device(served_cfg.model.device), served_cfg.model.dtype, training=False)
    tokenizer, served = load_renderer(spec, served_cfg, image_policy(allow_remote_images))
    model = load_model(ModelSource(base=spec.base), served_cfg.model, precision, training=False)
    context = context_length(model, tokenizer)
    # The base answers with the served model's prompt settings, so base and fine-tuned compare fairly.
    base = Entry(safe_name(f"base-{Path(spec.base.rstrip('/')).name}"), None,
                 entry_renderer(tokenizer, served_cfg, served), GenSettings.from_config(served_cfg.generate), spec.base)
    entries = [base]
    for i, (name, aspec) in enumerate(adapter_sources(spec, adapters, cfg.output.root)):
        if name in {e.name for e in entries} or name == BASE_ALIAS:
            raise UserError(f"model name {name!r} is used twice; give each --adapter its own NAME")
        if not _same_base(aspec.base, spec.base):
            log.warning("nekotune serve: warning: adapter %s was trained on %s, served on %s", name, aspec.base,
                        spec.base)
        model = _add_adapter(model, aspec, internal=f"adapter{i}")
        ecfg = effective_config(cfg, aspec)
        entries.append(Entry(name, f"adapter{i}", entry_renderer(tokenizer, ecfg, served),
                             GenSettings.from_config(ecfg.generate),
                             aspec.label))
    model.eval()
    return ModelPool(model, tokenizer, entries, context)
