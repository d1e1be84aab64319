"""Experiment trackers (`train.report_to`): TensorBoard, Weights & Biases, SwanLab, MLflow.

Each tracker is the field's own integration; nekotune chooses which and adds what they lack:
- tensorboard: nekotune's own transformers `TensorBoardCallback` writing to `<run>/tb` (transformers
  5 dropped `logging_dir`, so its default would land in `<run>/checkpoints/runs`);
- wandb, mlflow: transformers' integrations, through `TrainingArguments(report_to=...)`;
- swanlab: swanlab's own `SwanLabCallback`; transformers' one calls `swanlab.get_run()`, which
  raises instead of returning None since swanlab 0.9 (LLaMA-Factory makes the same swap);
- every tracker also gets nekotune's effective config and the run name at train begin
  (mlflow params are prefixed `nekotune.` so they never clash with the Trainer's own params).

This module imports only the standard library at load time: config validation may call
`parse_report_to`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nekotune.errors import UserError

log = logging.getLogger("nekotune")


@dataclass(frozen=True)
class Tracker:
    module: str  # what must be importable
    extra: str | None  # pip install 'nekotune[<extra>]'
    hf_integration: str | None  # the name in TrainingArguments.report_to, when transformers' callback is used


TRACKERS: dict[str, Tracker] = {
    "tensorboard": Tracker("tensorboard", None, None),
    "wandb": Tracker("wandb", "wandb", "wandb"),
    "swanlab": Tracker("swanlab", "swanlab", None),
    "mlflow": Tracker("mlflow", "mlflow", "mlflow"),
}
DEFAULT_TRACKERS = ["tensorboard"]
# transformers integrations nekotune does not set up (they would need their own tests and docs)
OTHER_HF_INTEGRATIONS = ("azure_ml", "clearml", "codecarbon", "comet_ml", "dagshub", "dvclive", "flyte", "kubeflow",
                         "neptune", "trackio", "ray")
PROJECT = "nekotune"  # the wandb project / mlflow experiment / swanlab project unless the environment names one
MLFLOW_PARAM_PREFIX = "nekotune."


def parse_report_to(value: Any, key: str = "train.report_to") -> list[str]:
    """`tensorboard` (default), any of wandb/swanlab/mlflow, or none; a list or a comma string."""
    if value is None:
        return list(DEFAULT_TRACKERS)
    items = value if isinstance(value, (list, tuple)) else [value]
    names: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise UserError(f"{key}: {item!r} is not a tracker name; use {_choices()}")
        names += [n.strip().lower() for n in item.split(",") if n.strip()]
    if not names or names == ["none"]:
        return []
    for name in names:
        if name == "none":
            raise UserError(f"{key}={value!r}: `none` cannot be combined with other trackers; use {_choices()}")
        if name == "all":
            raise UserError(f"{key}=all is not supported: name the trackers ({_choices()})")
        if name in OTHER_HF_INTEGRATIONS:
            raise UserError(f"{key}: {name} is a transformers integration nekotune does not set up; use {_choices()}")
        if name not in TRACKERS:
            raise UserError(f"{key}: unknown tracker {name!r}; use {_choices()}")
    return list(dict.fromkeys(names))


def _choices() -> str:
    return ", ".join(TRACKERS) + " or none"


def check_installed(trackers: list[str], key: str = "train.report_to") -> None:
    for name in trackers:
        t = TRACKERS[name]
        if importlib.util.find_spec(t.module) is None:
            how = f"pip install 'nekotune[{t.extra}]'" if t.extra else f"pip install {t.module}"
            raise UserError(f"{key}={name} needs the {t.module} package: {how} (or remove {name} from {key})")


@dataclass
class TrackerPlan:
    trackers: list[str]
    report_to: list[str] | str  # for TrainingArguments(report_to=...)
    run_name: str  # for TrainingArguments(run_name=...)
    callbacks: list = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what nekotune set up, for the command to print


def tracker_plan(report_to: Any, run_dir: Path, run_name: str, config: dict, *, rank0: bool = True,
                 mlflow_store: Path | None = None, key: str = "train.report_to") -> TrackerPlan:
    """What the Trainer needs for `report_to`: its report_to list, run name and extra callbacks.

    Sets environment defaults the integrations read (WANDB_PROJECT, MLFLOW_EXPERIMENT_NAME; with
    mlflow and no MLFLOW_TRACKING_URI, a file store at `mlflow_store`) without overriding the user's."""
    trackers = parse_report_to(report_to, key)
    check_installed(trackers, key)
    hf = [name for name in (TRACKERS[t].hf_integration for t in trackers) if name]
    plan = TrackerPlan(trackers, hf or "none", run_name)
    writer, swan = None, None
    if "tensorboard" in trackers and rank0:
        writer = _tensorboard_writer(run_dir / "tb")
        from transformers.integrations import TensorBoardCallback

        plan.callbacks.append(TensorBoardCallback(tb_writer=writer))
    if "wandb" in trackers:
        os.environ.setdefault("WANDB_PROJECT", PROJECT)  # transformers' default project is "huggingface"
        plan.notes.append(f"wandb: project {os.environ['WANDB_PROJECT']}, run {run_name} "
                          f"(mode {os.environ.get('WANDB_MODE', 'online')})")
    if "mlflow" in trackers:
        plan.notes.append(_mlflow_env(mlflow_store, run_name))
    if "swanlab" in trackers:
        swan = _swanlab_callback(run_dir, run_name)
        plan.callbacks.append(swan)
        plan.notes.append(f"swanlab: project {swan_project()}, run {run_name} "
                          f"(mode {os.environ.get('SWANLAB_MODE', 'cloud')})")
    if trackers:
        plan.callbacks.append(make_config_callback(trackers, config, run_name, writer, swan))
    return plan


