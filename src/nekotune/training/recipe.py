"""The supervised fine-tuning recipe: transformers Trainer + peft LoRA, with nekotune's data,
loss and run directory.

The Trainer does the loop, checkpoints, resume (optimizer, scheduler, RNG, data position) and
accumulation. nekotune adds what it lacks for small machines: the trained-positions loss
(loss.py), padding-free batches (data/collate.py) and a run directory (runs.py, report.py).
Nothing here prints: progress goes to a TrainReporter (callbacks.py), notes to logging.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from nekotune.config import Config
from nekotune.data import PreparedData, Renderer, prepare
from nekotune.errors import UserError
from nekotune.io import atomic_write_text
from nekotune.registry import PREFERENCE_STAGES
from nekotune.runs import (
    check_resume_compatible,
    claim_run_dir,
    is_disk_full,
    last_checkpoint,
    remove_incomplete_checkpoints,
    resume_checkpoint,
)
from nekotune.training.callbacks import (
    Interrupt,
    Stats,
    TrainingInterrupted,
    TrainReporter,
    make_callbacks,
)
from nekotune.training.report import plot_losses, save_adapter, write_run_json
from nekotune.training.trainer import NonFiniteLoss, install_speedups, make_trainer_class

log = logging.getLogger(__name__)

AfterTrain = Callable[[Any, Renderer, Path], None]


def train(cfg: Config, show_progress: bool = True, after_train: AfterTrain | None = None, stop_flag: Any = None,
          callbacks: list | None = None, reporter: TrainReporter | None = None) -> Path:
    """Fine-tune and return the run directory.

    `reporter` hears the progress (see TrainReporter; `show_progress` asks it for a live display);
    `after_train(model, renderer, run)` runs on rank 0 with the trained model still in memory;
    `stop_flag` (anything with a `requested` attribute) stops training after the current step
    instead of Ctrl-C; `callbacks` are extra transformers TrainerCallbacks. The run directory is
    locked for the whole call (see runs.py): a second process is refused."""
    cfg = _for_this_device(cfg)
    if cfg.train.stage in PREFERENCE_STAGES:  # issue 18: for callers of this function itself
        from nekotune.training.preference_recipe import train as preference_train

        return preference_train(cfg, show_progress, after_train, stop_flag, callbacks, reporter)
    run, lock = claim_run_dir(cfg)
    try:
        return _train_in(run, cfg, show_progress, after_train, stop_flag, callbacks, reporter or TrainReporter())
    finally:
        if lock is not None:
            lock.release()


@dataclass
class _Parts:
    base: str
    tokenizer: Any
    renderer: Renderer
    data: PreparedData
    model: Any
    precision: Any
    grad_ckpt: bool
    speed: dict
    plans: Any = None  # the _Plans the Trainer was built with (issue 16), set by make_trainer


def _prepare(cfg: Config, run: Path, rank0: bool, reporter: TrainReporter) -> _Parts:
    """Model, tokenizer and data, ready for the Trainer."""
    from transformers import set_seed

    from nekotune import model as M

    device = M.pick_device(cfg.model.device)
    M.check_quantization(cfg.model, device)
    precision = M.pick_precision(device, cfg.model.dtype, training=True)
    set_seed(cfg.train.seed)
    spec = M.resolve(cfg.model.name_or_path or None, hub=M.HubChoice.of(cfg.model))
    if spec.adapter:
        raise UserError(f"model.name_or_path={cfg.model.name_or_path} is an adapter; train on its base model "
                        f"({spec.base}) or merge it first with `nekotune merge`")
    tokenizer, renderer = M.load_renderer(spec, cfg)  # a VisionRenderer for a vision-language model
    data = prepare(cfg, renderer)
    if rank0:
        reporter.prepared(data.stats, precision.name, precision.device, run)
    model = M.load_model(spec, cfg.model, precision, training=True)
    grad_ckpt = wants_grad_checkpointing(cfg, device)
    model = build_peft_model(model, cfg, grad_ckpt)
    speed = install_speedups(model, cfg.data.packing)
    return _Parts(spec.base, tokenizer, renderer, data, model, precision, grad_ckpt, speed)


class _Examples:
    """The encoded rows as the Trainer's dataset (a torch map-style dataset needs only these two)."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return {"input_ids": self.items[i].input_ids, "labels": self.items[i].labels}


