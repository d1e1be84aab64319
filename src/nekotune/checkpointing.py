"""When to evaluate and save, which checkpoint is the best, and when to stop early.

Built on the Trainer's own machinery (save/eval strategies, `load_best_model_at_end`,
`metric_for_best_model`, `save_total_limit`'s protection of the best checkpoint,
`EarlyStoppingCallback`). nekotune adds two things it lacks:

- fractions of an epoch: transformers reads `save_steps=0.1` as a tenth of *all* steps (every
  third of an epoch over 3 epochs). Here a float below 1 is a fraction of an epoch, resolved at
  train begin from the Trainer's own prepared dataloader (packing, accumulation and the number of
  processes included; the same after a resume), and placed on the same points in every epoch;
- a save at every new best evaluation when `load_best` is on: the Trainer records the best
  checkpoint only if the best evaluation step was also a save step, so without this a best
  evaluation between two saves would be lost.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nekotune.errors import UserError

log = logging.getLogger("nekotune")

# metric -> greater is better. nekotune evaluates with prediction_loss_only, so eval_loss is the
# one metric there is; a compute_metrics hook would add entries here.
BEST_METRICS = {"eval_loss": False}
_NEVER = 2**62  # a save_steps/eval_steps that the Trainer's `global_step % n == 0` test never meets


@dataclass
class CheckpointSettings:
    """The train.* keys this module reads (phase B: all of them live on TrainConfig)."""

    save_steps: float | None = None  # None: each epoch; >= 1: every N steps; < 1: a fraction of an epoch
    eval_steps: float | None = None
    save_total_limit: int | None = 2
    load_best: bool = False
    best_metric: str | None = None
    early_stopping_patience: int | None = None
    early_stopping_threshold: float = 0.0

    @classmethod
    def of(cls, train_cfg: Any) -> "CheckpointSettings":
        """From a TrainConfig (or anything with those attributes); absent keys keep the defaults."""
        if isinstance(train_cfg, cls):
            return train_cfg
        names = cls.__dataclass_fields__
        return cls(**{k: getattr(train_cfg, k) for k in names if getattr(train_cfg, k, None) is not None})


@dataclass
class CheckpointPlan:
    args: dict  # TrainingArguments keyword arguments
    callbacks: list = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # adjustments, for the command to print
    schedule: Any = None  # the EpochSchedule callback, when nekotune places the save/eval points
    early_stopping: "Any | None" = None  # the EarlyStopping callback, to ask whether it fired


def parse_interval(value: float | None, key: str) -> float | int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise UserError(f"{key}={value!r}: give whole steps (e.g. 50) or a fraction of an epoch below 1 (e.g. 0.25)")
    if value < 1:
        return float(value)
    if value != int(value):
        raise UserError(f"{key}={value}: above 1 it counts steps and must be whole; below 1 it is a fraction "
                        f"of an epoch (0.25 = four times per epoch)")
    return int(value)


def _metric(name: str | None) -> str:
    metric = (name or "eval_loss").strip()
    metric = metric if metric.startswith("eval_") else f"eval_{metric}"
    if metric not in BEST_METRICS:
        raise UserError(f"train.best_metric={name!r}: nekotune's evaluation reports {', '.join(BEST_METRICS)}; "
                        f"use one of those")
    return metric


def checkpoint_plan(train_cfg: Any, has_eval: bool) -> CheckpointPlan:
    """TrainingArguments kwargs and callbacks for the save/eval schedule, the best checkpoint and
    early stopping. `has_eval`: whether there is validation data."""
    s = CheckpointSettings.of(train_cfg)
    save = parse_interval(s.save_steps, "train.save_steps")
    evals = parse_interval(s.eval_steps, "train.eval_steps") if has_eval else None
    wants_metric = s.load_best or s.early_stopping_patience is not None
    notes: list[str] = []
    if wants_metric and not has_eval:
        key = "train.load_best" if s.load_best else "train.early_stopping_patience"
        raise UserError(f"{key} needs validation data to compare checkpoints: set data.val_size (e.g. 0.1) "
                        f"or data.val_path")
    if s.eval_steps is not None and not has_eval:
        notes.append("train.eval_steps is ignored: there is no validation data (set data.val_size or data.val_path)")
    if s.load_best and (save is None) != (evals is None):
        # the Trainer needs both on steps or both per epoch; evaluate as often as it saves
        if evals is None:
            evals = save
            notes.append(f"train.load_best: evaluating at every save (train.eval_steps={save})")
        else:
            save = evals
            notes.append(f"train.load_best: saving at every evaluation (train.save_steps={evals})")
    args: dict[str, Any] = {
        "save_strategy": "epoch" if save is None else "steps",
        "eval_strategy": "no" if not has_eval else ("epoch" if evals is None else "steps"),
        # at least 2: a kill between rotating old checkpoints and marking the new one complete
        # must still leave one complete checkpoint; the Trainer never deletes the best one
        "save_total_limit": max(2, s.save_total_limit) if s.save_total_limit else None,
    }
    schedule = None
    if isinstance(save, float) or isinstance(evals, float) or (s.load_best and _not_multiple(save, evals)):
        schedule = epoch_schedule(save, evals)
        # the schedule owns the save/eval points: the Trainer's own `step % save_steps` test never
        # fires at this value (it still saves and evaluates at the last step), and it passes
        # TrainingArguments' checks (whole steps, save a multiple of eval for load_best)
        args.update(save_steps=_NEVER, eval_steps=_NEVER if evals is not None else None)
    else:
        args.update(save_steps=save or 500, eval_steps=evals)
    callbacks: list = [schedule] if schedule else []
    if wants_metric:
        metric = _metric(s.best_metric)
        args.update(metric_for_best_model=metric, greater_is_better=BEST_METRICS[metric])
    if s.load_best:
        args["load_best_model_at_end"] = True
        callbacks.append(save_new_best(metric, BEST_METRICS[metric]))
    stopper = None
    if s.early_stopping_patience is not None:
        stopper = _early_stopping(s)
        callbacks.append(stopper)
        if not s.load_best:
            notes.append("train.early_stopping_patience without train.load_best keeps the last weights, not the "
                         "best; set train.load_best=true to keep the best checkpoint")
    return CheckpointPlan(args, callbacks, notes, schedule, stopper)


def _not_multiple(save: float | int | None, evals: float | int | None) -> bool:
    return isinstance(save, int) and isinstance(evals, int) and save % evals != 0


def _early_stopping(s: CheckpointSettings):
    from transformers import EarlyStoppingCallback

    patience = s.early_stopping_patience
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
        raise UserError(f"train.early_stopping_patience={patience!r}: give a whole number of evaluations (e.g. 3)")
    if not isinstance(s.early_stopping_threshold, (int, float)) or s.early_stopping_threshold < 0:
        raise UserError(f"train.early_stopping_threshold={s.early_stopping_threshold!r}: give 0 or a positive "
                        f"improvement of the metric (e.g. 0.01)")

    class EarlyStopping(EarlyStoppingCallback):
        """transformers' callback, remembering the step it stopped at (the CLI says so)."""

        stopped_at: int | None = None

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            super().on_evaluate(args, state, control, metrics or {}, **kwargs)
            if control.should_training_stop and self.early_stopping_patience_counter >= self.early_stopping_patience:
                self.stopped_at = state.global_step
                control.should_save = True  # the weights it stopped with stay resumable and inspectable

    return EarlyStopping(early_stopping_patience=patience, early_stopping_threshold=float(s.early_stopping_threshold))


