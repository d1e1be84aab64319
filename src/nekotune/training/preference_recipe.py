"""The preference recipe (train.stage dpo, orpo, simpo, kto): nekotune's run directory, lock, resume,
progress, NaN guard and OOM advice (recipe.py's `_train_in`), around TRL's trainers (preference.py).

What differs from SFT is only how the parts are made and what is saved:
- data: pairs or KTO rows through the Renderer (data/preference_tokens.py), never TRL's templating;
- model: a fresh LoRA on the base, or the adapter of an SFT run (`model.name_or_path=outputs/sft-run`)
  trained further, with TRL's frozen copy of it as the reference (run.json `reference: sft`);
- results: the policy adapter only (never TRL's `ref` copy), run.json with the stage, beta, reference
  and the reward metrics, loss.png and rewards.png.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nekotune.config import Config
from nekotune.registry import TRAINING_STAGES
from nekotune.training import recipe as R
from nekotune.training.callbacks import Stats, TrainReporter, make_callbacks
from nekotune.training.preference import (
    PreferenceSettings,
    build_preference_trainer,
    resolve_stage,
    save_policy_adapter,
)
from nekotune.training.report import write_run_json
from nekotune.training.rewards import plot_run, reward_metrics


def train(cfg: Config, show_progress: bool = True, after_train: R.AfterTrain | None = None, stop_flag: Any = None,
          callbacks: list | None = None, reporter: TrainReporter | None = None) -> Path:
    """Preference-tune and return the run directory; the arguments are recipe.train's."""
    resolve_stage(cfg.train.stage, cfg.train.pref_loss)  # a bad pref_loss is refused before the run dir exists
    cfg = with_sft_prompt(cfg)
    run, lock = R.claim_run_dir(cfg)
    try:
        return R._train_in(run, cfg, show_progress, after_train, stop_flag, callbacks, reporter or TrainReporter(),
                           stage=PreferenceStage)
    finally:
        if lock is not None:
            lock.release()


def with_sft_prompt(cfg: Config) -> Config:
    """Starting from an SFT run: its system prompt and thinking mode unless this config sets them, so pairs
    render as the SFT data did, and config.yaml (what chat with the new run renders with) says so."""
    from nekotune.model import resolve

    data = (resolve(cfg.model.name_or_path or None).run_config or {}).get("data") or {}
    update = {k: data[k] for k in ("system_prompt", "enable_thinking")
              if isinstance(data, dict) and data.get(k) is not None and k not in cfg.data.model_fields_set}
    return cfg.model_copy(update={"data": cfg.data.model_copy(update=update)}) if update else cfg


@dataclass
class PrefParts(R._Parts):
    stage: str = "dpo"
    loss: str = "sigmoid"
    reference: str = "base"  # "sft": the SFT adapter the run started from (TRL's frozen copy of it)
    reference_adapter: str | None = None  # the SFT adapter the run started from (eval PAIRS loads it as "ref")


def settings_of(cfg: Config, reference: str = "base") -> PreferenceSettings:
    """train.pref_beta / pref_loss / pref_ftx / simpo_gamma as the trainers take them."""
    stage, loss = resolve_stage(cfg.train.stage, cfg.train.pref_loss)
    return PreferenceSettings(beta=cfg.train.pref_beta, loss=loss, simpo_gamma=cfg.train.simpo_gamma,
                              ftx=cfg.train.pref_ftx, reference=reference)


def effective_beta(cfg: Config) -> float | None:
    stage, _ = resolve_stage(cfg.train.stage, cfg.train.pref_loss)
    return cfg.train.pref_beta if cfg.train.pref_beta is not None else TRAINING_STAGES[stage].default_beta


def _policy(cfg: Config, spec: Any, precision: Any, grad_ckpt: bool) -> Any:
    """A fresh LoRA on the base, or (spec.adapter: an SFT run) that adapter, trainable. The base is loaded
    alone first, so 4-bit preparation and gradient checkpointing happen before any adapter, as for SFT."""
    from peft import prepare_model_for_kbit_training

    from nekotune import model as M

    model = M.load_model(M.ModelSource(base=spec.base), cfg.model, precision, training=True)
    if not spec.adapter:
        return R.build_peft_model(model, cfg, grad_ckpt)
    if cfg.model.quantization:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=grad_ckpt)
    elif grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return M.attach_adapter(model, spec, trainable=True)


