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
    tensorboard_callback,
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


def _prepare(cfg: Config, run: Path, rank0: bool, reporter: TrainReporter) -> _Parts:
    """Model, tokenizer and data, ready for the Trainer."""
    from transformers import set_seed

    from nekotune import model as M

    device = M.pick_device(cfg.model.device)
    M.check_quantization(cfg.model, device)
    precision = M.pick_precision(device, cfg.model.dtype, training=True)
    set_seed(cfg.train.seed)
    spec = M.resolve(cfg.model.name_or_path) if cfg.model.name_or_path else M.resolve(None)
    if spec.adapter:
        raise UserError(f"model.name_or_path={cfg.model.name_or_path} is an adapter; train on its base model "
                        f"({spec.base}) or merge it first with `nekotune merge`")
    tokenizer = M.load_tokenizer(spec, cfg.model)
    renderer = Renderer.from_config(tokenizer, cfg.data)
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


def _make_trainer(cfg: Config, run: Path, parts: _Parts, stats: Stats, interrupt: Any, live: bool,
                  callbacks: list | None, reporter: TrainReporter) -> Any:
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from nekotune.data.collate import Collator

    all_callbacks = make_callbacks(stats, reporter, live and _is_rank0(), interrupt) + list(callbacks or [])
    if cfg.output.tensorboard and _is_rank0():
        all_callbacks.append(tensorboard_callback(run))
    data = parts.data
    trainer = make_trainer_class()(
        model=parts.model, args=training_args(cfg, run, parts.precision, data, parts.grad_ckpt),
        train_dataset=_Examples(data.train), eval_dataset=_Examples(data.eval) if data.eval else None,
        data_collator=Collator(parts.tokenizer.pad_token_id, cfg.data.packing), callbacks=all_callbacks,
        stats=stats, nan_policy=cfg.train.nan_policy)
    for cb in (ProgressCallback, PrinterCallback):  # the reporter shows progress instead
        trainer.remove_callback(cb)
    return trainer


def _is_rank0() -> bool:
    from nekotune.distributed import is_main_process

    return is_main_process()


def _train_in(run: Path, cfg: Config, show_progress: bool, after_train: AfterTrain | None, stop_flag: Any,
              callbacks: list | None, reporter: TrainReporter) -> Path:
    import torch

    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    rank0 = _is_rank0()
    if rank0:
        remove_incomplete_checkpoints(run)  # safe: this process holds the run's lock
    resume_from = resume_checkpoint(cfg, run)
    if resume_from:
        check_resume_compatible(cfg, run)
    parts = _prepare(cfg, run, rank0, reporter)
    run.mkdir(parents=True, exist_ok=True)
    if rank0:
        atomic_write_text(run / "config.yaml", cfg.to_yaml())
    stats = Stats()
    interrupt = stop_flag if stop_flag is not None else Interrupt(reporter)
    trainer = _make_trainer(cfg, run, parts, stats, interrupt, show_progress, callbacks, reporter)
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
        _save_results(cfg, run, parts, trainer, stats)
        if after_train is not None:
            after_train(parts.model, parts.renderer, run)
    return run


def _save_results(cfg: Config, run: Path, parts: _Parts, trainer: Any, stats: Stats) -> None:
    try:
        save_adapter(parts.model, parts.tokenizer, run)
        write_run_json(cfg, run, parts.data.stats, trainer.state, stats, parts.precision, parts.grad_ckpt,
                       parts.base, parts.speed)
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
def lora_config(cfg: Config) -> Any:
    from peft import LoraConfig

    targets = cfg.lora.target_modules
    if isinstance(targets, str) and targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
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
        peft_model = get_peft_model(model, lora_config(cfg))
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


def training_args(cfg: Config, run: Path, precision: Any, data: PreparedData, grad_ckpt: bool) -> Any:
    """The Trainer's arguments: every choice the recipe makes is here, in one constructor call."""
    import torch
    from transformers import TrainingArguments

    steps_per_epoch = math.ceil(len(data.train) / (cfg.train.batch_size * cfg.train.grad_accum))
    eval_strategy = "no" if not data.eval else ("steps" if cfg.train.eval_steps else "epoch")
    t = cfg.train
    return TrainingArguments(
        output_dir=str(run / "checkpoints"),
        per_device_train_batch_size=t.batch_size, per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum, num_train_epochs=t.epochs,
        max_steps=t.max_steps if t.max_steps and t.max_steps > 0 else -1,
        learning_rate=t.lr, lr_scheduler_type=t.scheduler, warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        logging_steps=min(t.logging_steps, max(1, steps_per_epoch)), logging_first_step=True,
        eval_strategy=eval_strategy, eval_steps=t.eval_steps,
        # save_steps counts only with the "steps" strategy; 500 is the Trainer's own default
        save_strategy="steps" if t.save_steps else "epoch", save_steps=t.save_steps or 500,
        # at least 2: a kill between rotating old checkpoints and marking the new one complete
        # must still leave one complete checkpoint
        save_total_limit=max(2, t.save_total_limit) if t.save_total_limit else None,
        seed=t.seed, data_seed=t.seed,
        bf16=precision.autocast == torch.bfloat16, fp16=precision.autocast == torch.float16,
        use_cpu=precision.device == "cpu",
        use_liger_kernel=wants_liger(cfg, precision.device), liger_kernel_config=LIGER_KERNELS,
        report_to="none", disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0,
        prediction_loss_only=True,
        gradient_checkpointing=False,  # enabled on the model in build_peft_model when wanted
        optim="adamw_torch", ddp_find_unused_parameters=False,
    )
