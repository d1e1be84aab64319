"""The Trainer subclass, and the one place where third-party objects get nekotune's faster paths.

Every replacement of a library method happens in `install_speedups`, on instances only (never on
a class, so other models in the process keep the libraries' code), and each one checks first
that it is exactly equivalent for this model (see loss.py and speed.py for the conditions).
"""

from __future__ import annotations

from typing import Any

from nekotune.training.loss import install_fast_loss, trained_positions_loss


class NonFiniteLoss(Exception):
    def __init__(self, step: int):
        super().__init__(f"loss became NaN/inf at step {step}")
        self.step = step


def install_speedups(model: Any, packing: bool) -> dict:
    """Fused LoRA adds (peft's LoRA Linear), per-example attention on packed rows (transformers'
    attention registry) and the trained-positions loss (the causal LM's forward); returns what
    applied, for run.json."""
    from nekotune.training.speed import fuse_lora_adds, use_packed_attention

    return {"fused_lora_layers": fuse_lora_adds(model),
            "packed_attention": bool(packing and use_packed_attention(model)),
            "fast_loss": install_fast_loss(model)}


def make_trainer_class() -> Any:
    """Built on first use: importing transformers' Trainer takes seconds."""
    from transformers import Trainer

    class NekoTrainer(Trainer):
        """Trainer with the trained-positions loss, token counting and a NaN guard."""

        def __init__(self, *args, stats=None, nan_policy: str = "stop", **kwargs):
            super().__init__(*args, **kwargs)
            self.stats = stats
            self.nan_policy = nan_policy
            # our loss is a per-micro-batch mean; the Trainer divides by the accumulation steps
            self.model_accepts_loss_kwargs = False

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, _ = trained_positions_loss(model, inputs)
            return (loss, {"loss": loss}) if return_outputs else loss

        def training_step(self, model, inputs, num_items_in_batch=None):
            if self.stats is not None:
                mask = inputs.get("attention_mask")
                self.stats.tokens += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
            return finite_loss(self, model, super().training_step(model, inputs, num_items_in_batch))

    return NekoTrainer


def finite_loss(trainer: Any, model: Any, loss: Any) -> Any:
    """A step's loss checked after backward (SFT and the preference trainers): NaN/inf stops the
    run, or with nan_policy=skip drops this step's gradients and counts it."""
    import torch

    if torch.isfinite(loss):
        return loss
    step = trainer.state.global_step + 1
    if trainer.nan_policy != "skip":
        raise NonFiniteLoss(step)
    model.zero_grad(set_to_none=True)
    if trainer.stats is not None:
        trainer.stats.skipped_steps.append(step)
    return torch.zeros_like(loss)
