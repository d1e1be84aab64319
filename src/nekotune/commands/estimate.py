"""`nekotune estimate` and `nekotune doctor`: tables of what was measured or estimated."""

from __future__ import annotations

import json
from typing import Any

from nekotune.commands.console import command
from nekotune.config import Config


@command
def estimate_command(cfg: Config, model_arg: str | None, fit: str | None = None, as_json: bool = False) -> int:
    from nekotune.api import estimate

    report = estimate(model_arg, cfg, fit=fit)
    if as_json:
        print(json.dumps(report.result, indent=2))
        return 0
    _print(report.arch, report.settings, report.estimate, report.result)
    return 0


def _print(arch: Any, s: Any, est: Any, result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    what = "QLoRA 4-bit" if s.quant4 else f"LoRA, base in {'fp32' if s.weight_bytes == 4 else '16-bit'}"
    where = f"{s.device}{' (unified memory)' if result.get('unified_memory') else ''}"
    for note in result.get("notes", []):
        console.print(f"note: {note}")
    console.print(f"[bold]{result['model']}[/]: {arch.params / 1e9:.2f}B parameters, {result['lora_params']:,} LoRA "
                  f"parameters (r={s.lora_r}); {what} on {where}; batch {s.batch} x {s.seq} tokens"
                  f"{', gradient checkpointing' if s.grad_ckpt else ''}")
    table = Table(title="peak training memory")
    table.add_column("item")
    table.add_column("MB", justify="right")
    for k, v in est.items.items():
        table.add_row(k, f"{v:,.0f}")
    table.add_row("[bold]total[/]", f"[bold]{est.total_mb:,.0f}[/] ({est.total_mb / 1024:.1f} GB)")
    console.print(table)
    if "logits + loss" in est.items:
        console.print(f"a plain transformers loss would hold {result['plain_hf_loss_logits_mb']:,.0f} MB of fp32 "
                      f"logits here; nekotune's chunked loss holds {est.items['logits + loss']:,.0f} MB")
    if s.stage != "sft":  # issue 18: a preference example is several sequences
        console.print(f"train.stage={s.stage}: {s.grad_rows} sequence(s) per example with gradients, {s.nograd_rows} "
                      f"without (reference/KL); about {result['step_cost_vs_sft']}x the compute of SFT per example")
    if "vision" in result:  # issue 17
        v = result["vision"]
        console.print(f"images ({v['family']}): at most {v['max_tokens_per_image']:,} tokens per image at "
                      f"data.image_max_pixels={v['max_pixels']:,}, counted inside the {s.seq} tokens of a row; "
                      f"vision tower {v['vision_params'] / 1e6:.1f}M parameters "
                      f"({'trained' if v['vision_trained'] else 'frozen'}), {v['images_per_micro_batch']} image(s) "
                      f"per micro-batch")
    if "preset" in result:
        p = result["preset"]
        verdict = "[green]fits[/]" if p["fits"] else "[red]does not fit[/]"
        console.print(f"preset {p['name']}: {verdict} {p['budget_mb'] / 1024:.0f} GB ({est.total_mb / 1024:.1f} GB)")
    inf = result["inference_mb"]
    console.print("inference (2048-token context): " + ", ".join(f"{k} {v / 1024:.1f} GB" for k, v in inf.items()))
    if "fit" in result:
        f = result["fit"]
        if f["settings"] is None:
            console.print(f"[red]--fit {f['budget_mb'] / 1024:.1f} GB: {f['message']}[/]")
        else:
            console.print(f"[green]fits {f['budget_mb'] / 1024:.1f} GB[/] ({f['total_mb'] / 1024:.1f} GB): "
                          + " ".join(f["overrides"]))


@command
def doctor_command(as_json: bool = False) -> int:
    from nekotune.api import doctor

    info = doctor()
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        _print_doctor(info)
    fatal = info.get("torch") is None or any("not installed" in p for p in info["problems"])
    return 1 if fatal else 0


def _print_doctor(info: dict) -> None:
    from rich.console import Console

    c = Console(highlight=False)
    c.print(f"[bold]nekotune doctor[/]  Python {info['python']} on {info['platform']}")
    if info.get("torch"):
        gpu = ", ".join(f"{g['name']} ({g['memory_gb']} GB)" for g in info["gpus"]) or "none"
        c.print(f"torch {info['torch']} (CUDA build: {info['cuda_build'] or 'no'}), driver {info['driver'] or '-'}, "
                f"GPU: {gpu}, MPS: {'yes' if info['mps'] else 'no'}, bf16: {'yes' if info['bf16'] else 'no'}, "
                f"threads: {info['threads']}")
    c.print(f"RAM available {info['ram_available_gb']} GB, disk free {info['disk_free_gb']} GB")
    c.print("packages: " + ", ".join(f"{k} {v or '[dim]missing[/]'}" for k, v in info["packages"].items()))
    for p in info["problems"]:
        c.print(f"[red]problem:[/] {p}")
    for a in info["advice"]:
        c.print(f"[green]advice:[/] {a}")
    if not info["problems"]:
        c.print("[green]ready to train[/]")
