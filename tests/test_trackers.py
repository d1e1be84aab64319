"""Experiment trackers (nekotune.trackers), offline: an MLflow file store, wandb offline mode,
TensorBoard event files, swanlab's own callback; each fed by a real Trainer run on a tiny model."""

from __future__ import annotations

import json
import struct
import sys
import types
from pathlib import Path

import pytest
from trainer_fixtures import make_trainer

from nekotune import trackers
from nekotune.errors import UserError

CONFIG = {"model": {"name_or_path": "tiny"}, "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
          "train": {"lr": 0.001, "report_to": ["mlflow"]}}
TRACKER_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE", "MLFLOW_EXPERIMENT_NAME", "WANDB_PROJECT",
               "WANDB_MODE", "WANDB_DIR", "WANDB_SILENT", "SWANLAB_PROJECT", "SWANLAB_LOG_DIR", "SWANLAB_MODE")


@pytest.fixture
def clean_env(monkeypatch):
    for var in TRACKER_ENV:
        monkeypatch.setenv(var, "x")  # recorded, so what the code sets is undone after the test
        monkeypatch.delenv(var)
    return monkeypatch


def test_parse_report_to():
    assert trackers.parse_report_to(None) == ["tensorboard"]
    assert trackers.parse_report_to("none") == [] and trackers.parse_report_to([]) == []
    assert trackers.parse_report_to("wandb, MLflow") == ["wandb", "mlflow"]
    assert trackers.parse_report_to(["tensorboard", "swanlab,wandb", "wandb"]) == ["tensorboard", "swanlab", "wandb"]


@pytest.mark.parametrize("value, expect", [
    ("comet_ml", "comet_ml is a transformers integration nekotune does not set up"),
    ("wandbb", "unknown tracker 'wandbb'"),
    ("all", "train.report_to=all is not supported"),
    ("none,wandb", "`none` cannot be combined"),
    ([3], "3 is not a tracker name"),
])
def test_bad_report_to(value, expect):
    with pytest.raises(UserError) as e:
        trackers.parse_report_to(value)
    assert expect in str(e.value) and "tensorboard, wandb, swanlab, mlflow or none" in str(e.value)


def test_missing_package_names_the_extra(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UserError) as e:
        trackers.tracker_plan("tensorboard,wandb", tmp_path, "r", {})
    assert str(e.value) == ("train.report_to=wandb needs the wandb package: pip install 'nekotune[wandb]' "
                            "(or remove wandb from train.report_to)")


def test_none_means_no_tracker_at_all(tmp_path):
    plan = trackers.tracker_plan("none", tmp_path, "r", {})
    assert plan.report_to == "none" and plan.callbacks == [] and not (tmp_path / "tb").exists()


def _train(run: Path, plan: trackers.TrackerPlan, steps: int = 3):
    trainer = make_trainer(run / "checkpoints", train_rows=12, max_steps=steps, eval_strategy="steps",
                           eval_steps=steps, save_strategy="no", report_to=plan.report_to, run_name=plan.run_name,
                           callbacks=plan.callbacks)
    trainer.train()
    return trainer


