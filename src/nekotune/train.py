"""Train stage: transformers Trainer + peft LoRA, with nekotune's data, loss and run directory.

The Trainer does the loop, checkpoints, resume (optimizer, scheduler, RNG, data position) and
accumulation. nekotune adds what it lacks for small machines:
- a loss that projects to the vocabulary only at trained positions, in checkpointed chunks,
  instead of materialising fp32 logits for every token (the largest tensor at vocab 49k-152k);
- padding-free batches (see data/collate.py);
- a run directory with config.yaml, run.json, loss.png, TensorBoard logs and a PEFT adapter.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from nekotune import __version__
from nekotune.config import Config
from nekotune.data import PreparedData, Renderer, prepare
from nekotune.errors import UserError
from nekotune.io import atomic_dir, atomic_write_json, atomic_write_text
# the run directory's helpers live in runs.py; these names stay importable from here
from nekotune.runs import (COMPLETE, check_resume_compatible, claim_run_dir, is_disk_full,  # noqa: F401
                           last_checkpoint, latest_checkpointed_run, remove_incomplete_checkpoints,
                           resume_checkpoint, run_dir_for)

LOSS_CHUNK_BYTES = 2**25  # fp32 logits per chunk: 32 MB, whatever the vocabulary size (bench: faster than 128)


def loss_chunk(vocab_size: int) -> int:
    """Trained positions per vocabulary-projection chunk (170 at 49k vocab, 128 at 152k)."""
    return max(128, min(4096, LOSS_CHUNK_BYTES // (4 * vocab_size)))


# -- loss ------------------------------------------------------------------------------------
def causal_lm(model):
    """The transformers *ForCausalLM inside DDP/FSDP and peft wrappers."""
    m = model
    while hasattr(m, "module") and not hasattr(m, "get_decoder"):
        m = m.module
    return m.get_base_model() if hasattr(m, "get_base_model") else m


def supports_fast_loss(model) -> bool:
    import torch

    base = causal_lm(model)
    cfg = base.config
    head = base.get_output_embeddings()
    return (type(head) is torch.nn.Linear and head.bias is None and hasattr(base, "get_decoder")
            and not getattr(cfg, "final_logit_softcapping", None) and not getattr(cfg, "logit_scale", None))


def _ce_sum(h, weight, targets, chunk: int, grads: bool):
    """Summed cross-entropy of h projected to the vocabulary, chunk by chunk; with grads, also the
    gradients of that sum for h and (when it requires one) the weight, computed in the same pass:
    softmax minus one-hot, times the weight."""
    import torch

    grad_h = torch.empty_like(h) if grads else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
        if grads and weight.requires_grad else None
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for s in range(0, targets.numel(), chunk):
        hs, y = h[s: s + chunk], targets[s: s + chunk]
        logits = (hs @ weight.t()).float()
        lse = torch.logsumexp(logits, dim=-1)
        total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
        if not grads:
            continue
        grad = logits.sub_(lse[:, None]).exp_()  # the softmax, in place of the logits
        grad[torch.arange(y.numel(), device=y.device), y] -= 1
        grad = grad.to(hs.dtype)
        grad_h[s: s + chunk] = grad @ weight
        if grad_w is not None:
            grad_w += (grad.t() @ hs).float()
    return total, grad_h, grad_w


def _trained_tokens_ce():
    """A torch.autograd.Function, built on first use so that importing this module stays light."""
    import torch

    class TrainedTokensCE(torch.autograd.Function):
        """The loss with its gradient computed in the forward pass and kept: only [tokens, hidden]
        survives to the backward pass. Checkpointing each chunk instead would project every chunk
        twice and run log_softmax's backward as well (about 2x slower in bench)."""

        @staticmethod
        def forward(ctx, h, weight, targets, chunk):
            total, grad_h, grad_w = _ce_sum(h, weight, targets, chunk, grads=True)
            ctx.save_for_backward(grad_h, grad_w)
            ctx.weight_dtype = weight.dtype
            return total

        @staticmethod
        def backward(ctx, grad_total):
            grad_h, grad_w = ctx.saved_tensors
            if grad_w is not None:
                grad_w = (grad_w * grad_total).to(ctx.weight_dtype)
            return grad_h * grad_total.to(grad_h.dtype), grad_w, None, None

    return TrainedTokensCE


