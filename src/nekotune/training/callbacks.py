"""What a training tells its caller while it runs, and how it stops.

train() never prints: it hands its progress to a TrainReporter (the command line's draws a bar
or prints log lines, the web UI's fills its status line, a notebook's may do anything). The
Trainer's own callbacks feed it; MarkComplete writes a checkpoint's completeness marker and
Interrupt turns the first Ctrl-C into "finish the step, save, stop".
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from nekotune.io import atomic_write_text
from nekotune.runs import COMPLETE


class TrainReporter:
    """The events of one training, on the main process only. Each method does nothing here:
    override the ones you want to show."""

    def prepared(self, data: dict, precision: str, device: str, run: Path) -> None:
        """Data statistics (PreparedData.stats) and precision, before the model is built."""

    def begin(self, max_steps: int, step: int, live: bool) -> None:
        """The loop starts at `step` of `max_steps`; `live`: the caller asked for a live display."""

    def step(self, step: int, max_steps: int, loss: float, tokens_per_second: float) -> None:
        """An optimizer step ended (`loss` is the last logged one, NaN before the first log)."""

    def log(self, step: int, max_steps: int, logs: dict) -> None:
        """The Trainer logged (loss, learning rate, eval loss ...)."""

    def end(self) -> None:
        """The loop ended (finished, stopped or failed)."""

    def stopping(self) -> None:
        """A first Ctrl-C/SIGTERM: the step finishes, a checkpoint is saved, then train() stops."""


class Stats:
    def __init__(self) -> None:
        self.tokens = 0
        self.start = time.time()
        self.train_time = 0.0
        self.skipped_steps: list[int] = []


def make_callbacks(stats: Stats, reporter: TrainReporter, live: bool, interrupt: Any) -> list:
    from transformers import TrainerCallback

    class Report(TrainerCallback):
        """Step, loss, tokens/s to the reporter (replaces the Trainer's tqdm and printer)."""

        def __init__(self):
            self.loss = float("nan")
            self.t0 = time.time()
            self.tok0 = 0

        def on_train_begin(self, args, state, control, **kw):
            self.t0, self.tok0 = time.time(), stats.tokens
            if state.is_world_process_zero:
                reporter.begin(state.max_steps, state.global_step, live)

        def on_step_end(self, args, state, control, **kw):
            if interrupt.requested:
                control.should_save = True
                control.should_training_stop = True
            if state.is_world_process_zero:
                tps = (stats.tokens - self.tok0) / max(time.time() - self.t0, 1e-6)
                reporter.step(state.global_step, state.max_steps, self.loss, tps)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.loss = logs["loss"]
            if logs and state.is_world_process_zero:
                reporter.log(state.global_step, state.max_steps, logs)

        def on_train_end(self, args, state, control, **kw):
            stats.train_time = time.time() - self.t0
            if state.is_world_process_zero:
                reporter.end()

    class MarkComplete(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.is_world_process_zero:
                ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if ckpt.is_dir():
                    from nekotune.io import fsync_tree

                    fsync_tree(ckpt)
                    atomic_write_text(ckpt / COMPLETE, f"{state.global_step}\n")

    return [Report(), MarkComplete()]


class Interrupt:
    """First Ctrl-C/SIGTERM: finish the step, save a checkpoint, exit 130. Second: exit now."""

    def __init__(self, reporter: TrainReporter):
        self.requested = False
        self.reporter = reporter
        self._old: dict = {}

    def _handle(self, signum, frame):
        if self.requested:
            os._exit(130)
        self.requested = True
        self.reporter.stopping()

    def __enter__(self) -> "Interrupt":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (UI): the UI stops through `requested`
                pass
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class TrainingInterrupted(Exception):
    def __init__(self, run: Path, checkpoint: Path | None):
        self.run, self.checkpoint = run, checkpoint
        super().__init__(f"training interrupted; checkpoint {checkpoint}")