def _tensorboard_writer(log_dir: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(log_dir))


def _mlflow_env(store: Path | None, run_name: str) -> str:
    os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", PROJECT)
    if not os.environ.get("MLFLOW_TRACKING_URI") and store is not None:
        # mlflow's default is sqlite:///mlflow.db, which mlflow-skinny cannot open (no SQLAlchemy);
        # a file store works offline, and mlflow 3 refuses one unless it is allowed explicitly.
        os.environ["MLFLOW_TRACKING_URI"] = Path(store).resolve().as_uri()
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise UserError("train.report_to=mlflow needs MLFLOW_TRACKING_URI (an mlflow server such as "
                        "http://127.0.0.1:5000, or file:///path/to/mlruns)")
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return f"mlflow: experiment {os.environ['MLFLOW_EXPERIMENT_NAME']}, run {run_name}, tracking {uri}"


def swan_project() -> str:
    return os.environ.get("SWANLAB_PROJECT") or PROJECT


def _swanlab_callback(run_dir: Path, run_name: str):
    from swanlab.integration.transformers import SwanLabCallback

    # SWANLAB_MODE (cloud, offline, local, disabled) is read by swanlab itself
    return SwanLabCallback(project=swan_project(), experiment_name=run_name,
                           log_dir=os.environ.get("SWANLAB_LOG_DIR") or str(run_dir / "swanlog"))


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """{"lora": {"r": 8}} -> {"lora.r": 8}; lists become JSON text."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v, ensure_ascii=False) if isinstance(v, (list, tuple)) else v
    return out


def make_config_callback(trackers: list[str], config: dict, run_name: str, tb_writer=None, swanlab_callback=None):
    """A TrainerCallback that writes the effective nekotune config and the run name to each active
    tracker at train begin (after the integrations' own setup: transformers runs them first), and
    finishes the wandb/swanlab runs it saw start, so a second training in one process gets its own run."""
    from transformers import TrainerCallback

    class TrackerConfig(TrainerCallback):
        def __init__(self):
            self.trackers, self.config, self.run_name = trackers, config, run_name
            self.had_run: dict[str, bool] = {}

        def on_init_end(self, args, state, control, **kw):
            self.had_run = {"wandb": _wandb_run() is not None, "swanlab": _swanlab_run() is not None}

        def on_train_begin(self, args, state, control, **kw):
            if not state.is_world_process_zero:
                return
            for name in self.trackers:
                try:
                    _LOGGERS[name](self, tb_writer, swanlab_callback)
                except Exception as exc:  # a tracker's hiccup must not stop a training run
                    log.warning("could not log the nekotune config to %s: %s", name,
                                (str(exc).splitlines() or [type(exc).__name__])[0])

        def on_train_end(self, args, state, control, **kw):
            if not state.is_world_process_zero:
                return
            if "wandb" in self.trackers and not self.had_run.get("wandb") and _wandb_run() is not None:
                import wandb

                wandb.finish()
            if "swanlab" in self.trackers and not self.had_run.get("swanlab") and _swanlab_run() is not None:
                import swanlab

                swanlab.finish()

    return TrackerConfig()


def _wandb_run():
    import sys

    wandb = sys.modules.get("wandb")  # not imported: no run can be active
    return getattr(wandb, "run", None) if wandb is not None else None


def _swanlab_run():
    import sys

    swanlab = sys.modules.get("swanlab")
    if swanlab is None:
        return None
    try:
        return swanlab.get_run()
    except RuntimeError:  # swanlab >= 0.9: "No active Run"
        return None


def _log_tensorboard(cb, writer, _swan) -> None:
    if writer is None:
        return
    # indented lines render as code in TensorBoard's text tab (markdown)
    text = "\n".join("    " + line for line in json.dumps(cb.config, indent=2, ensure_ascii=False).splitlines())
    writer.add_text("nekotune/config", text)
    writer.add_text("nekotune/run_name", cb.run_name)
    writer.flush()


def _log_wandb(cb, _writer, _swan) -> None:
    run = _wandb_run()
    if run is not None:
        run.config.update({"nekotune": cb.config, "nekotune_run_name": cb.run_name}, allow_val_change=True)


def _log_swanlab(cb, _writer, swan) -> None:
    if swan is not None:
        swan.update_config({"nekotune": cb.config, "nekotune_run_name": cb.run_name})


def _log_mlflow(cb, _writer, _swan) -> None:
    import mlflow
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

    if mlflow.active_run() is None:
        return
    mlflow.log_dict(cb.config, "nekotune_config.json")
    params = {MLFLOW_PARAM_PREFIX + k: str(v)[:MAX_PARAM_VAL_LENGTH] for k, v in flatten(cb.config).items()}
    params[MLFLOW_PARAM_PREFIX + "run_name"] = cb.run_name
    items = list(params.items())
    for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
        mlflow.log_params(dict(items[i: i + MAX_PARAMS_TAGS_PER_BATCH]))


_LOGGERS = {"tensorboard": _log_tensorboard, "wandb": _log_wandb, "swanlab": _log_swanlab, "mlflow": _log_mlflow}
