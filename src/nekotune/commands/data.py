"""`nekotune data check`: the report, row by row, and its exit code."""

from __future__ import annotations

from typing import Any

from nekotune.commands.console import command
from nekotune.config import Config


@command
def check_command(cfg: Config, file: str, model: str | None = None) -> int:
    from rich.console import Console

    from nekotune.api import check_data
    from nekotune.data.check import image_summary, length_summary, listed

    console = Console(highlight=False, soft_wrap=True)
    from nekotune.data.preference_tokens import PreferenceReport

    report = check_data(file, cfg, model)
    if isinstance(report, PreferenceReport):  # issue 18: pairs or KTO rows
        return _preference(report, console)
    console.print(f"[bold]{report.path}[/]: {report.rows} rows, format [bold]{report.format}[/], "
                  f"tokenizer {report.tokenizer}")
    if report.lengths:
        console.print(length_summary(report))
    if report.images is not None:
        console.print(image_summary(report.images))
    for reason, where in report.problems.items():
        console.print(f"[yellow]{len(where)} rows[/]: {reason}: {listed(where)}")
    if report.example:
        _example(report.example, console)
    return _verdict(report.usable, report.bad, console)


def _example(pieces: list, console: Any, what: str = "example") -> None:
    from rich.text import Text

    console.print(f"\n{what} as the model sees it ([green]green[/] = trained tokens):")
    text = Text()
    for piece, trained in pieces:
        text.append(piece, style="green" if trained else "dim")
    console.print(text)


def _preference(report: Any, console: Any) -> int:
    """A PreferenceReport: pairs (dpo, orpo, simpo) or KTO rows, problems by row."""
    from nekotune.data import percentile
    from nekotune.data.check import listed

    what = "pairs" if report.kind == "pairs" else "KTO rows"
    console.print(f"[bold]{report.path}[/]: {report.rows} {what}, format [bold]{report.format}[/], "
                  f"tokenizer {report.tokenizer}")
    if report.lengths:
        console.print(f"tokens per row (prompt + longer answer): p50 {percentile(report.lengths, 50)}, p95 "
                      f"{percentile(report.lengths, 95)}, max {max(report.lengths)}; over data.max_seq_len="
                      f"{report.max_seq_len}: {len(report.over_length)}"
                      + (f" ({listed(report.over_length)}; policy: {report.truncation})" if report.over_length else ""))
    if report.kind == "kto":
        console.print(f"desirable {report.desirable}, undesirable {report.undesirable}")
    for reason, where in report.problems.items():
        console.print(f"[yellow]{len(where)} rows[/]: {reason}: {listed(where)}")
    for rows, reason in ((report.identical, "chosen equals rejected (nothing to prefer)"),
                         (report.prompt_too_long, "the prompt alone fills data.max_seq_len (no answer token left)"),
                         (report.duplicates, "duplicate of an earlier row")):
        if rows:
            console.print(f"[yellow]{len(rows)} rows[/]: {reason}: {listed(rows)}")
    if report.example:
        _example(report.example, console, "first chosen answer" if report.kind == "pairs" else "first answer")
    return _verdict(len(report.lengths), report.bad_rows, console)


def _verdict(usable: int, bad: int, console: Any) -> int:
    if usable == 0:
        console.print("[red]no row can be trained on[/]")
        return 2
    if bad:
        console.print(f"[red]{bad} rows cannot be trained on[/]; fix them (or delete them) before training")
        return 2
    console.print("[green]ok[/]: ready to train")
    return 0