_CE = None


def chunked_trained_loss(hidden, weight, labels, chunk: int | None = None):
    """Mean cross-entropy over trained tokens, projecting only those hidden states to the
    vocabulary, chunk by chunk, so no full logits tensor ever exists."""
    import torch

    global _CE
    chunk = chunk or loss_chunk(weight.shape[0])
    targets = labels[:, 1:]
    keep = targets != -100
    h = hidden[:, :-1][keep]
    y = targets[keep]
    n = y.numel()
    if n == 0:
        return hidden.sum() * 0.0
    if not (torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)):
        return _ce_sum(h, weight, y, chunk, grads=False)[0] / n  # evaluation: no gradients to prepare
    if _CE is None:
        _CE = _trained_tokens_ce()
    return _CE.apply(h, weight, y, chunk) / n


def _fast_forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, inputs_embeds=None,
                  **kwargs):
    if labels is None:  # generation and plain calls keep the model's own forward
        return type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask,
                                  position_ids=position_ids, inputs_embeds=inputs_embeds, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    hidden = self.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                inputs_embeds=inputs_embeds, use_cache=False).last_hidden_state
    loss = chunked_trained_loss(hidden, self.get_output_embeddings().weight, labels)
    return CausalLMOutputWithPast(loss=loss, logits=None)


def install_fast_loss(model) -> bool:
    """Route `model(..., labels=...)` through the trained-positions loss. It is installed on the
    inner causal LM so that DDP/FSDP wrappers still see a normal forward call."""
    import types

    if not supports_fast_loss(model):
        return False
    base = causal_lm(model)
    if not getattr(base, "_nekotune_fast_loss", False):
        base.forward = types.MethodType(_fast_forward, base)
        base._nekotune_fast_loss = True
    return True


def trained_positions_loss(model, inputs: dict):
    """(mean loss over trained tokens, their count) for a batch from the collator."""
    install_fast_loss(model)
    n = int((inputs["labels"][:, 1:] != -100).sum())
    out = model(**inputs, use_cache=False)
    return out.loss, n


def make_trainer_class():
    from transformers import Trainer

    class NekoTrainer(Trainer):
        """Trainer with the trained-positions loss, token counting and a NaN guard."""

        fast_loss = True
        nan_policy = "stop"
        stats = None

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, _ = trained_positions_loss(model, inputs)
            return (loss, {"loss": loss}) if return_outputs else loss

        def training_step(self, model, inputs, num_items_in_batch=None):
            import torch

            if self.stats is not None:
                mask = inputs.get("attention_mask")
                self.stats.tokens += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
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

    return NekoTrainer


class NonFiniteLoss(Exception):
    def __init__(self, step: int):
        super().__init__(f"loss became NaN/inf at step {step}")
        self.step = step


# -- callbacks -------------------------------------------------------------------------------
class Stats:
    def __init__(self):
        self.tokens = 0
        self.start = time.time()
        self.train_time = 0.0
        self.skipped_steps: list[int] = []


