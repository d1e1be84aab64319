"""Preference tuning with LoRA on TRL's trainers: DPO, ORPO, SimPO and KTO (phase B: train/preference.py).

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
from typing import Any, Callable, Optional

from nekotune.errors import UserError


# -- the stage registry ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Stage:
    name: str
    data: str  # "sft" (conversations) | "text" (plain text) | "pairs" (chosen + rejected) | "kto" (answer + label)
    grad_rows: int  # sequences per example through forward + backward
    nograd_rows: int  # sequences per example through a no-grad forward (reference, KL)
    full_logits: bool = False  # materialises [rows, length, vocab] logits (TRL's CPO/ORPO)
    reference: bool = False  # needs a reference model (base with the adapter disabled, or the SFT model)
    default_beta: Optional[float] = None
    trainer: Optional[Callable[[], type]] = None  # the TRL subclass; None: nekotune's own SFT Trainer

    @property
    def step_cost(self) -> float:
        """Compute per example relative to one SFT sequence of the same length (a forward is 1, forward +
        backward 3). DPO: 2.67; measured 2.62 on SmolLM2 (research-18, ratio_smol.py)."""
        return (3 * self.grad_rows + self.nograd_rows) / 3


def _trl(stage: str) -> Callable[[], type]:
    """The stage's trainer class, built (and TRL imported) on first use."""
    return lambda: _trainer_classes()[stage]


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("sft", "sft", grad_rows=1, nograd_rows=0),
    Stage("pt", "text", grad_rows=1, nograd_rows=0),
    # policy chosen + rejected with gradients, the same two through the reference
    Stage("dpo", "pairs", grad_rows=2, nograd_rows=2, reference=True, default_beta=0.1, trainer=_trl("dpo")),
    # no reference; TRL's CPO/ORPO compute log-probs from full logits
    Stage("orpo", "pairs", grad_rows=2, nograd_rows=0, full_logits=True, default_beta=0.1, trainer=_trl("orpo")),
    Stage("simpo", "pairs", grad_rows=2, nograd_rows=0, full_logits=True, default_beta=2.0, trainer=_trl("simpo")),
    # one answer with gradients; no-grad: the policy on the mismatched (KL) answer, the reference on both
    Stage("kto", "kto", grad_rows=1, nograd_rows=3, reference=True, default_beta=0.1, trainer=_trl("kto")),
)}
PREFERENCE_STAGES = tuple(name for name, s in STAGES.items() if s.trainer is not None)