class PreferenceStage:
    """The three hooks recipe._train_in calls."""

    @staticmethod
    def prepare(cfg: Config, run: Path, rank0: bool, reporter: TrainReporter) -> PrefParts:
        from transformers import set_seed

        from nekotune import model as M
        from nekotune.data import Renderer
        from nekotune.data.preference_tokens import prepare_preference
        from nekotune.training.speed import fuse_lora_adds

        stage, loss = resolve_stage(cfg.train.stage, cfg.train.pref_loss)
        device = M.pick_device(cfg.model.device)
        M.check_quantization(cfg.model, device)
        precision = M.pick_precision(device, cfg.model.dtype, training=True)
        set_seed(cfg.train.seed)
        spec = M.resolve(cfg.model.name_or_path or None, hub=M.HubChoice.of(cfg.model))
        tokenizer = M.load_tokenizer(spec, cfg.model)
        renderer = Renderer.from_config(tokenizer, cfg.data)
        data = prepare_preference(cfg.data, renderer, TRAINING_STAGES[stage].data, cfg.train.seed)
        if rank0:
            reporter.prepared(data.stats, precision.name, precision.device, run)
        grad_ckpt = R.wants_grad_checkpointing(cfg, device)
        model = _policy(cfg, spec, precision, grad_ckpt)
        # not install_fast_loss: DPO/KTO compute their own log-probs, CPO/ORPO need the logits
        speed = {"fused_lora_layers": fuse_lora_adds(model), "packed_attention": False, "fast_loss": False}
        reference = "sft" if spec.adapter and TRAINING_STAGES[stage].reference else "base"
        return PrefParts(spec.base, tokenizer, renderer, data, model, precision, grad_ckpt, speed,  # type: ignore[arg-type]
                         stage=stage, loss=loss, reference=reference,
                         reference_adapter=spec.adapter)

    @staticmethod
    def make_trainer(cfg: Config, run: Path, parts: PrefParts, stats: Stats, interrupt: Any, live: bool,
                     callbacks: list | None, reporter: TrainReporter) -> Any:
        rank0 = R._is_rank0()
        plans = parts.plans = R._plans(cfg, run, parts.data)  # checkpoints, best, early stopping, trackers
        all_callbacks = (make_callbacks(stats, reporter, live and rank0, interrupt) + plans.checkpoints.callbacks
                         + plans.trackers.callbacks + list(callbacks or []))
        kwargs = R.training_kwargs(cfg, run, parts.precision, parts.data, parts.grad_ckpt, plans)
        data: Any = parts.data  # a PreparedPreference
        return build_preference_trainer(parts.stage, parts.model, parts.tokenizer, [e.row() for e in data.train],
                                        [e.row() for e in data.eval] or None, kwargs,
                                        settings_of(cfg, parts.reference), max_length=cfg.data.max_seq_len,
                                        callbacks=all_callbacks, stats=stats, nan_policy=cfg.train.nan_policy)

    @staticmethod
    def save_results(cfg: Config, run: Path, parts: PrefParts, trainer: Any, stats: Stats) -> None:
        history = trainer.state.log_history
        extra = {"stage": parts.stage, "pref_loss": parts.loss, "pref_beta": effective_beta(cfg),
                 "reference": parts.reference, "reference_adapter": parts.reference_adapter, **reward_metrics(history)}
        try:
            save_policy_adapter(parts.model, parts.tokenizer, run / "adapter")
            write_run_json(cfg, run, parts.data.stats, trainer.state, stats, parts.precision, parts.grad_ckpt,
                           parts.base, parts.speed, extra=extra)
            if cfg.output.plot:
                plot_run(history, run)
        except Exception as exc:
            R._raise_if_disk_full(exc, run, True)
            raise
