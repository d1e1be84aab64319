"""Fractions of an epoch, the best checkpoint and early stopping (nekotune.checkpointing), with a
real transformers Trainer on a tiny LoRA model."""

from __future__ import annotations

import shutil

import pytest
from trainer_fixtures import checkpoint_steps, make_trainer, recorder

from nekotune.checkpointing import CheckpointSettings, _points, best_fields, checkpoint_plan, stop_message
from nekotune.errors import UserError


def test_fraction_points_fall_on_the_same_steps_in_each_epoch():
    assert _points(0.1, 15) == {2, 3, 5, 6, 8, 9, 11, 12, 14, 15}  # ten times per epoch
    assert _points(0.25, 10) == {3, 5, 8, 10}
    assert _points(0.5, 5) == {3, 5}
    assert _points(0.1, 3) == {1, 2, 3}  # finer than one step: every step
    assert _points(0.3, 10) == {3, 6, 9}


def test_plan_arguments():
    plan = checkpoint_plan(CheckpointSettings(), has_eval=True)
    assert plan.args["save_strategy"] == "epoch" and plan.args["eval_strategy"] == "epoch" and not plan.callbacks
    plan = checkpoint_plan(CheckpointSettings(save_steps=50, eval_steps=25), has_eval=True)
    assert (plan.args["save_steps"], plan.args["eval_steps"], plan.schedule) == (50, 25, None)
    plan = checkpoint_plan(CheckpointSettings(save_steps=0.25), has_eval=False)
    assert plan.schedule is not None and plan.args["eval_strategy"] == "no" and plan.args["save_strategy"] == "steps"
    plan = checkpoint_plan(CheckpointSettings(save_steps=40, load_best=True), has_eval=True)
    assert plan.args["eval_steps"] == 40 and plan.args["load_best_model_at_end"]  # evaluates at every save
    assert plan.args["metric_for_best_model"] == "eval_loss" and plan.args["greater_is_better"] is False
    assert any("evaluating at every save" in n for n in plan.notes)
    plan = checkpoint_plan(CheckpointSettings(save_steps=5, eval_steps=3, load_best=True), has_eval=True)
    assert plan.schedule is not None  # not a multiple: nekotune's schedule places them
    plan = checkpoint_plan(CheckpointSettings(save_total_limit=1), has_eval=False)
    assert plan.args["save_total_limit"] == 2
    plan = checkpoint_plan(CheckpointSettings(early_stopping_patience=2, best_metric="loss"), has_eval=True)
    assert plan.early_stopping is not None and plan.args["metric_for_best_model"] == "eval_loss"
    assert any("keeps the last weights" in n for n in plan.notes)


def test_today_s_train_config_works_unchanged():
    from nekotune.config import TrainConfig

    plan = checkpoint_plan(TrainConfig(save_steps=10), has_eval=False)
    assert plan.args["save_steps"] == 10 and plan.args["save_total_limit"] == 2


@pytest.mark.parametrize("settings, has_eval, expect", [
    (CheckpointSettings(load_best=True), False, "train.load_best needs validation data"),
    (CheckpointSettings(early_stopping_patience=3), False, "data.val_size"),
    (CheckpointSettings(save_steps=1.5), True, "train.save_steps=1.5"),
    (CheckpointSettings(eval_steps=-2), True, "train.eval_steps=-2"),
    (CheckpointSettings(load_best=True, best_metric="accuracy"), True, "train.best_metric='accuracy'"),
    (CheckpointSettings(early_stopping_patience=0), True, "train.early_stopping_patience=0"),
    (CheckpointSettings(early_stopping_patience=2, early_stopping_threshold=-1), True, "early_stopping_threshold"),
])
def test_bad_settings_are_one_line_errors(settings, has_eval, expect):
    with pytest.raises(UserError) as e:
        checkpoint_plan(settings, has_eval)
    assert expect in str(e.value) and "\n" not in str(e.value)