def make_callbacks(stats: Stats, show_progress: bool, interrupt: "Interrupt"):
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """A rich progress bar with step, loss, tokens/s and ETA (replaces tqdm)."""

        def __init__(self):
            self.progress = None
            self.task = None
            self.loss = float("nan")
            self.t0 = None
            self.tok0 = 0

        def on_train_begin(self, args, state, control, **kw):
            self.t0, self.tok0 = time.time(), stats.tokens
            if not show_progress:
                return
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, \
                TimeElapsedColumn, TimeRemainingColumn

            self.progress = RichProgress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                         TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                                         TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), transient=False)
            self.progress.start()
            self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step,
                                               loss="-", tps="-")

        def on_step_end(self, args, state, control, **kw):
            if interrupt.requested:
                control.should_save = True
                control.should_training_stop = True
            if self.progress is not None:
                elapsed = max(time.time() - self.t0, 1e-6)
                tps = (stats.tokens - self.tok0) / elapsed
                self.progress.update(self.task, completed=state.global_step, tps=f"{tps:,.0f}",
                                     loss=f"{self.loss:.4f}")

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.loss = logs["loss"]
            if self.progress is None and logs and state.is_world_process_zero:
                shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in logs.items()}
                print(f"step {state.global_step}/{state.max_steps} {shown}", flush=True)

        def on_train_end(self, args, state, control, **kw):
            stats.train_time = time.time() - self.t0
            if self.progress is not None:
                self.progress.stop()

    class MarkComplete(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.is_world_process_zero:
                ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if ckpt.is_dir():
                    from nekotune.io import fsync_tree

                    fsync_tree(ckpt)
                    atomic_write_text(ckpt / COMPLETE, f"{state.global_step}\n")

    return [Progress(), MarkComplete()]


class Interrupt:
    """First Ctrl-C/SIGTERM: finish the step, save a checkpoint, exit 130. Second: exit now."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def _handle(self, signum, frame):
        if self.requested:
            os._exit(130)
        self.requested = True
        print("\nnekotune: stopping after this step and saving a checkpoint (press Ctrl-C again to quit now)",
              file=sys.stderr, flush=True)

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (UI): the UI stops through `requested`
                pass
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class TrainingInterrupted(Exception):
    def __init__(self, run: Path, checkpoint: Path | None):
        self.run, self.checkpoint = run, checkpoint
        super().__init__(f"training interrupted; checkpoint {checkpoint}")


# -- model setup -----------------------------------------------------------------------------
def lora_config(cfg: Config):
    from peft import LoraConfig

    targets = cfg.lora.target_modules
    if isinstance(targets, str) and targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, target_modules=targets,
                      modules_to_save=cfg.lora.modules_to_save, use_dora=cfg.lora.use_dora,
                      use_rslora=cfg.lora.use_rslora, bias="none", task_type="CAUSAL_LM")


def wants_grad_checkpointing(cfg: Config, device: str) -> bool:
    if cfg.train.grad_checkpointing != "auto":
        return bool(cfg.train.grad_checkpointing)
    # On CPU RAM is rarely the limit and recomputation costs ~30% speed; on a GPU the quantized
    # path is used because memory is short.
    return device == "cuda" and bool(cfg.model.quantization)


def build_peft_model(model, cfg: Config, grad_ckpt: bool):
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


# -- the recipe ------------------------------------------------------------------------------
def train(cfg: Config, show_progress: bool = True, after_train=None, stop_flag=None, callbacks=None) -> Path:
    """Fine-tune and return the run directory. `after_train(model, renderer, run)` runs on rank 0;
    `callbacks` are extra transformers TrainerCallbacks (the web UI reads progress through one).
    The run directory is locked for the whole call (see runs.py): a second process is refused."""
    run, lock = claim_run_dir(cfg)
    try:
        return _train_in(run, cfg, show_progress, after_train, stop_flag, callbacks)
    finally:
        if lock is not None:
            lock.release()


@dataclass
class _Parts:
    spec: object
    tokenizer: object
    renderer: Renderer
    data: PreparedData
    model: object
    precision: object
    grad_ckpt: bool
    speed: dict


def _prepare(cfg: Config, run: Path, rank0: bool) -> _Parts:
    """Model, tokenizer and data, ready for the Trainer."""
    from transformers import set_seed

    from nekotune import model as M
    from nekotune.speed import fuse_lora_adds, use_packed_attention

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
        _print_data_summary(data, renderer, precision, run)
    model = M.load_model(spec, cfg.model, precision, training=True)
    grad_ckpt = wants_grad_checkpointing(cfg, device)
    model = build_peft_model(model, cfg, grad_ckpt)
    speed = {"fused_lora_layers": fuse_lora_adds(model),
             "packed_attention": bool(cfg.data.packing and use_packed_attention(model))}
    return _Parts(spec, tokenizer, renderer, data, model, precision, grad_ckpt, speed)


def _make_trainer(cfg: Config, run: Path, parts: _Parts, stats: Stats, interrupt, show_progress: bool, callbacks):
    from torch.utils.data import Dataset
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from nekotune.data.collate import Collator

    class _Examples(Dataset):
        def __init__(self, items):
            self.items = items

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return {"input_ids": self.items[i].input_ids, "labels": self.items[i].labels}

    rank0 = _is_rank0()
    callbacks = make_callbacks(stats, show_progress and rank0, interrupt) + list(callbacks or [])
    if cfg.output.tensorboard and rank0:
        callbacks.append(_tensorboard_callback(run))
    data = parts.data
    trainer = make_trainer_class()(
        model=parts.model, args=_training_args(cfg, run, parts.precision, data, parts.grad_ckpt),
        train_dataset=_Examples(data.train), eval_dataset=_Examples(data.eval) if data.eval else None,
        data_collator=Collator(parts.tokenizer.pad_token_id, cfg.data.packing), callbacks=callbacks)
    trainer.fast_loss = install_fast_loss(parts.model)
    trainer.nan_policy = cfg.train.nan_policy
    trainer.stats = stats
    trainer.model_accepts_loss_kwargs = False  # our loss is a per-micro-batch mean; Trainer divides by accumulation
    for cb in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(cb)
    return trainer


def _is_rank0() -> bool:
    from nekotune.distributed import is_main_process

    return is_main_process()


def _train_in(run: Path, cfg: Config, show_progress: bool, after_train, stop_flag, callbacks) -> Path:
    import torch

    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    rank0 = _is_rank0()
    if rank0:
        remove_incomplete_checkpoints(run)  # safe: this process holds the run's lock
    resume_from = resume_checkpoint(cfg, run)
    if resume_from:
        check_resume_compatible(cfg, run)
    parts = _prepare(cfg, run, rank0)
    run.mkdir(parents=True, exist_ok=True)
    if rank0:
        atomic_write_text(run / "config.yaml", cfg.to_yaml())
    stats = Stats()
    interrupt = stop_flag if stop_flag is not None else Interrupt()
    trainer = _make_trainer(cfg, run, parts, stats, interrupt, show_progress, callbacks)
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
        try:
            _save_adapter(parts.model, parts.tokenizer, run)
            _write_run_json(cfg, run, parts.data, trainer, stats, parts.precision, parts.grad_ckpt, parts.spec,
                            parts.speed)
            if cfg.output.plot:
                plot_losses(trainer.state.log_history, run / "loss.png")
        except Exception as exc:
            _raise_if_disk_full(exc, run, rank0)
            raise
        if after_train is not None:
            after_train(parts.model, parts.renderer, run)
    return run


def _raise_if_disk_full(exc: Exception, run: Path, rank0: bool) -> None:
    """A full disk mid-checkpoint surfaces as OSError, SafetensorError or RuntimeError depending on
    which writer hit it; each becomes the same one-line message, minus the half-written checkpoint."""
    if not is_disk_full(exc, run):
        return
    if rank0:
        remove_incomplete_checkpoints(run)
    raise UserError(f"disk full while saving to {run}; free space and resume with train.resume=true "
                    f"output.dir={run} (last good checkpoint: {last_checkpoint(run) or 'none'})") from None


def wants_liger(cfg: Config, device: str) -> bool:
    """train.liger=true: Liger's Triton kernels (RMSNorm, SwiGLU, RoPE) through the Trainer, on CUDA
    only; never imported elsewhere. nekotune's own chunked loss stays in place of Liger's."""
    import importlib.util

    if not cfg.train.liger:
        return False
    if device != "cuda":
        print(f"note: train.liger=true applies to CUDA GPUs only; training on {device} without Liger kernels")
        return False
    if importlib.util.find_spec("liger_kernel") is None:
        raise UserError("train.liger=true needs the liger-kernel package: pip install liger-kernel "
                        "(or set train.liger=false)")
    return True


LIGER_KERNELS = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
                 "fused_linear_cross_entropy": False}


def _training_args(cfg: Config, run: Path, precision, data: PreparedData, grad_ckpt: bool):
    import torch
    from transformers import TrainingArguments

    has_eval = bool(data.eval)
    steps_per_epoch = math.ceil(len(data.train) / (cfg.train.batch_size * cfg.train.grad_accum))
    save_strategy = "steps" if cfg.train.save_steps else "epoch"
    eval_strategy = "no" if not has_eval else ("steps" if cfg.train.eval_steps else "epoch")
    on_cpu = precision.device == "cpu"
    return TrainingArguments(
        output_dir=str(run / "checkpoints"),
        per_device_train_batch_size=cfg.train.batch_size,
        per_device_eval_batch_size=cfg.train.batch_size,
        gradient_accumulation_steps=cfg.train.grad_accum,
        num_train_epochs=cfg.train.epochs,
        max_steps=cfg.train.max_steps if cfg.train.max_steps and cfg.train.max_steps > 0 else -1,
        learning_rate=cfg.train.lr,
        lr_scheduler_type=cfg.train.scheduler,
        warmup_steps=cfg.train.warmup_ratio,
        weight_decay=cfg.train.weight_decay,
        max_grad_norm=cfg.train.max_grad_norm,
        logging_steps=min(cfg.train.logging_steps, max(1, steps_per_epoch)),
        logging_first_step=True,
        eval_strategy=eval_strategy,
        eval_steps=cfg.train.eval_steps,
        save_strategy=save_strategy,
        save_steps=cfg.train.save_steps,
        # at least 2: a kill between rotating old checkpoints and marking the new one complete
        # must still leave one complete checkpoint
        save_total_limit=max(2, cfg.train.save_total_limit) if cfg.train.save_total_limit else None,
        seed=cfg.train.seed,
        data_seed=cfg.train.seed,
        bf16=precision.autocast == torch.bfloat16,
        fp16=precision.autocast == torch.float16,
        use_cpu=on_cpu,
        use_liger_kernel=wants_liger(cfg, precision.device),
        liger_kernel_config=LIGER_KERNELS,
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        prediction_loss_only=True,
        gradient_checkpointing=False,  # enabled on the model in build_peft_model when wanted
        optim="adamw_torch",
        ddp_find_unused_parameters=False,
    )


def _tensorboard_callback(run: Path):
    from transformers.integrations import TensorBoardCallback

    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: the run still trains
        from transformers import TrainerCallback

        return TrainerCallback()
    return TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(run / "tb")))


def _oom_advice(cfg: Config) -> str:
    return (f"out of memory with batch_size={cfg.train.batch_size}, max_seq_len={cfg.data.max_seq_len}; try "
            f"train.batch_size={max(1, cfg.train.batch_size // 2)} train.grad_accum={cfg.train.grad_accum * 2}, "
            f"train.grad_checkpointing=true, data.max_seq_len={max(64, cfg.data.max_seq_len // 2)}"
            f"{', or model.quantization=4bit on CUDA' if not cfg.model.quantization else ''}; "
            f"`nekotune estimate --fit <memory>` proposes settings that fit")


def _print_data_summary(data: PreparedData, renderer: Renderer, precision, run: Path) -> None:
    s = data.stats
    print(f"data: {s['path']} ({s['format']}): {s['train_rows']} train / {s['eval_rows']} eval rows, "
          f"{s['tokens']:,} tokens ({s['trained_tokens']:,} trained), length p50 {s['length_p50']} "
          f"p95 {s['length_p95']} max {s['length_max']}; truncated {s['truncated_rows']}, dropped {s['dropped_rows']}",
          flush=True)
    print(f"precision: {precision.name} on {precision.device}; run directory: {run}", flush=True)


def _save_adapter(model, tokenizer, run: Path) -> None:
    with atomic_dir(run / "adapter") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


def peak_memory_mb(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _write_run_json(cfg, run, data, trainer, stats, precision, grad_ckpt, spec, speed: dict) -> None:
    import peft
    import torch
    import transformers

    history = trainer.state.log_history
    train_losses = [(h["step"], h["loss"]) for h in history if "loss" in h]
    eval_losses = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    info = {
        "nekotune": __version__, "config": cfg.to_dict(), "base_model": spec.base, "data": data.stats,
        "precision": precision.name, "device": precision.device, "gradient_checkpointing": grad_ckpt,
        "packing": cfg.data.packing, "fast_loss": trainer.fast_loss, **speed,
        "steps": trainer.state.global_step, "epochs": trainer.state.epoch,
        "train_losses": train_losses, "eval_losses": eval_losses,
        "first_loss": train_losses[0][1] if train_losses else None,
        "final_loss": train_losses[-1][1] if train_losses else None,
        "final_eval_loss": eval_losses[-1][1] if eval_losses else None,
        "tokens_seen": stats.tokens, "train_seconds": round(stats.train_time, 2),
        "tokens_per_second": round(stats.tokens / stats.train_time, 1) if stats.train_time else None,
        "wall_seconds": round(time.time() - stats.start, 2), "peak_memory_mb": round(peak_memory_mb(precision.device), 1),
        "skipped_steps": stats.skipped_steps,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
    }
    atomic_write_json(run / "run.json", info)


def plot_losses(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
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