@dataclass
class _Plans:
    """What train.* asks of the Trainer beyond the loop (issue 16): the save/eval schedule, the best
    checkpoint and early stopping (checkpointing.py), and the experiment trackers (trackers.py)."""

    checkpoints: Any
    trackers: Any


def _plans(cfg: Config, run: Path, data: PreparedData) -> _Plans:
    from nekotune.checkpointing import checkpoint_plan
    from nekotune.trackers import tracker_plan

    ckpt = checkpoint_plan(cfg.train, has_eval=bool(data.eval))
    report_to = cfg.train.report_to
    if report_to is None:  # the default: TensorBoard, unless output.tensorboard=false or it is not installed
        import importlib.util

        report_to = ["tensorboard"] if cfg.output.tensorboard and importlib.util.find_spec("tensorboard") else []
    elif not cfg.output.tensorboard:
        report_to = [t for t in report_to if t != "tensorboard"]
    trackers = tracker_plan(report_to or "none", run, cfg.output.run_name or run.name, cfg.to_dict(),
                            rank0=_is_rank0(), mlflow_store=run.parent / "mlruns")
    for note in ckpt.notes + trackers.notes:
        log.warning("note: %s", note)
    return _Plans(ckpt, trackers)


def _make_trainer(cfg: Config, run: Path, parts: _Parts, stats: Stats, interrupt: Any, live: bool,
                  callbacks: list | None, reporter: TrainReporter) -> Any:
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    data = parts.data
    plans = parts.plans = _plans(cfg, run, data)
    all_callbacks = (make_callbacks(stats, reporter, live and _is_rank0(), interrupt) + plans.checkpoints.callbacks
                     + plans.trackers.callbacks + list(callbacks or []))
    examples, collator = _examples_and_collator(cfg, parts)
    trainer = make_trainer_class()(
        model=parts.model, args=training_args(cfg, run, parts.precision, data, parts.grad_ckpt, plans),
        train_dataset=examples(data.train), eval_dataset=examples(data.eval) if data.eval else None,
        data_collator=collator, callbacks=all_callbacks, stats=stats, nan_policy=cfg.train.nan_policy)
    for cb in (ProgressCallback, PrinterCallback):  # the reporter shows progress instead
        trainer.remove_callback(cb)
    return trainer


def _examples_and_collator(cfg: Config, parts: _Parts) -> tuple[Callable[[list], Any], Any]:
    """Text rows, or image rows (issue 17): pixels decoded per row when fetched, batches with
    mm_token_type_ids and, packed, per-example M-RoPE positions (2-D positions would turn it off)."""
    from nekotune.data.collate import Collator
    from nekotune.data.vision_collate import VisionCollator, VisionDataset
    from nekotune.data.vision_render import VisionRenderer
    from nekotune.training.vision_loss import rope_index_of

    pad_id = parts.tokenizer.pad_token_id
    renderer = parts.renderer
    if not isinstance(renderer, VisionRenderer):
        return _Examples, Collator(pad_id, cfg.data.packing)
    rope_index = rope_index_of(parts.model) if cfg.data.packing else None
    return (lambda items: VisionDataset(items, renderer),
            VisionCollator(pad_id, renderer.image_token_id, packing=cfg.data.packing, rope_index=rope_index))


def _is_rank0() -> bool:
    from nekotune.distributed import is_main_process

    return is_main_process()


