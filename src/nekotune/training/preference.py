"""Preference tuning with LoRA on TRL's trainers: DPO, ORPO, SimPO and KTO (the recipe: preference_recipe.py).

TRL does the losses, the reference passes, logging, checkpoints and resume; nekotune adds what it
needs around them, each in a small subclass:
- rows arrive as token ids from nekotune's Renderer (data/preference_tokens.py), so TRL's own dataset
  preparation (templating, tokenizing) is skipped; no TRL trainer accepts ids as they are;
- token counting and the NaN guard of nekotune's SFT trainer;
- ORPO's NLL term on answer tokens only, as nekotune's SFT loss (TRL's covers prompt tokens too).

The reference of DPO and KTO is the base with the adapter disabled (no second model in memory). When
training starts from an SFT run, the SFT adapter is trained further and TRL's frozen copy of it ("ref",
adapter-sized) is the reference: standard DPO against the SFT model.

Importing this module stays light: TRL is imported when a trainer is built.
"""

from __future__ import annotations

import contextlib
import functools
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from nekotune.errors import UserError
from nekotune.registry import DPO_LOSSES, KTO_LOSSES, PREFERENCE_STAGES, TRAINING_STAGES

STAGES = TRAINING_STAGES  # the stages' facts (data kind, passes, reference) live in the registry
__all__ = ["DPO_LOSSES", "KTO_LOSSES", "PREFERENCE_STAGES", "STAGES"]


@dataclass
class PreferenceSettings:
    """train.pref_beta, train.pref_loss, train.simpo_gamma (+ the optional train.pref_ftx) and which
    reference the run uses ("base": adapter disabled; "sft": the SFT adapter the run started from)."""

    beta: Optional[float] = None  # None: the stage's default (Stage.default_beta)
    loss: str = "sigmoid"  # DPO's loss type(s), comma-separated; LLaMA-Factory's default
    simpo_gamma: float = 0.5
    ftx: float = 0.0  # LLaMA-Factory's pref_ftx: weight of an SFT term on the chosen answers (DPO)
    reference: str = "base"


def resolve_stage(stage: str, pref_loss: Optional[str] = "sigmoid") -> tuple[str, str]:
    """(stage, loss) from train.stage and train.pref_loss, with LLaMA-Factory's names: its DPO stage
    with pref_loss orpo or simpo is nekotune's orpo/simpo stage; kto_pair is gone from TRL."""
    stage = (stage or "sft").lower()
    loss = (pref_loss or "sigmoid").lower().replace(" ", "")
    if stage not in STAGES:
        raise UserError(f"unknown train.stage {stage!r}; use one of {', '.join(STAGES)}")
    if loss == "kto_pair":
        raise UserError("train.pref_loss=kto_pair is gone from TRL; use train.stage=kto (it takes pairs too)")
    if stage == "dpo" and loss in ("orpo", "simpo"):
        return loss, "sigmoid"
    if stage == "dpo":
        bad = [x for x in loss.split(",") if x not in DPO_LOSSES]
        if bad:
            raise UserError(f"unknown train.pref_loss {bad[0]!r} for train.stage=dpo; use one of "
                            f"{', '.join(DPO_LOSSES)} (comma-separated to combine), or orpo/simpo")
    elif stage == "kto":
        loss = "kto" if loss == "sigmoid" else loss
        if loss not in KTO_LOSSES:
            raise UserError(f"unknown train.pref_loss {loss!r} for train.stage=kto; use one of {', '.join(KTO_LOSSES)}")
    return stage, loss


# -- TRL configs -----------------------------------------------------------------------------------
# Set whatever TrainingArguments nekotune builds: TRL's configs default to bf16=True (refused on a CPU
# without use_cpu), gradient_checkpointing=True (nekotune enables checkpointing on the model when it
# wants it) and learning_rate=1e-6, and TRL would otherwise read the text columns it expects.
FIXED_ARGS = {"gradient_checkpointing": False, "remove_unused_columns": False, "disable_tqdm": True,
              "report_to": "none", "dataloader_num_workers": 0}
# Liger's kernels replace SFT's layers only; TRL's use_liger_kernel would switch DPO to Liger's own loss.
DROPPED_ARGS = ("use_liger_kernel", "liger_kernel_config")