def test_mlflow_file_store_receives_metrics_config_and_run_name(clean_env, tmp_path):
    from mlflow.tracking import MlflowClient

    store, run = tmp_path / "mlruns", tmp_path / "run"
    plan = trackers.tracker_plan("mlflow,tensorboard", run, "tiny-run", CONFIG, mlflow_store=store)
    assert plan.report_to == ["mlflow"]  # tensorboard is nekotune's own callback
    assert any("mlflow: experiment nekotune, run tiny-run" in n for n in plan.notes)
    trainer = _train(run, plan)
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]

    client = MlflowClient(tracking_uri=store.as_uri())
    (mlrun,) = client.search_runs([client.get_experiment_by_name("nekotune").experiment_id])
    assert mlrun.info.run_name == "tiny-run" and mlrun.info.status == "FINISHED"
    history = client.get_metric_history(mlrun.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3]
    assert [m.value for m in history] == pytest.approx(logged)
    assert [m.step for m in client.get_metric_history(mlrun.info.run_id, "eval_loss")] == [3]
    params = mlrun.data.params
    assert params["nekotune.lora.r"] == "4" and params["nekotune.run_name"] == "tiny-run"
    assert json.loads(params["nekotune.lora.target_modules"]) == ["q_proj", "v_proj"]
    assert params["learning_rate"] == "0.001"  # the Trainer's own params sit beside nekotune's
    artifact = client.download_artifacts(mlrun.info.run_id, "nekotune_config.json", str(tmp_path / "dl"))
    assert json.loads(Path(artifact).read_text()) == CONFIG

    # TensorBoard in the run directory, with nekotune's config as text
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    assert "nekotune/config/text_summary" in events.Tags()["tensors"]
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
    text = events.Tensors("nekotune/config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"r": 4' in text


def _wandb_records(path: Path):
    """Records of a wandb run file: a ':W&B' header, then a LevelDB-style log (32 KiB blocks of
    chunks: crc32 (4 bytes), length (2), type (1: full, 2: first, 3: middle, 4: last)) holding
    protobuf `Record`s."""
    from wandb.proto import wandb_internal_pb2

    raw = path.read_bytes()
    assert raw[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # too little room for a chunk header: the block is padded
            pos += block - pos % block
            continue
        _crc, size, kind = struct.unpack("<IHB", raw[pos: pos + 7])
        data, pos = raw[pos + 7: pos + 7 + size], pos + 7 + size
        if kind == 0:
            continue
        pending = data if kind in (1, 2) else pending + data
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def test_wandb_offline_writes_the_run_with_the_config(clean_env, tmp_path):
    clean_env.setenv("WANDB_MODE", "offline")
    clean_env.setenv("WANDB_DIR", str(tmp_path))
    clean_env.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    plan = trackers.tracker_plan(["wandb"], run, "tiny-wandb", CONFIG)
    assert plan.report_to == ["wandb"] and not (run / "tb").exists()
    trainer = _train(run, plan)
    wandb = sys.modules["wandb"]
    assert wandb.run is None  # finished at train end: the next training gets its own run
    wandb.teardown()  # waits until wandb's service has written the run file (and stops the service)

    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    config, losses, name = {}, [], None
    for record in _wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            name = record.run.display_name
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            losses += [items["train/loss"]] if "train/loss" in items else []
    assert name == "tiny-wandb"
    assert config["nekotune"] == CONFIG and config["nekotune_run_name"] == "tiny-wandb"
    assert losses == pytest.approx([h["loss"] for h in trainer.state.log_history if "loss" in h])


def _fake_swanlab(monkeypatch):
    """swanlab's own module layout, recording what nekotune asks of it (the real package needs
    protobuf<7, so it is not in the test environment; test_swanlab_offline_real runs where it is)."""
    from transformers import TrainerCallback

    made = []

    class SwanLabCallback(TrainerCallback):
        def __init__(self, **kwargs):
            self.kwargs, self.config, self.logged = kwargs, {}, []
            made.append(self)

        def update_config(self, config):
            self.config.update(config)

        def on_log(self, args, state, control, logs=None, **kw):
            self.logged.append(dict(logs or {}))

    def get_run():
        raise RuntimeError("No active Run")  # what swanlab >= 0.9 does (transformers' callback trips on it)

    integration = types.ModuleType("swanlab.integration.transformers")
    integration.SwanLabCallback = SwanLabCallback
    swanlab = types.ModuleType("swanlab")
    swanlab.get_run = get_run
    swanlab.finish = lambda: None
    monkeypatch.setitem(sys.modules, "swanlab", swanlab)
    monkeypatch.setitem(sys.modules, "swanlab.integration", types.ModuleType("swanlab.integration"))
    monkeypatch.setitem(sys.modules, "swanlab.integration.transformers", integration)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "swanlab" else real(n, *a))
    return made


def test_swanlab_uses_its_own_callback(clean_env, tmp_path):
    made = _fake_swanlab(clean_env)
    run = tmp_path / "run"
    plan = trackers.tracker_plan("swanlab", run, "tiny-swan", CONFIG)
    assert plan.report_to == "none"  # not transformers' broken SwanLabCallback
    _train(run, plan)
    (cb,) = made
    assert cb.kwargs == {"project": "nekotune", "experiment_name": "tiny-swan", "log_dir": str(run / "swanlog")}
    assert cb.config == {"nekotune": CONFIG, "nekotune_run_name": "tiny-swan"}
    assert [log["loss"] for log in cb.logged if "loss" in log]


def test_swanlab_offline_real(clean_env, tmp_path):
    pytest.importorskip("swanlab", reason="swanlab needs protobuf<7; run this where nekotune[swanlab] is installed")
    clean_env.setenv("SWANLAB_MODE", "offline")
    run = tmp_path / "run"
    plan = trackers.tracker_plan("swanlab", run, "tiny-swan", CONFIG)
    _train(run, plan)
    (config_file,) = (run / "swanlog").glob("run-*/files/config.yaml")
    text = config_file.read_text()
    assert "nekotune" in text and "tiny-swan" in text
    assert list((run / "swanlog").glob("run-*/run-*.swanlab"))


def test_nekotune_train_reports_to_mlflow(clean_env, tiny_llama, qa_file, tmp_path):
    """nekotune's own training with train.report_to=mlflow and no MLFLOW_TRACKING_URI: the run's
    metrics go to the file store next to the run directory."""
    from conftest import tiny_overrides
    from mlflow.tracking import MlflowClient

    from nekotune.config import load_config
    from nekotune.training import train

    store, out = tmp_path / "mlruns", tmp_path / "run"
    cfg = load_config(None, tiny_overrides(tiny_llama, qa_file, out, **{
        "train.max_steps": 4, "train.report_to": "mlflow", "output.run_name": "neko-run",
        "output.tensorboard": "true"}), default_to_demo=False)
    run = train(cfg, show_progress=False)

    client = MlflowClient(tracking_uri=store.as_uri())
    (mlrun,) = client.search_runs([client.get_experiment_by_name("nekotune").experiment_id])
    assert mlrun.info.run_name == "neko-run"
    losses = json.loads((run / "run.json").read_text())["train_losses"]
    history = client.get_metric_history(mlrun.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(s, pytest.approx(v)) for s, v in losses]
    assert mlrun.data.params["nekotune.lora.r"] == "4" and mlrun.data.params["nekotune.run_name"] == "neko-run"
    assert mlrun.data.params["nekotune.model.name_or_path"] == str(tiny_llama)
    assert not (run / "tb").exists()  # report_to names mlflow only: no TensorBoard