def _train_in(run: Path, cfg: Config, show_progress: bool, after_train: AfterTrain | None, stop_flag: Any,
              callbacks: list | None, reporter: TrainReporter, stage: Any = None) -> Path:
    """`stage`: another recipe's prepare/make_trainer/save_results (preference_recipe.py); default SFT's."""
    import torch

    prepare, make_trainer, save_results = (_prepare, _make_trainer, _save_results) if stage is None else (
        stage.prepare, stage.make_trainer, stage.save_results)

    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    rank0 = _is_rank0()
    if rank0:
        remove_incomplete_checkpoints(run)  # safe: this process holds the run's lock
    resume_from = resume_checkpoint(cfg, run)
    if resume_from:
        check_resume_compatible(cfg, run)
    parts = prepare(cfg, run, rank0, reporter)
    run.mkdir(parents=True, exist_ok=True)
    if rank0:
        atomic_write_text(run / "config.yaml", cfg.to_yaml())
    stats = Stats()
    interrupt = stop_flag if stop_flag is not None else Interrupt(reporter)
    trainer = make_trainer(cfg, run, parts, stats, interrupt, show_progress, callbacks, reporter)
    try:
        with (interrupt if stop_flag is None else contextlib.nullcontext()):
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except NonFiniteLoss as exc:
        last = last_checkpoint(run)
        raise UserError(f"{exc}; the last good checkpoint is {last or 'none'}; lower train.lr, check the data, "
                        f"or set train.nan_policy=skip") from None
    except (torch.OutOfMemoryError, MemoryError):
        raise UserError(_oom_advice(cfg)) from None
    except Exception as exc:
        _raise_if_disk_full(exc, run, rank0)
        raise
    if interrupt.requested:
        raise TrainingInterrupted(run, last_checkpoint(run))
    if rank0:
        save_results(cfg, run, parts, trainer, stats)
        if after_train is not None:
            after_train(parts.model, parts.renderer, run)
    return run


def _save_results(cfg: Config, run: Path, parts: _Parts, trainer: Any, stats: Stats) -> None:
    from nekotune.checkpointing import best_fields, stop_message

    # with train.load_best the Trainer has loaded the best checkpoint's weights: adapter/ is the best
    best = best_fields(trainer.state, run, parts.plans.checkpoints)
    message = stop_message(best, trainer.state.max_steps)
    if message:
        log.warning("%s", message)
    try:
        save_adapter(parts.model, parts.tokenizer, run, processor_of=parts.base)
        write_run_json(cfg, run, parts.data.stats, trainer.state, stats, parts.precision, parts.grad_ckpt,
                       parts.base, {**parts.speed, **best})
        if cfg.output.plot:
            plot_losses(trainer.state.log_history, run / "loss.png")
    except Exception as exc:
        _raise_if_disk_full(exc, run, True)
        raise


def _raise_if_disk_full(exc: Exception, run: Path, rank0: bool) -> None:
    """A full disk mid-checkpoint surfaces as OSError, SafetensorError or RuntimeError depending on
    which writer hit it; each becomes the same one-line message, minus the half-written checkpoint."""
    if not is_disk_full(exc, run):
        return
    if rank0:
        remove_incomplete_checkpoints(run)
    raise UserError(f"disk full while saving to {run}; free space and resume with train.resume=true "
                    f"output.dir={run} (last good checkpoint: {last_checkpoint(run) or 'none'})") from None


def _oom_advice(cfg: Config) -> str:
    return (f"out of memory with batch_size={cfg.train.batch_size}, max_seq_len={cfg.data.max_seq_len}; try "
            f"train.batch_size={max(1, cfg.train.batch_size // 2)} train.grad_accum={cfg.train.grad_accum * 2}, "
            f"train.grad_checkpointing=true, data.max_seq_len={max(64, cfg.data.max_seq_len // 2)}"
            f"{', or model.quantization=4bit on CUDA' if not cfg.model.quantization else ''}; "
            f"`nekotune estimate --fit <memory>` proposes settings that fit")


# -- the model and the Trainer's arguments ---------------------------------------------------
def lora_config(cfg: Config, model_config: Any = None) -> Any:
    from peft import LoraConfig

    targets = cfg.lora.target_modules
    if isinstance(targets, str) and targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    if model_config is not None:  # a VLM: the language model only, unless lora.vision (issue 17)
        from nekotune.vision.families import lora_targets

        targets = lora_targets(model_config, targets, cfg.lora.vision)
    # peft annotates lora_alpha as int; it takes any number (the scale is alpha / r)
    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha,  # type: ignore[arg-type]
                      lora_dropout=cfg.lora.dropout, target_modules=targets,
                      modules_to_save=cfg.lora.modules_to_save, use_dora=cfg.lora.use_dora,
                      use_rslora=cfg.lora.use_rslora, bias="none", task_type="CAUSAL_LM")