def trl_config(stage: str, training_kwargs: dict, settings: PreferenceSettings, max_length: int):
    """The TRL config for a stage from the TrainingArguments keyword arguments nekotune builds for SFT
    (output_dir, batch sizes, lr, schedule, save/eval steps, seed, bf16, use_cpu ...)."""
    spec = STAGES[stage]
    kwargs: dict[str, Any] = {k: v for k, v in training_kwargs.items() if k not in DROPPED_ARGS}
    kwargs.update(FIXED_ARGS, bf16=bool(kwargs.get("bf16", False)), max_length=max_length)
    beta = settings.beta if settings.beta is not None else (spec.default_beta or 0.1)
    if stage == "dpo":
        from trl import DPOConfig

        losses = settings.loss.split(",")
        weights = [1.0] * len(losses)
        if settings.ftx > 0:
            losses, weights = losses + ["sft"], weights + [settings.ftx]
        extra: dict[str, Any] = {"label_smoothing": 1e-3} if "exo_pair" in losses else {}  # exo_pair needs it above 0
        return DPOConfig(beta=beta, loss_type=losses, loss_weights=weights, **extra, **kwargs)
    if stage == "kto":
        from trl import KTOConfig

        batch = kwargs.get("per_device_train_batch_size", 8)
        if batch < 2:
            raise UserError("train.stage=kto needs train.batch_size of 2 or more (its KL term pairs each answer "
                            "with another prompt of the same batch)")
        # the eval KL column is built in blocks of the train batch size: evaluate in the same blocks
        kwargs["per_device_eval_batch_size"] = batch
        loss = settings.loss if settings.loss in KTO_LOSSES else "kto"
        return KTOConfig(beta=beta, loss_type=loss, **kwargs)
    if stage == "orpo":
        from trl.experimental.orpo import ORPOConfig

        return ORPOConfig(beta=beta, **kwargs)
    if stage == "simpo":
        from trl.experimental.cpo import CPOConfig

        # cpo_alpha=0 turns CPO's behaviour-cloning term off: SimPO proper
        return CPOConfig(loss_type="simpo", cpo_alpha=0.0, simpo_gamma=settings.simpo_gamma, beta=beta, **kwargs)
    raise ValueError(f"stage {stage} is trained by nekotune's own Trainer, not TRL")


# -- the trainer subclasses ------------------------------------------------------------------------
def policy_tokens(inputs: dict) -> int:
    """Tokens through the policy's forward + backward in a batch (chosen and rejected rows)."""
    if "attention_mask" in inputs:  # DPO (2B rows) and KTO
        return int(inputs["attention_mask"].sum())
    return int(inputs["chosen_attention_mask"].sum() + inputs["rejected_attention_mask"].sum())  # CPO, ORPO


def cpo_row(feature: dict) -> dict:
    """prompt_ids/chosen_ids/rejected_ids -> the keys CPO's and ORPO's tokenize_row make for a decoder:
    no BOS/EOS added (the Renderer's prompt starts as the template does, each answer ends with the end
    of turn) and no truncation (PreferenceEncoder did it); the prompt is -100 in the labels."""
    prompt = feature["prompt_ids"]
    out = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
    for side in ("chosen", "rejected"):
        answer = feature[f"{side}_ids"]
        out[f"{side}_input_ids"] = prompt + answer
        out[f"{side}_attention_mask"] = [1] * (len(prompt) + len(answer))
        out[f"{side}_labels"] = [-100] * len(prompt) + answer
    return out


def _with_nekotune_steps(base: type) -> type:
    from nekotune.training.trainer import finite_loss

    class NekoSteps(base):
        """nekotune's SFT trainer step, around TRL's: tokens counted, NaN/inf stops (or skips) the step."""

        stats = None
        nan_policy = "stop"

        def training_step(self, model, inputs, num_items_in_batch=None):
            if self.stats is not None:
                self.stats.tokens += policy_tokens(inputs)
            return finite_loss(self, model, super().training_step(model, inputs, num_items_in_batch))

        def create_model_card(self, *args, **kwargs):
            # TRL writes a README.md into output_dir (run/checkpoints/) at every save; the run directory
            # documents the run (config.yaml, run.json) instead.
            return None

    NekoSteps.__name__ = f"Neko{base.__name__}"
    return NekoSteps


