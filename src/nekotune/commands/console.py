"""What every command shares: notes from the stages on stderr, and progress bars."""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
from typing import Any, Callable, Iterator, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class _Lines(logging.Handler):
    """A stage's warning as one plain line on stderr: the stream is looked up at each record, so
    a redirected or captured stderr gets it (as logging's last-resort handler does)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        from nekotune.messages import localize

        try:
            sys.stderr.write(localize(record.getMessage()) + "\n")  # Chinese where the catalogue has it
            sys.stderr.flush()
        except Exception:  # a closed stream must not turn a note into a crash
            self.handleError(record)


_HANDLER = _Lines()
_LIBRARY = logging.getLogger("nekotune")


@contextlib.contextmanager
def notes_to_stderr() -> Iterator[None]:
    """While a command runs, the library's warnings (logger "nekotune") print as lines on stderr.
    Nested uses share one handler; records still propagate to whatever the caller configured."""
    if _HANDLER in _LIBRARY.handlers:
        yield
        return
    _LIBRARY.addHandler(_HANDLER)
    try:
        yield
    finally:
        _LIBRARY.removeHandler(_HANDLER)


def command(fn: F) -> F:
    """A command function: the stage's notes are shown while it runs."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with notes_to_stderr():
            return fn(*args, **kwargs)

    return run  # type: ignore[return-value]  # functools.wraps keeps the signature for callers


@contextlib.contextmanager
def progress_bar(*columns: Any, console: Any = None, transient: bool = True,
                 description: str = "work") -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar (rich's default columns when none are given), handed to a stage as its
    `progress(done, total)` callback. It appears at the first call: a stage that refuses its input
    first leaves no trace of a bar."""
    from rich.progress import Progress

    shown: dict[str, Any] = {}

    def update(done: int, total: int) -> None:
        if not shown:
            shown["bar"] = Progress(*columns, console=console, transient=transient)
            shown["bar"].start()
            shown["task"] = shown["bar"].add_task(description, total=total)
        shown["bar"].update(shown["task"], completed=done, total=total)

    try:
        yield update
    finally:
        if shown:
            shown["bar"].stop()
