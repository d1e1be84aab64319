"""Helpers for the preference tests: pairs, a LoRA policy on the tiny model, TrainingArguments kwargs."""

from __future__ import annotations

from pathlib import Path

from nekotune.data.sources import Row

# The persona answer is chosen, a plain one rejected: easy to tell apart, so a few steps move the rewards.
PAIRS = [(f"Question number {i}?", f"(purrs) Answer {i}, nya~", f"Answer {i}.") for i in range(12)]


def rows(*items: dict, path: str = "t.json") -> list[Row]:
    return [Row(d, f"{path} row {i}") for i, d in enumerate(items, 1)]


def alpaca_pair_rows(pairs=PAIRS) -> list[Row]:
    return rows(*({"instruction": q, "chosen": c, "rejected": r} for q, c, r in pairs))


def tiny_cfg(tiny_llama: Path, *extra: str):
    from nekotune.config import load_config

    return load_config(None, [f"model.name_or_path={tiny_llama}", "lora.r=4", "lora.alpha=8",
                                  "data.max_seq_len=64", *extra], default_to_demo=False)


def tiny_policy(tiny_llama: Path):
    """The tiny Llama with a fresh LoRA, built by nekotune's own build_peft_model (fp32)."""
    import torch
    from transformers import AutoModelForCausalLM

    from nekotune.training import build_peft_model

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    torch.manual_seed(0)
    return build_peft_model(model, tiny_cfg(tiny_llama), grad_ckpt=False)


def training_kwargs(out: Path, steps: int, batch: int = 2, save_steps: int = 100, **extra) -> dict:
    """What nekotune's _training_args passes to TrainingArguments, for a CPU fp32 run."""
    kwargs = dict(output_dir=str(out / "checkpoints"), per_device_train_batch_size=batch,
                  per_device_eval_batch_size=batch, gradient_accumulation_steps=1, max_steps=steps,
                  learning_rate=5e-3, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                  logging_steps=1, logging_first_step=True, eval_strategy="no", save_strategy="steps",
                  save_steps=save_steps, save_total_limit=2, seed=42, data_seed=42, bf16=False, fp16=False,
                  use_cpu=True, use_liger_kernel=False, report_to="none", disable_tqdm=True,
                  remove_unused_columns=False, dataloader_num_workers=0, prediction_loss_only=True,
                  gradient_checkpointing=False, optim="adamw_torch", ddp_find_unused_parameters=False)
    kwargs.update(extra)
    return kwargs


def losses(history: list[dict]) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in history if "loss" in h}