@functools.lru_cache(maxsize=1)
def _trainer_classes() -> dict[str, type]:
    import torch.nn.functional as F
    from trl import DPOTrainer, KTOTrainer
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    class PretokDPOTrainer(_with_nekotune_steps(DPOTrainer)):  # type: ignore[misc]
        """Rows hold prompt_ids/chosen_ids/rejected_ids; TRL's preparation would look for text columns
        (KeyError 'chosen'). Its collator reads only those three columns."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    class PretokKTOTrainer(_with_nekotune_steps(KTOTrainer)):  # type: ignore[misc]
        """Rows hold prompt_ids/completion_ids/label; of TRL's preparation only the KL column is kept:
        each completion paired with the previous prompt inside every block of one batch."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if not self.calculate_KL:
                return dataset

            def add_kl(batch):
                batch["KL_completion_ids"] = [batch["completion_ids"][-1]] + batch["completion_ids"][:-1]
                return batch

            return dataset.map(add_kl, batched=True, batch_size=args.per_device_train_batch_size)

    class PretokCPOTrainer(_with_nekotune_steps(CPOTrainer)):  # type: ignore[misc]
        def tokenize_row(self, feature, model=None):
            return cpo_row(feature)

    class PretokORPOTrainer(_with_nekotune_steps(ORPOTrainer)):  # type: ignore[misc]
        def tokenize_row(self, feature, model=None):
            return cpo_row(feature)

        def concatenated_forward(self, model, batch):
            # TRL's ORPO NLL covers prompt and answer ("computed over the full prompt and response"),
            # the system prompt included; nekotune (and LLaMA-Factory's ORPO) train answers only. The
            # term is recomputed from the chosen logits TRL returns ([:, :-1], already shifted).
            out = list(super().concatenated_forward(model, batch))
            logits, labels = out[2], batch["chosen_labels"][:, 1:]
            if labels.shape[1] < logits.shape[1]:
                labels = F.pad(labels, (0, logits.shape[1] - labels.shape[1]), value=-100)
            out[4] = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten().to(logits.device),
                                     ignore_index=-100)
            return tuple(out)

    return {"dpo": PretokDPOTrainer, "kto": PretokKTOTrainer, "simpo": PretokCPOTrainer, "orpo": PretokORPOTrainer}


@contextlib.contextmanager
def _quiet_datasets():
    from datasets.utils import logging as ds_logging

    was_enabled = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            ds_logging.enable_progress_bar()


def build_preference_trainer(stage: str, model: Any, tokenizer: Any, train_rows: list[dict],
                             eval_rows: Optional[list[dict]], training_kwargs: dict, settings: PreferenceSettings,
                             max_length: int, callbacks: Optional[list] = None, stats: Any = None,
                             nan_policy: str = "stop"):
    """The TRL trainer of `stage` for a LoRA PeftModel and encoded rows (EncodedPair.row() /
    EncodedKTO.row()). settings.reference "base": TRL's copy of the adapter is deleted, so the reference
    pass runs with the adapter disabled; "sft": the copy (the SFT adapter as loaded) is the reference."""
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    spec = STAGES[stage]
    if not spec.preference:
        raise ValueError(f"stage {stage} is trained by nekotune's own Trainer")
    if not hasattr(model, "peft_config"):
        raise ValueError("preference stages train a LoRA PeftModel (build_peft_model or a loaded SFT adapter)")
    if "ref" in model.peft_config:
        raise ValueError("the model already holds an adapter named `ref`; TRL reserves that name for the reference")
    if settings.reference not in ("base", "sft"):
        raise ValueError(f"reference must be base or sft, got {settings.reference!r}")
    rows = list(train_rows)
    if stage == "kto":
        # KTO samples in order (its KL pairs are fixed blocks of one batch): shuffle once, with the seed
        random.Random(training_kwargs.get("seed", 42)).shuffle(rows)
    args = trl_config(stage, training_kwargs, settings, max_length)
    with _quiet_datasets():  # stages never print: TRL's dataset.map calls would draw progress bars
        trainer = _trainer_classes()[stage](model=model, args=args, train_dataset=Dataset.from_list(rows),
                                 eval_dataset=Dataset.from_list(list(eval_rows)) if eval_rows else None,
                                 processing_class=tokenizer, callbacks=list(callbacks or []))
    if spec.reference and settings.reference == "base" and "ref" in trainer.model.peft_config:
        trainer.model.delete_adapter("ref")
    trainer.stats, trainer.nan_policy = stats, nan_policy
    for cb in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(cb)
    return trainer


def save_policy_adapter(model: Any, tokenizer: Any, path: str | Path) -> None:
    """The trained adapter only (never TRL's `ref` copy), in PEFT's safetensors format, written atomically."""
    from nekotune.io import atomic_dir

    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, selected_adapters=["default"])
        tokenizer.save_pretrained(tmp)