def wants_grad_checkpointing(cfg: Config, device: str) -> bool:
    """devices' rule, which `nekotune estimate` follows too: on CPU RAM is rarely the limit and
    recomputation costs ~30% speed; on a GPU the quantized path is used because memory is short."""
    from nekotune.devices import wants_grad_checkpointing as device_rule

    return device_rule(device, cfg.model.quantization, cfg.train.grad_checkpointing)


def _for_this_device(cfg: Config) -> Config:
    """A preset's QLoRA on a CPU or a Mac becomes LoRA, with a note (devices.adapt_config)."""
    if not (cfg.preset and cfg.model.quantization):
        return cfg
    from nekotune import model as M
    from nekotune.devices import adapt_config, probe

    adapted, notes = adapt_config(cfg, probe(M.pick_device(cfg.model.device)))
    for note in notes:
        log.warning("note: %s", note)
    return adapted


def build_peft_model(model: Any, cfg: Config, grad_ckpt: bool) -> Any:
    from peft import get_peft_model, prepare_model_for_kbit_training

    if cfg.model.quantization:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=grad_ckpt)
    elif grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    try:
        peft_model = get_peft_model(model, lora_config(cfg, model.config))
    except ValueError as exc:
        raise UserError(f"LoRA setup failed: {str(exc).splitlines()[0]}; check lora.target_modules "
                        f"(or use all-linear)") from None
    return peft_model


def wants_liger(cfg: Config, device: str) -> bool:
    """train.liger=true: Liger's Triton kernels (RMSNorm, SwiGLU, RoPE) through the Trainer, on CUDA
    only; never imported elsewhere. nekotune's own chunked loss stays in place of Liger's."""
    import importlib.util

    if not cfg.train.liger:
        return False
    if device != "cuda":
        log.warning("note: train.liger=true applies to CUDA GPUs only; training on %s without Liger kernels", device)
        return False
    if importlib.util.find_spec("liger_kernel") is None:
        raise UserError("train.liger=true needs the liger-kernel package: pip install liger-kernel "
                        "(or set train.liger=false)")
    return True


LIGER_KERNELS = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
                 "fused_linear_cross_entropy": False}


def training_args(cfg: Config, run: Path, precision: Any, data: PreparedData, grad_ckpt: bool,
                  plans: _Plans | None = None) -> Any:
    """The Trainer's arguments: every choice the recipe makes is here, in one constructor call."""
    from transformers import TrainingArguments

    return TrainingArguments(**training_kwargs(cfg, run, precision, data, grad_ckpt, plans))


def training_kwargs(cfg: Config, run: Path, precision: Any, data: Any, grad_ckpt: bool,
                    plans: _Plans | None = None) -> dict:
    """training_args' keywords; the preference stages pass them to TRL's configs (TrainingArguments').
    `plans`: the schedule/best-checkpoint/early-stopping and tracker choices (made from the config
    when not given)."""
    import torch

    plans = plans or _plans(cfg, run, data)
    steps_per_epoch = math.ceil(len(data.train) / (cfg.train.batch_size * cfg.train.grad_accum))
    t = cfg.train
    return dict(
        output_dir=str(run / "checkpoints"),
        per_device_train_batch_size=t.batch_size, per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum, num_train_epochs=t.epochs,
        max_steps=t.max_steps if t.max_steps and t.max_steps > 0 else -1,
        learning_rate=t.lr, lr_scheduler_type=t.scheduler, warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        logging_steps=min(t.logging_steps, max(1, steps_per_epoch)), logging_first_step=True,
        # save/eval strategies and steps, save_total_limit (at least 2, never the best checkpoint),
        # load_best_model_at_end and metric_for_best_model: checkpointing.checkpoint_plan
        **plans.checkpoints.args,
        seed=t.seed, data_seed=t.seed,
        bf16=precision.autocast == torch.bfloat16, fp16=precision.autocast == torch.float16,
        use_cpu=precision.device == "cpu",
        use_liger_kernel=wants_liger(cfg, precision.device), liger_kernel_config=LIGER_KERNELS,
        # wandb/mlflow through transformers' integrations; TensorBoard and swanlab as callbacks
        report_to=plans.trackers.report_to, run_name=plans.trackers.run_name,
        disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0,
        prediction_loss_only=True,
        gradient_checkpointing=False,  # enabled on the model in build_peft_model when wanted
        optim="adamw_torch", ddp_find_unused_parameters=False,
    )