def test_checkpoints_at_fractional_epoch_steps(tmp_path):
    # 20 rows / batch 2 = 10 batches, accumulation 2 -> 5 optimizer steps per epoch; 2 epochs
    out = tmp_path / "run"
    plan = checkpoint_plan(CheckpointSettings(save_steps=0.5, eval_steps=0.5, save_total_limit=10), has_eval=True)
    rec = recorder()
    trainer = make_trainer(out, train_rows=20, callbacks=[rec, *plan.callbacks], num_train_epochs=2,
                           gradient_accumulation_steps=2, **plan.args)
    trainer.train()
    assert plan.schedule.steps_per_epoch == 5
    # half an epoch = steps 3 and 5 of each epoch (transformers alone would read 0.5 as half of all steps: 5, 10)
    assert checkpoint_steps(out) == [3, 5, 8, 10]
    assert [s for s, _ in rec.evals] == [3, 5, 8, 10]
    assert "5 optimizer steps per epoch" in plan.schedule.describe()

    # resumed from checkpoint-5 (in a fresh directory), the schedule continues on the same points
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoint-5", resumed / "checkpoint-5")
    plan2 = checkpoint_plan(CheckpointSettings(save_steps=0.5, eval_steps=0.5, save_total_limit=10), has_eval=True)
    rec2 = recorder()
    trainer2 = make_trainer(resumed, train_rows=20, callbacks=[rec2, *plan2.callbacks], num_train_epochs=2,
                            gradient_accumulation_steps=2, **plan2.args)
    trainer2.train(resume_from_checkpoint=str(resumed / "checkpoint-5"))
    assert rec2.saves == [8, 10] and checkpoint_steps(resumed) == [5, 8, 10]


def _adapter_tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def test_early_stopping_ends_a_diverging_run_and_the_adapter_is_the_best_checkpoint(tmp_path):
    import torch

    out = tmp_path / "run"
    settings = CheckpointSettings(save_steps=0.5, eval_steps=0.5, load_best=True, save_total_limit=1,
                                  early_stopping_patience=2)
    plan = checkpoint_plan(settings, has_eval=True)
    rec = recorder()
    # lr 0.05 on random tokens: the training rows are memorised and the held-out loss climbs
    trainer = make_trainer(out, train_rows=8, callbacks=[rec, *plan.callbacks], num_train_epochs=20,
                           learning_rate=0.05, lr_scheduler_type="constant", **plan.args)
    trainer.train()
    state = trainer.state
    assert state.global_step < state.max_steps == 80  # stopped early
    fields = best_fields(state, out.parent, plan)
    assert fields["stopped_early"] and fields["stopped_at_step"] == state.global_step
    best_step, best_loss = min(rec.evals, key=lambda e: e[1])
    assert fields["best_eval_loss"] == pytest.approx(best_loss)
    assert fields["best_checkpoint"] == f"run/checkpoint-{best_step}" and fields["best_step"] == best_step
    # save_total_limit=1 (kept at 2 by nekotune): rotation never deleted the best checkpoint
    assert best_step in checkpoint_steps(out) and len(checkpoint_steps(out)) <= 2
    assert "stopped at step" in stop_message(fields, state.max_steps)

    # load_best_model_at_end: what nekotune saves as adapter/ after training is the best checkpoint's
    trainer.model.save_pretrained(str(tmp_path / "adapter"))
    saved, best = _adapter_tensors(tmp_path / "adapter"), _adapter_tensors(out / f"checkpoint-{best_step}")
    assert saved.keys() == best.keys() and len(saved) > 0
    assert all(torch.equal(saved[k], best[k]) for k in saved)
    final = _adapter_tensors(out / f"checkpoint-{state.global_step}")  # the weights it stopped with differ
    assert not all(torch.equal(saved[k], final[k]) for k in saved)


def test_a_best_evaluation_between_saves_still_gets_its_checkpoint(tmp_path):
    out = tmp_path / "run"
    plan = checkpoint_plan(CheckpointSettings(save_steps=4, eval_steps=1, load_best=True, save_total_limit=10),
                           has_eval=True)
    rec = recorder()
    trainer = make_trainer(out, train_rows=8, callbacks=[rec, *plan.callbacks], max_steps=8,
                           learning_rate=0.05, lr_scheduler_type="constant", **plan.args)
    trainer.train()
    best_step = min(rec.evals, key=lambda e: e[1])[0]
    assert best_step in checkpoint_steps(out)
    assert best_fields(trainer.state, None, plan)["best_step"] == best_step
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best_step}")
    assert {4, 8} <= set(checkpoint_steps(out))  # the regular saves are still there
    improved, best = set(), float("inf")
    for step, loss in rec.evals:
        if loss < best:
            improved.add(step)
            best = loss
    assert set(rec.saves) == improved | {4, 8}  # plus one save at each new best evaluation
