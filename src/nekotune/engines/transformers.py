"""The transformers engine: nekotune's existing generation path behind the Engine interface.

It runs generate.stream / generate.generate_batch unchanged, so its answers are exactly today's.
Those functions render a Conversation themselves; here the prompt ids are already rendered, so
a small stand-in renderer hands them through. Phase B of issue 19 gives generate.py id-based
entry points and this stand-in goes.
"""

from __future__ import annotations

import threading
from typing import Callable, Iterator, Mapping, Sequence

from nekotune.data.render import Renderer
from nekotune.engines.base import check_adapter
from nekotune.generate import GenSettings


class _IdsRenderer(Renderer):
    """A Renderer whose prompts are already ids: generate.py's batching and inputs (Renderer's
    prompt_inputs, prompt_features, batch_collator) work on them unchanged."""

    def __init__(self, tokenizer, stop_ids: Sequence[int]):  # no template: nothing is rendered here
        self.tokenizer = tokenizer
        self._stop_ids = list(stop_ids)

    @property
    def stop_token_ids(self) -> list[int]:  # the caller's (the session's renderer's), not recomputed
        return self._stop_ids

    def prompt_ids(self, prompt_ids) -> list[int]:
        return list(prompt_ids)


class TransformersEngine:
    """A transformers model (a PeftModel for adapters) with adapters picked per call by name."""

    name = "transformers"

    def __init__(self, model, tokenizer, adapters: Mapping[str, str] | None = None):
        """`adapters`: public name -> the peft adapter name already loaded on `model`."""
        from nekotune.serve.pool import AdapterSwitch

        self.model = model
        self.tokenizer = tokenizer
        self._internal = dict(adapters or {})
        active = getattr(model, "active_adapter", None) if hasattr(model, "peft_config") else None
        self.switch = AdapterSwitch(model, active=active)

    @property
    def adapters(self) -> list[str]:
        return list(self._internal)

    def _lease(self, adapter: str | None):
        check_adapter(adapter, self.adapters)
        return self.switch.use(None if adapter is None else self._internal[adapter])

    def stream(self, prompt_ids: list[int], settings: GenSettings, stop_ids: Sequence[int],
               stop_event: threading.Event | None = None, adapter: str | None = None) -> Iterator[str]:
        from nekotune.generate import stream

        ids_renderer = _IdsRenderer(self.tokenizer, stop_ids)
        with self._lease(adapter):
            yield from stream(self.model, ids_renderer, prompt_ids, settings, stop=stop_event)  # type: ignore[arg-type]

    def generate_batch(self, prompts: Sequence[list[int]], settings: GenSettings, stop_ids: Sequence[int],
                       adapter: str | None = None, batch_size: int = 8,
                       on_batch: Callable[[int], None] | None = None) -> list[str]:
        from nekotune.generate import generate_batch

        ids_renderer = _IdsRenderer(self.tokenizer, stop_ids)
        with self._lease(adapter):
            return generate_batch(self.model, ids_renderer, list(prompts), settings,  # type: ignore[arg-type]
                                  batch_size=batch_size, on_batch=on_batch)

    def close(self) -> None:
        """Nothing to free beyond what garbage collection frees."""
