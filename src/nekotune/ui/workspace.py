"""What every tab of the web UI shares: the config, the models it has loaded, the training job."""

from __future__ import annotations

import gc
import threading
import traceback
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from nekotune.errors import UserError
from nekotune.runs import list_runs


def t(en: str, zh: str) -> str:
    """Every label in English and Chinese."""
    return f"{en} / {zh}"


# -- what the page works on ------------------------------------------------------------------
class ModelCache:
    """The last few models used by Chat and Compare, each loaded once (loading takes seconds)."""

    def __init__(self, cfg: Any, keep: int = 2):
        self.cfg = cfg
        self.keep = keep
        self.models: OrderedDict = OrderedDict()
        self.lock = threading.Lock()

    def get(self, model_arg: str) -> Any:
        from nekotune.model import load_for_inference

        with self.lock:
            if model_arg in self.models:
                self.models.move_to_end(model_arg)
                return self.models[model_arg]
            loaded = load_for_inference(self.cfg, model_arg)
            self.models[model_arg] = loaded
            while len(self.models) > self.keep:
                self.models.popitem(last=False)
                gc.collect()
            return loaded


class TrainingJob:
    """One training at a time, in a background thread; the page polls snapshot() every second."""

    def __init__(self):
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.flag = SimpleNamespace(requested=False)
        self.state: dict[str, Any] = {"status": "idle", "step": 0, "max_steps": 0, "losses": [], "run": None,
                                      "message": ""}

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def start(self, cfg: Any) -> None:
        with self.lock:
            if self.running:
                raise UserError("a training is already running; stop it first")
            self.flag = SimpleNamespace(requested=False)  # train() stops after the step where this turns True
            self.state = {"status": "starting", "step": 0, "max_steps": 0, "losses": [], "run": None, "message": ""}
            self.thread = threading.Thread(target=self._run, args=(cfg,), daemon=True, name="nekotune-ui-train")
            self.thread.start()

    def stop(self) -> None:
        if self.running:
            self.flag.requested = True
            self._update(status="stopping")

    def _update(self, **changes) -> None:
        with self.lock:
            self.state.update(changes)

    def _run(self, cfg) -> None:
        from nekotune.api import train  # dispatches by train.stage (issue 18), as `nekotune train` does
        from nekotune.training import TrainingInterrupted

        try:
            run = train(cfg, show_progress=False, stop_flag=self.flag, callbacks=[self._callback()])
            self._update(status="finished", run=str(run), message=f"adapter: {run.adapter}")
        except TrainingInterrupted as exc:
            self._update(status="stopped", run=str(exc.run), message=f"checkpoint: {exc.checkpoint or '-'}")
        except UserError as exc:
            self._update(status="error", message=str(exc))
        except Exception as exc:  # a bug: show it on the page and keep the traceback in the console
            traceback.print_exc()
            self._update(status="error", message=f"{type(exc).__name__}: {exc}")

    def _callback(self):
        from transformers import TrainerCallback

        job = self

        class UiProgress(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                job._update(status="running", max_steps=state.max_steps, step=state.global_step,
                            run=str(Path(args.output_dir).parent))

            def on_step_end(self, args, state, control, **kw):
                job._update(step=state.global_step)

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    with job.lock:
                        job.state["losses"] = job.state["losses"] + [(state.global_step, float(logs["loss"]))]

        return UiProgress()

    def snapshot(self) -> dict:
        with self.lock:
            return dict(self.state)


class Workspace:
    """What every tab shares: the config, the default model, loaded models and the training job."""

    def __init__(self, cfg: Any, model_arg: str | None = None):
        self.cfg = cfg
        self.default_model = model_arg or cfg.model.name_or_path
        self.cache = ModelCache(cfg)
        self.job = TrainingJob()
        self.chat_stops: dict[str, threading.Event] = {}

    def model_choices(self) -> list[tuple[str, str]]:
        runs = [str(r) for r in list_runs(self.cfg.output.root)]
        choices = [(f"{self.default_model}", self.default_model)]
        return choices + [(Path(r).name, r) for r in runs if r != self.default_model]

    def run_choices(self) -> list[tuple[str, str]]:
        return [(r.name, str(r)) for r in list_runs(self.cfg.output.root)]