# DPOConfig.loss_type values that trained with LoRA on pre-tokenized rows here (TRL 1.16).
DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
KTO_LOSSES = ("kto", "apo_zero_unpaired")


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
    kwargs = {k: v for k, v in training_kwargs.items() if k not in DROPPED_ARGS}
    kwargs.update(FIXED_ARGS, bf16=bool(kwargs.get("bf16", False)), max_length=max_length)
    beta = settings.beta if settings.beta is not None else spec.default_beta
    if stage == "dpo":
        from trl import DPOConfig

        losses = settings.loss.split(",")
        weights = [1.0] * len(losses)
        if settings.ftx > 0:
            losses, weights = losses + ["sft"], weights + [settings.ftx]
        extra = {"label_smoothing": 1e-3} if "exo_pair" in losses else {}  # exo_pair needs it above 0
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
    import torch

    from nekotune.train import NonFiniteLoss

    class NekoSteps(base):  # type: ignore[misc, valid-type]
        """nekotune's SFT trainer step, around TRL's: tokens counted, NaN/inf stops (or skips) the step."""

        stats = None
        nan_policy = "stop"

        def training_step(self, model, inputs, num_items_in_batch=None):
            if self.stats is not None:
                self.stats.tokens += policy_tokens(inputs)
            loss = super().training_step(model, inputs, num_items_in_batch)
            if not torch.isfinite(loss):
                step = self.state.global_step + 1
                if self.nan_policy == "skip":
                    model.zero_grad(set_to_none=True)
                    if self.stats is not None:
                        self.stats.skipped_steps.append(step)
                    return torch.zeros_like(loss)
                raise NonFiniteLoss(step)
            return loss

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
    if spec.trainer is None:
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
        trainer = spec.trainer()(model=model, args=args, train_dataset=Dataset.from_list(rows),
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


# -- metrics for run.json and the plot -------------------------------------------------------------
REWARD_KEYS = ("chosen", "rejected", "margins", "accuracies")


def _reward_rows(history: list[dict], prefix: str) -> list[dict]:
    rows = []
    for h in history:
        values = {k: h[f"{prefix}rewards/{k}"] for k in REWARD_KEYS if f"{prefix}rewards/{k}" in h}
        if values:
            rows.append({"step": h.get("step"), **values})
    return rows


def reward_metrics(history: list[dict]) -> dict:
    """rewards/{chosen,rejected,margins,accuracies} (training) and their eval_ twins from
    trainer.state.log_history, for run.json. TRL scores ties as wrong, so accuracy starts at 0, not
    0.5; KTO logs no accuracy, and chosen/rejected only for batches that hold both labels."""
    train, evals = _reward_rows(history, ""), _reward_rows(history, "eval_")
    out: dict = {"rewards": train, "eval_rewards": evals}
    for prefix, rows in (("", train), ("eval_", evals)):
        for key, name in (("margins", "margin"), ("accuracies", "accuracy")):
            out[f"final_{prefix}reward_{name}"] = next((r[key] for r in reversed(rows) if key in r), None)
    return out


def plot_rewards(history: list[dict], path: str | Path) -> bool:
    """rewards.png beside loss.png: chosen, rejected and margin per step (train lines, eval points) and
    the reward accuracy. False when the history holds no reward (nothing written)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nekotune.io import atomic_write_bytes

    metrics = reward_metrics(history)
    if not metrics["rewards"] and not metrics["eval_rewards"]:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for rows, style, tag in ((metrics["rewards"], "-", ""), (metrics["eval_rewards"], "o--", "eval ")):
        for key, ax in (("chosen", left), ("rejected", left), ("margins", left), ("accuracies", right)):
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                ax.plot(*zip(*points, strict=True), style, label=f"{tag}{key}")
    for ax, label in ((left, "reward"), (right, "reward accuracy")):
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return True


def plot_run(history: list[dict], run: str | Path) -> None:
    """loss.png with nekotune's SFT plot (TRL logs loss and eval_loss as the Trainer does) and rewards.png."""
    from nekotune.train import plot_losses

    plot_losses(history, Path(run) / "loss.png")
    plot_rewards(history, Path(run) / "rewards.png")


# -- held-out evaluation: `nekotune eval PAIRS --model RUN` ----------------------------------------
def sequence_logps(model: Any, sequences: list[tuple[list[int], list[int]]], pad_id: int,
                   batch_size: int = 8) -> list[float]:
    """Summed log-probability of each answer after its prompt, for (prompt_ids, answer_ids) pairs: one
    right-padded forward per batch (padding after a row cannot change its causal attention), then
    nekotune's chunked cross-entropy on the answer positions only (no [rows, length, vocab] logits)."""
    import torch

    from nekotune.train import _ce_sum, causal_lm, loss_chunk

    lm = causal_lm(model)
    device = next(lm.parameters()).device
    weight = lm.get_output_embeddings().weight
    chunk = loss_chunk(weight.shape[0])
    out = [0.0] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]) + len(sequences[i][1]))
    for start in range(0, len(order), batch_size):
        rows = [sequences[i] for i in order[start:start + batch_size]]
        width = max(len(p) + len(a) for p, a in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for j, (p, a) in enumerate(rows):
            ids[j, :len(p) + len(a)] = torch.tensor(p + a, device=device)
            mask[j, :len(p) + len(a)] = 1
        hidden = lm.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        for j, (p, a) in enumerate(rows):
            h = hidden[j, len(p) - 1:len(p) + len(a) - 1]
            out[order[start + j]] = -_ce_sum(h, weight, ids[j, len(p):len(p) + len(a)], chunk, grads=False)[0].item()
    return out


def _side_logps(model: Any, rows: list, pad_id: int) -> list[tuple[float, float]]:
    seqs = [(r.prompt_ids, side) for r in rows for side in (r.chosen_ids, r.rejected_ids)]
    logps = sequence_logps(model, seqs, pad_id)
    return list(zip(logps[0::2], logps[1::2], strict=True))


def preference_eval(model: Any, renderer: Any, pairs: list, beta: float = 0.1,
                    ref_adapter: Optional[str] = None) -> dict:
    """Held-out reward accuracy and mean margin of a LoRA policy against its reference: DPO's implicit
    reward beta * (log pi(answer) - log ref(answer)), the reference being the model with the adapter
    disabled, or `ref_adapter` (the SFT adapter loaded under that name) for runs that started from SFT.
    Used for every stage, so figures compare across stages (ORPO's and SimPO's logged rewards are
    policy-only). `pairs`: PreferencePairs (encoded here) or EncodedPairs; a tie counts as wrong."""
    import torch

    from nekotune.data.preference import PreferencePair
    from nekotune.data.preference_tokens import PreferenceEncoder
    from nekotune.generate import autocast_for

    encoder = PreferenceEncoder(renderer)
    rows = [encoder.encode_pair(p) if isinstance(p, PreferencePair) else p for p in pairs]
    kept = [r for r in rows if r is not None and r.chosen_ids != r.rejected_ids]
    if not kept:
        raise UserError("no pair left to evaluate (each is identical or longer than data.max_seq_len)")
    tok = renderer.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast_for(model):
            policy = _side_logps(model, kept, pad_id)
            if ref_adapter is None:
                with model.disable_adapter():
                    reference = _side_logps(model, kept, pad_id)
            else:
                active = model.active_adapter
                model.set_adapter(ref_adapter)
                try:
                    reference = _side_logps(model, kept, pad_id)
                finally:
                    model.set_adapter(active)
    finally:
        model.train(was_training)
    rewards = [(beta * (p[0] - r[0]), beta * (p[1] - r[1])) for p, r in zip(policy, reference, strict=True)]
    n = len(kept)
    return {"reward_accuracy": sum(c > r for c, r in rewards) / n, "mean_margin": sum(c - r for c, r in rewards) / n,
            "reward_chosen": sum(c for c, _ in rewards) / n, "reward_rejected": sum(r for _, r in rewards) / n,
            # how often the policy itself gives the chosen answer the higher log-probability (no reference)
            "policy_prefers_chosen": sum(p[0] > p[1] for p in policy) / n,
            "n": n, "skipped": len(pairs) - n, "beta": beta, "reference": ref_adapter or "base"}
