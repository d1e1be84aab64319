"""`nekotune train`: a progress bar or log lines, the before/after table, the interrupt message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from nekotune.commands.console import command
from nekotune.config import Config
from nekotune.training.callbacks import TrainReporter

EXIT_INTERRUPTED = 130


class ConsoleReporter(TrainReporter):
    """A rich progress bar with step, loss, tokens/s and ETA, or one line per log entry."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.task: Any = None

    def prepared(self, data: dict, precision: str, device: str, run: Path) -> None:
        s = data
        print(f"data: {s['path']} ({s['format']}): {s['train_rows']} train / {s['eval_rows']} eval rows, "
              f"{s['tokens']:,} tokens ({s['trained_tokens']:,} trained), length p50 {s['length_p50']} "
              f"p95 {s['length_p95']} max {s['length_max']}; truncated {s['truncated_rows']}, "
              f"dropped {s['dropped_rows']}", flush=True)
        if "images" in s:  # issue 17: a vision-language model
            cut = s["dropped_image_cut"]
            rows = f" ({', '.join(s['dropped_image_cut_rows'])}{', ...' if cut > 10 else ''})" if cut else ""
            print(f"images: {s['images']} ({s['image_tokens']:,} image tokens, at most {s['image_tokens_max']} per "
                  f"image, never trained); {cut} row(s) dropped because data.max_seq_len would cut an image{rows}",
                  flush=True)
        print(f"precision: {precision} on {device}; run directory: {run}", flush=True)

    def begin(self, max_steps: int, step: int, live: bool) -> None:
        if not live:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), transient=False)
        self.bar.start()
        self.task = self.bar.add_task("train", total=max_steps, completed=step, loss="-", tps="-")

    def step(self, step: int, max_steps: int, loss: float, tokens_per_second: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, tps=f"{tokens_per_second:,.0f}", loss=f"{loss:.4f}")

    def log(self, step: int, max_steps: int, logs: dict) -> None:
        if self.bar is None:
            shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in logs.items()}
            print(f"step {step}/{max_steps} {shown}", flush=True)

    def end(self) -> None:
        if self.bar is not None:
            self.bar.stop()

    def stopping(self) -> None:
        print("\nnekotune: stopping after this step and saving a checkpoint (press Ctrl-C again to quit now)",
              file=sys.stderr, flush=True)


def print_before_after(rows: list[tuple[str, str, str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="base model vs fine-tuned (prompts not in the training data)", show_lines=True)
    table.add_column("prompt", ratio=1, overflow="fold")
    table.add_column("base", ratio=2, overflow="fold")
    table.add_column("fine-tuned", ratio=2, overflow="fold")
    for prompt, before, after in rows:
        table.add_row(prompt, before, after)
    Console(width=160).print(table)


@command
def train_command(cfg: Config, rest: list[str], show_progress: bool, samples: bool) -> int:
    import nekotune.api as api
    from nekotune.compare import before_after
    from nekotune.training import TrainingInterrupted

    def after(model: Any, renderer: Any, run: Path) -> None:
        if cfg.output.sample_prompts and samples:
            print_before_after(before_after(model, renderer, cfg))
        print(f"\nadapter saved to {run / 'adapter'}; chat with it: nekotune chat --model {run}")

    try:
        api.train(cfg, show_progress=show_progress, after_train=after, reporter=ConsoleReporter())
    except TrainingInterrupted as exc:
        where = f"checkpoint {exc.checkpoint}" if exc.checkpoint else "no checkpoint"
        print(f"nekotune: interrupted; saved {where}. Resume with: nekotune train "
              f"{' '.join(rest)} output.dir={exc.run} train.resume=true", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def launch_torchrun(nproc: int, rest: list[str]) -> int:
    """`nekotune train --nproc N ...` is shorthand for `torchrun --nproc_per_node N -m nekotune train ...`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "nekotune", "train", *rest]
    print("running:", " ".join(cmd), flush=True)
    return subprocess.call(cmd)
