"""Issue 16 through the real config and recipe on a tiny Llama: checkpoints at fractions of an
epoch, the best checkpoint as the run's adapter (named in run.json), early stopping of a
diverging run, an MLflow file store receiving the run's metrics, data.repeat with one record."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_overrides
from nekotune.config import load_config
from nekotune.errors import UserError
from nekotune.runs import Run
from nekotune.training import train
from trainer_fixtures import recorder


def _cfg(*overrides):
    return load_config(None, list(overrides), default_to_demo=False)


def _rows(n, question="Question number {i}?", answer="(purrs) Answer {i}, nya~"):
    return [{"instruction": question.format(i=i), "output": answer.format(i=i)} for i in range(n)]


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def test_save_steps_below_one_are_fractions_of_an_epoch(tiny_llama, tmp_path):
    data = tmp_path / "qa.json"
    data.write_text(json.dumps(_rows(24)))
    rec = recorder()
    # 24 rows / batch 4 = 6 optimizer steps per epoch; 0.5 = twice per epoch, over 2 epochs.
    # (transformers alone reads 0.5 as half of *all* 12 steps: saves at 6 and 12 only)
    cfg = _cfg(*tiny_overrides(tiny_llama, data, tmp_path / "run", **{
        "train.max_steps": -1, "train.epochs": 2, "train.save_steps": 0.5, "train.save_total_limit": 10}))
    assert cfg.train.save_steps == 0.5
    run = train(cfg, show_progress=False, callbacks=[rec])
    assert rec.saves == [3, 6, 9, 12]
    assert sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("checkpoint-*")) == [3, 6, 9, 12]


@pytest.fixture(scope="module")
def diverging_run(tiny_llama, tmp_path_factory):
    """lr 2.0 on 16 rows, evaluated on other text: the held-out loss stops improving and the
    run stops early. Evaluated and saved every half epoch (2 steps), logged to an MLflow file store."""
    tmp = tmp_path_factory.mktemp("diverging")
    data, val = tmp / "qa.json", tmp / "val.json"
    data.write_text(json.dumps(_rows(16)))
    val.write_text(json.dumps(_rows(8, "Describe the weather on day {i}.",
                                    "Cloudy with rain, {i} millimetres expected tomorrow.")))
    store = tmp / "mlruns"
    rec = recorder()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", store.as_uri())
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        mp.setenv("MLFLOW_EXPERIMENT_NAME", "nekotune-test")
        cfg = _cfg(*tiny_overrides(tiny_llama, data, tmp / "run", **{
            "data.val_path": str(val), "train.max_steps": -1, "train.epochs": 12, "train.lr": 2.0,
            "train.scheduler": "constant", "train.warmup_ratio": 0, "train.save_steps": 0.5,
            "train.eval_steps": 0.5, "train.load_best": "true", "train.early_stopping_patience": 2,
            "train.early_stopping_threshold": 0.01, "train.save_total_limit": 1, "train.report_to": "mlflow",
            "output.run_name": "diverging"}))
        run = train(cfg, show_progress=False, callbacks=[rec])
    return Run(run), rec, store


def test_early_stopping_ends_a_diverging_run(diverging_run):
    run, rec, _ = diverging_run
    info = run.metrics
    assert info["stopped_early"] is True
    assert info["steps"] == info["stopped_at_step"] < 48  # 12 epochs x 4 steps
    losses = [loss for _, loss in info["eval_losses"]]
    best = min(losses)
    # the last two (the patience) evaluations did not beat the best by more than the threshold
    assert all(loss > best - 0.01 for loss in losses[-2:]) and best not in losses[-2:]
    assert [s for s, _ in info["eval_losses"]] == list(range(2, info["steps"] + 1, 2))  # every half epoch


def test_the_adapter_is_the_best_checkpoint_and_run_json_names_it(diverging_run):
    run, rec, _ = diverging_run
    info = run.metrics
    best_step, best_loss = min(info["eval_losses"], key=lambda e: e[1])
    assert info["best_checkpoint"] == f"checkpoints/checkpoint-{best_step}"
    assert info["best_eval_loss"] == pytest.approx(best_loss) and info["best_step"] == best_step
    assert run.best_checkpoint == (run.dir / "checkpoints" / f"checkpoint-{best_step}").resolve()
    adapter, best = _tensors(run.adapter), _tensors(run.best_checkpoint)
    assert adapter.keys() == best.keys() and adapter
    assert all(torch.equal(adapter[k], best[k]) for k in adapter)
    last = _tensors(run.dir / "checkpoints" / f"checkpoint-{info['steps']}")  # where it stopped: different
    assert not all(torch.equal(adapter[k], last[k]) for k in adapter)
    # save_total_limit=1 never deleted the best checkpoint
    assert {p.name for p in run.checkpoints.glob("checkpoint-*")} == {f"checkpoint-{best_step}",
                                                                      f"checkpoint-{info['steps']}"}


def test_an_mlflow_file_store_receives_the_run_metrics(diverging_run):
    from mlflow.tracking import MlflowClient

    run, _, store = diverging_run
    client = MlflowClient(tracking_uri=store.as_uri())
    (mlrun,) = client.search_runs([client.get_experiment_by_name("nekotune-test").experiment_id])
    assert mlrun.info.run_name == "diverging" and mlrun.info.status == "FINISHED"
    logged = [(m.step, m.value) for m in client.get_metric_history(mlrun.info.run_id, "eval_loss")]
    assert logged == [(s, pytest.approx(v)) for s, v in run.metrics["eval_losses"]]
    assert len(client.get_metric_history(mlrun.info.run_id, "loss")) >= run.metrics["steps"] // 2
    assert mlrun.data.params["nekotune.train.lr"] == "2.0"
    assert mlrun.data.params["nekotune.train.load_best"] == "True"


def test_load_best_needs_validation_data(tiny_llama, qa_file, tmp_path):
    cfg = _cfg(*tiny_overrides(tiny_llama, qa_file, tmp_path / "run", **{"train.load_best": "true"}))
    with pytest.raises(UserError, match="train.load_best needs validation data.*data.val_size"):
        train(cfg, show_progress=False)


def test_one_record_repeated_trains_with_a_note(tiny_llama, tmp_path, caplog):
    data = tmp_path / "one.json"
    data.write_text(json.dumps({"instruction": "Who are you?", "output": "I am Neko, nya~"}))
    cfg = _cfg(*tiny_overrides(tiny_llama, data, tmp_path / "run", **{
        "data.repeat": 8, "data.val_size": 0.1, "train.max_steps": -1, "train.epochs": 1, "train.save_steps": "null"}))
    with caplog.at_level("WARNING", logger="nekotune"):
        run = Run(train(cfg, show_progress=False))
    stats = run.metrics["data"]
    assert stats["rows"] == 1 and stats["repeat"] == 8 and stats["train_rows"] == 8 and stats["eval_rows"] == 0
    assert run.metrics["steps"] == 2  # 8 copies / batch 4
    assert any("data.val_size=0.1 ignored" in r.getMessage() for r in caplog.records)


def test_resume_refuses_a_changed_repeat_and_accepts_runs_from_before_it(tmp_path):
    import yaml

    from nekotune.runs import check_resume_compatible

    cfg = _cfg("data.repeat=4")
    saved = cfg.to_dict()
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    check_resume_compatible(cfg, tmp_path)
    with pytest.raises(UserError, match="data.repeat was 4 and is now 2"):
        check_resume_compatible(_cfg("data.repeat=2"), tmp_path)
    for key in ("repeat", "hub"):  # a run saved before issue 16 has neither key
        saved["data"].pop(key)
    saved["model"].pop("hub")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    check_resume_compatible(_cfg(), tmp_path)
    with pytest.raises(UserError, match="data.repeat was 1 and is now 4"):
        check_resume_compatible(cfg, tmp_path)
