"""`nekotune data check`: the report, row by row, and its exit code."""

from __future__ import annotations

from typing import Any

from nekotune.commands.console import command
from nekotune.config import Config


@command
def check_command(cfg: Config, file: str, model: str | None = None) -> int:
    from rich.console import Console
    from rich.text import Text

    from nekotune.api import check_data
    from nekotune.data.check import image_summary, length_summary, listed

    console = Console(highlight=False, soft_wrap=True)
    report = check_data(file, cfg, model)
    console.print(f"[bold]{report.path}[/]: {report.rows} rows, format [bold]{report.format}[/], "
                  f"tokenizer {report.tokenizer}")
    if report.lengths:
        console.print(length_summary(report))
    if report.images is not None:
        console.print(image_summary(report.images))
    for reason, where in report.problems.items():
        console.print(f"[yellow]{len(where)} rows[/]: {reason}: {listed(where)}")
    if report.example:
        console.print("\nexample as the model sees it ([green]green[/] = trained tokens):")
        text = Text()
        for piece, trained in report.example:
            text.append(piece, style="green" if trained else "dim")
        console.print(text)
    return _verdict(report, console)


def _verdict(report: Any, console: Any) -> int:
    if report.usable == 0:
        console.print("[red]no row can be trained on[/]")
        return 2
    if report.bad:
        console.print(f"[red]{report.bad} rows cannot be trained on[/]; fix them (or delete them) before training")
        return 2
    console.print("[green]ok[/]: ready to train")
    return 0
