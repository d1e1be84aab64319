"""`nekotune merge` and `nekotune export gguf|ollama|verify`: progress bars and what was written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nekotune.commands.console import command, progress_bar
from nekotune.config import Config


def _stderr():
    from rich.console import Console

    return Console(stderr=True)


@command
def merge_command(cfg: Config, model_arg: str | None, out: str, low_memory: bool = False,
                  dtype: str | None = None) -> Path:
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    from nekotune.api import merge
    from nekotune.weights.write import size_text

    console = _stderr()
    with progress_bar(TextColumn("merging"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console) as progress:
        done = merge(model_arg, out, cfg, low_memory=low_memory, dtype=dtype, progress=progress)
    console.print(f"merged {done.adapter} into {done.base}\n-> {done.out} ({done.shards} shard"
                  f"{'s' if done.shards > 1 else ''}, {size_text(done.bytes)}, {done.dtype}"
                  f"{', low-memory' if done.low_memory else ''})", soft_wrap=True)
    return done.out


def _gguf_bar(type_name: str, console):
    from rich.progress import BarColumn, DownloadColumn, TextColumn, TimeElapsedColumn

    return progress_bar(TextColumn(f"GGUF {type_name}"), BarColumn(), DownloadColumn(), TimeElapsedColumn(),
                        console=console)


@command
def export_command(cfg: Config, model_arg: str | None, out: str, type: str = "q8_0",
                   imatrix: str | None = None) -> Path:
    from nekotune.api import export_gguf

    console = _stderr()
    with _gguf_bar(type, console) as progress:
        done = export_gguf(model_arg, out, type, cfg, progress=progress, imatrix=imatrix)
    console.print(f"wrote {done.path} ({done.type}, {done.size}) from {done.source}", soft_wrap=True)
    console.print(f"check it against transformers: nekotune export verify {done.path}"
                  + (f" --model {model_arg}" if model_arg else ""), soft_wrap=True, markup=False)
    return done.path


@command
def lora_command(cfg: Config, model_arg: str | None, out: str, dtype: str = "f16") -> Path:
    from nekotune.api import export_gguf_lora
    from nekotune.export.gguf import file_size

    console = _stderr()
    done = export_gguf_lora(model_arg, out, cfg, dtype=dtype)
    console.print(f"wrote {done.path} ({done.tensors} LoRA pairs, {dtype}, {file_size(done.path)}, "
                  f"architecture {done.arch})", soft_wrap=True, markup=False)
    console.print("use it on the base model's GGUF: llama-cli -m BASE.gguf --lora " + str(done.path),
                  soft_wrap=True, markup=False)
    return done.path


@command
def ollama_command(cfg: Config, model_arg: str | None, out: str, type: str = "q4_0",
                   imatrix: str | None = None, adapter: bool = False) -> Path:
    from nekotune.api import export_ollama

    console = _stderr()
    with _gguf_bar(type, console) as progress:
        done = export_ollama(model_arg, out, type, cfg, progress=progress, imatrix=imatrix, adapter=adapter)
    if done.warning:
        console.print(f"[yellow]warning:[/] {done.warning}")
    console.print(f"wrote {done.export.path}/Modelfile and {done.export.gguf.name} ({done.export.type}, "
                  f"{done.export.size})", soft_wrap=True)
    console.print("create the Ollama model with:")
    console.print(f"  ollama create {done.name} -f {done.modelfile}", soft_wrap=True, markup=False)
    return done.export.path


@command
def verify_command(cfg: Config, file: str, model_arg: str | None, limit: int | None = None,
                   reference: str | None = None) -> int:
    from rich.console import Console

    from nekotune.export.verify import Verification

    console = Console(stderr=False)
    with Verification(cfg, file, model_arg, limit, reference) as check:
        console.print(f"comparing {check.gguf.name} with {check.label} on {len(check.prompts)} held-out prompts",
                      soft_wrap=True)
        report = check.run()
    print_verify_report(report, console)
    return 0 if report.ok else 1


def print_verify_report(report: Any, console: Any) -> None:
    from rich.table import Table

    from nekotune.export.verify import N_TOKENS, short

    table = Table(title=f"llama.cpp ({report.file_type}) vs transformers, greedy, first {N_TOKENS} tokens")
    for column in ("#", "prompt", "tokens", "tokenization", "greedy agree", "top-1 (teacher-forced)"):
        table.add_column(column, justify="right" if column in ("#", "tokens") else "left")
    for i, r in enumerate(report.results, 1):
        table.add_row(str(i), short(r.prompt), str(r.n_prompt_tokens), "equal" if r.tokens_equal else "[red]DIFFERS",
                      f"{r.greedy_match}/{r.greedy_len}", f"{r.top1:.0%}")
    console.print(table)
    for i, r in enumerate(report.results, 1):
        if r.greedy_match < r.greedy_len:
            console.print(f"#{i} transformers: {r.hf_text!r}\n#{i} llama.cpp:    {r.llama_text!r}", soft_wrap=True)
    console.print(f"tokenization equal: {report.n_equal}/{len(report.results)} prompts; BOS handling "
                  f"{'agrees' if report.bos_ok else '[red]differs'}")
    console.print(f"greedy agreement: {report.greedy:.0%} of leading tokens; teacher-forced top-1: {report.top1:.1%} "
                  f"(needed {report.threshold:.0%} for {report.file_type})")
    d = report.divergence
    if d is not None:
        console.print(f"fixed text ({d.texts} demo conversations with answers, {d.positions} next tokens) "
                      f"against {d.reference}: top-1 agreement {d.top1:.1%}, mean KL {d.mean_kl:.4f} "
                      f"(max {d.max_kl:.4f})", soft_wrap=True)
    console.print("[green]PASS[/]" if report.ok else "[red]FAIL[/]")
