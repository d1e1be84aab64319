"""What a finished training leaves in its run directory: the adapter, run.json and loss.png."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from nekotune import __version__
from nekotune.config import Config
from nekotune.io import atomic_dir, atomic_write_json


def save_adapter(model: Any, tokenizer: Any, run: Path, processor_of: str | None = None) -> None:
    """`processor_of`: the base whose processor files (image processor, chat template) a
    vision-language adapter carries, so the run loads as a VLM anywhere (issue 17)."""
    with atomic_dir(run / "adapter") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if processor_of is not None and getattr(model.config, "vision_config", None) is not None:
            from nekotune.model.processor import copy_processor_files

            copy_processor_files(processor_of, tmp)
        tokenizer.save_pretrained(tmp)  # after: its chat template (the one trained with) wins


def peak_memory_mb(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    from nekotune.devices import peak_rss_mb

    return peak_rss_mb()  # psutil where `resource` is missing (Windows)


def losses(history: list[dict]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train, eval) loss points from the Trainer's log history."""
    return ([(h["step"], h["loss"]) for h in history if "loss" in h],
            [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h])


def write_run_json(cfg: Config, run: Path, data_stats: dict, state: Any, stats: Any, precision: Any,
                   grad_ckpt: bool, base_model: str, speed: dict, extra: dict | None = None) -> None:
    """`extra`: what a stage adds (a preference stage: its objective and reward metrics)."""
    import peft
    import torch
    import transformers

    train_losses, eval_losses = losses(state.log_history)
    info = {
        "nekotune": __version__, "config": cfg.to_dict(), "base_model": base_model, "data": data_stats,
        "precision": precision.name, "device": precision.device, "gradient_checkpointing": grad_ckpt,
        "packing": cfg.data.packing, **speed,
        "steps": state.global_step, "epochs": state.epoch,
        "train_losses": train_losses, "eval_losses": eval_losses,
        "first_loss": train_losses[0][1] if train_losses else None,
        "final_loss": train_losses[-1][1] if train_losses else None,
        "final_eval_loss": eval_losses[-1][1] if eval_losses else None,
        "tokens_seen": stats.tokens, "train_seconds": round(stats.train_time, 2),
        "tokens_per_second": round(stats.tokens / stats.train_time, 1) if stats.train_time else None,
        "wall_seconds": round(time.time() - stats.start, 2),
        "peak_memory_mb": round(peak_memory_mb(precision.device), 1),
        "skipped_steps": stats.skipped_steps,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
    }
    atomic_write_json(run / "run.json", {**info, **(extra or {})})


def plot_losses(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = losses(history)
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
