"""What every inference engine offers chat, predict, eval, compare and serve.

An engine takes prompt token ids from Renderer.prompt_ids (never text it would template again),
the Renderer's stop ids and nekotune's GenSettings, so answers are comparable across engines:
greedy answers match token for token on the same weights; sampled ones follow the same
distribution with each engine's own seeded RNG.
"""

from __future__ import annotations

import threading
from typing import Callable, Iterator, Protocol, Sequence, runtime_checkable

from nekotune.generate import GenSettings


@runtime_checkable
class Engine(Protocol):
    name: str

    @property
    def adapters(self) -> list[str]:
        """Adapter names this engine can apply per call (the base is None)."""
        ...

    def stream(self, prompt_ids: list[int], settings: GenSettings, stop_ids: Sequence[int],
               stop_event: threading.Event | None = None, adapter: str | None = None) -> Iterator[str]:
        """Text pieces of one answer as they become printable; `stop_event` ends it early."""
        ...

    def generate_batch(self, prompts: Sequence[list[int]], settings: GenSettings, stop_ids: Sequence[int],
                       adapter: str | None = None, batch_size: int = 8,
                       on_batch: Callable[[int], None] | None = None) -> list[str]:
        """Whole answers (stripped, special tokens dropped), in input order."""
        ...

    def close(self) -> None:
        ...


class Detokenizer:
    """Token ids -> text pieces, holding back a piece that ends inside a UTF-8 sequence.

    Decoding each new id alone would split multi-byte characters and lose the spaces some
    tokenizers add only between tokens; this decodes a short window of recent ids and emits
    what it adds (the scheme text-generation-inference uses)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the window
        self.read = 0  # ids already turned into emitted text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """What is still held back when the answer ends (an incomplete character shows as U+FFFD)."""
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):]


def check_adapter(name: str | None, known: Sequence[str]) -> None:
    if name is not None and name not in known:
        from nekotune.errors import UserError

        raise UserError(f"adapter {name!r} is not loaded; loaded: {', '.join(known) or 'none'}")