@functools.cache
def _callback_classes() -> tuple[type, type]:
    """The TrainerCallback classes, made on first use: importing transformers takes seconds, and
    config validation imports this module for `parse_interval`."""
    from transformers import TrainerCallback

    class EpochSchedule(_Schedule, TrainerCallback):
        __doc__ = _Schedule.__doc__

    class SaveNewBest(_SaveNewBest, TrainerCallback):
        __doc__ = _SaveNewBest.__doc__

    return EpochSchedule, SaveNewBest


def epoch_schedule(save: float | int | None, evals: float | int | None) -> Any:
    return _callback_classes()[0](save, evals)


def save_new_best(metric: str, greater_is_better: bool) -> Any:
    return _callback_classes()[1](metric, greater_is_better)


class _Schedule:
    """Save/evaluate at fractions of an epoch (floats below 1), or every N steps (ints), with the
    Trainer's own steps per epoch read at train begin. Fractions land on the same points in every
    epoch: 0.25 with 10 steps per epoch saves at steps 3, 5, 8, 10, then 13, 15, 18, 20 ..."""

    def __init__(self, save: float | int | None, evals: float | int | None):
        self.save, self.evals = save, evals
        self.steps_per_epoch = 0
        self.save_points: set[int] = set()
        self.eval_points: set[int] = set()

    def on_train_begin(self, args, state, control, train_dataloader=None, **kw):
        try:  # the prepared, per-process loader: packing, accumulation and world size are in its length
            n = len(train_dataloader) if train_dataloader is not None else 0
        except TypeError:  # an iterable dataset has no length: its epochs are max_steps long
            n = 0
        accum = args.gradient_accumulation_steps
        self.steps_per_epoch = max(1, n // accum + int(n % accum > 0)) if n else max(1, state.max_steps)
        self.save_points = _points(self.save, self.steps_per_epoch)
        self.eval_points = _points(self.evals, self.steps_per_epoch)
        if state.is_world_process_zero:  # the command line shows the library's warnings: say where it saves
            log.warning("note: %s", self.describe())

    def describe(self) -> str:
        parts = [f"{self.steps_per_epoch} optimizer steps per epoch"]
        for what, value, points in (("save", self.save, self.save_points), ("evaluate", self.evals, self.eval_points)):
            if isinstance(value, float):
                shown = sorted(points)[:12]
                parts.append(f"{what} at steps {', '.join(map(str, shown))}{' ...' if len(points) > 12 else ''} "
                             f"of each epoch ({value:g} epoch)")
            elif isinstance(value, int):
                parts.append(f"{what} every {value} steps")
        return "; ".join(parts)

    def _due(self, value: float | int | None, points: set[int], step: int) -> bool:
        if value is None:
            return False
        if isinstance(value, int):
            return step % value == 0
        return ((step - 1) % self.steps_per_epoch) + 1 in points

    def on_step_end(self, args, state, control, **kw):
        step = state.global_step
        if self._due(self.save, self.save_points, step):
            control.should_save = True
        if self._due(self.evals, self.eval_points, step):
            control.should_evaluate = True
        return control


def _points(value: float | int | None, steps_per_epoch: int) -> set[int]:
    """Steps within an epoch (1-based) where a fraction of an epoch falls: ceil(k * f * steps)."""
    if not isinstance(value, float):
        return set()
    count = int(math.floor(1 / value + 1e-9))
    return {min(steps_per_epoch, max(1, math.ceil(k * value * steps_per_epoch - 1e-9))) for k in range(1, count + 1)}


class _SaveNewBest:
    """With load_best: save at every evaluation that beats the best so far, so the Trainer can
    record it as the best checkpoint (it does only for evaluations that fall on a save step)."""

    def __init__(self, metric: str, greater_is_better: bool):
        self.metric, self.greater = metric, greater_is_better

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        value = (metrics or {}).get(self.metric)
        if value is None or not math.isfinite(value):
            return control
        best = state.best_metric  # not yet updated for this evaluation (the Trainer does that next)
        if best is None or (value > best if self.greater else value < best):
            control.should_save = True
        return control


def best_fields(state: Any, run_dir: Path | None = None, plan: CheckpointPlan | None = None) -> dict:
    """run.json fields: best_checkpoint (relative to the run directory when inside it), best_eval_loss,
    best_metric and best_step, and stopped_early / stopped_at_step when early stopping is on."""
    out: dict[str, Any] = {}
    best = getattr(state, "best_model_checkpoint", None)
    if best is not None or getattr(state, "best_metric", None) is not None:
        path = Path(best) if best else None
        if path is not None and run_dir is not None:
            try:
                path = path.resolve().relative_to(Path(run_dir).resolve())
            except ValueError:
                pass
        metric = plan.args.get("metric_for_best_model") if plan else "eval_loss"
        out.update(best_checkpoint=path.as_posix() if path else None,
                   best_step=getattr(state, "best_global_step", None), best_metric=metric)
        if metric == "eval_loss":
            out["best_eval_loss"] = state.best_metric
    if plan is not None and plan.early_stopping is not None:
        stopped = plan.early_stopping.stopped_at
        out.update(stopped_early=stopped is not None, stopped_at_step=stopped)
    return out


def stop_message(fields: dict, max_steps: int) -> str | None:
    """The line the CLI prints when a run stopped early (None otherwise)."""
    if not fields.get("stopped_early"):
        return None
    best = fields.get("best_checkpoint")
    loss = fields.get("best_eval_loss")
    tail = f"; best {best} (eval_loss {loss:.4f})" if best and isinstance(loss, float) else ""
    return (f"early stopping: no eval improvement for the patience window, stopped at step "
            f"{fields.get('stopped_at_step')} of {max_steps}{tail}")

