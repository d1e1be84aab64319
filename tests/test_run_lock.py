"""One process per run directory: unique default names, a lock held for the whole run, resume skips held runs."""

import os
import subprocess
import sys
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import pytest

import nekotune.runs as R
from conftest import tiny_overrides
from nekotune.cli import main
from nekotune.config import load_config
from nekotune.errors import UserError
from nekotune.runs import COMPLETE, RunLock, claim_run_dir, is_locked, last_checkpoint, run_dir_for
from nekotune.training import TrainingInterrupted, train

SRC = Path(__file__).resolve().parents[1] / "src"


def _cfg(*overrides):
    return load_config(None, list(overrides), default_to_demo=False)


def _under_root(model, data, root, **extra):
    """Overrides that let nekotune name the run under output.root (no output.dir)."""
    args = [a for a in tiny_overrides(model, data, root / "unused", **extra) if not a.startswith("output.dir=")]
    return [*args, f"output.root={root}"]


@contextmanager
def held_by_another_process(run: Path):
    """A second process that holds the run's lock until the block ends (it says so before we go on)."""
    code = ("import sys\nfrom nekotune.runs import RunLock\n"
            "lock = RunLock(sys.argv[1])\nassert lock.acquire()\nprint('held', flush=True)\nsys.stdin.read()\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(SRC)})
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.stdin.close()  # the holder exits without releasing: the OS drops its lock
        proc.wait(timeout=60)


class _FrozenClock(datetime):
    @classmethod
    def now(cls, tz=None):
        return datetime(2026, 12, 1, 12, 0, 0)


def test_runs_started_in_the_same_second_get_different_directories(tiny_llama, qa_file, tmp_path, monkeypatch):
    monkeypatch.setattr(R, "datetime", _FrozenClock)
    root = tmp_path / "outputs"
    cfg = _cfg(*_under_root(tiny_llama, qa_file, root, **{"train.max_steps": 2}))
    # the random tail comes out the same twice: the second run is told the name is taken and draws again
    tails = iter(["beef", "beef", "cafe"])
    monkeypatch.setattr(R.secrets, "token_hex", lambda n: next(tails))
    (a, lock_a), (b, lock_b) = claim_run_dir(cfg), claim_run_dir(cfg)
    assert a.name.endswith("20261201-120000-beef") and b.name.endswith("20261201-120000-cafe")
    assert is_locked(a) and is_locked(b)
    lock_a.release()
    lock_b.release()
    assert not root.exists() or list(root.iterdir()) == []  # nothing was written into them: nothing is left
    monkeypatch.undo()
    monkeypatch.setattr(R, "datetime", _FrozenClock)
    first, second = train(cfg, show_progress=False), train(cfg, show_progress=False)
    assert first != second and first.parent == second.parent == root
    for run in (first, second):
        assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_the_lock_is_held_for_the_whole_run_and_released_after(tiny_llama, qa_file, tmp_path):
    from transformers import TrainerCallback

    out = tmp_path / "run"
    seen = []

    class Watch(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            seen.append(is_locked(out))

    run = train(_cfg(*tiny_overrides(tiny_llama, qa_file, out, **{"train.max_steps": 3})), show_progress=False,
                callbacks=[Watch()])
    assert seen == [True, True, True]
    assert not is_locked(run) and (run / R.LOCK_FILE).is_file()
    with RunLock(run) as lock:
        assert lock.acquire()


def test_the_lock_is_released_after_an_error_and_an_interrupt(tiny_llama, qa_file, tmp_path, monkeypatch):
    import nekotune.training.trainer as T

    # a user error before anything was written: no directory is left behind
    root = tmp_path / "outputs"
    with pytest.raises(UserError):
        train(_cfg(*_under_root(tiny_llama, tmp_path / "missing.json", root)), show_progress=False)
    assert not root.exists() or list(root.iterdir()) == []
    # a user error mid-run (NaN loss)
    real = T.trained_positions_loss

    def poisoned(model, inputs):
        loss, n = real(model, inputs)
        return loss * float("nan"), n

    monkeypatch.setattr(T, "trained_positions_loss", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(UserError, match="NaN"):
        train(_cfg(*tiny_overrides(tiny_llama, qa_file, out)), show_progress=False)
    assert not is_locked(out)
    monkeypatch.undo()
    # Ctrl-C (the UI's stop button takes the same path): a checkpoint, and the lock let go
    out = tmp_path / "stopped"
    with pytest.raises(TrainingInterrupted):
        train(_cfg(*tiny_overrides(tiny_llama, qa_file, out, **{"train.max_steps": 50})), show_progress=False,
              stop_flag=SimpleNamespace(requested=True))
    assert last_checkpoint(out) is not None and not is_locked(out)


def test_training_into_a_directory_another_process_holds_is_refused(tiny_llama, qa_file, tmp_path, capsys):
    out = tmp_path / "run"
    with held_by_another_process(out):
        for resume in ("false", "true", "auto"):
            rc = main(["train", "--no-progress", *tiny_overrides(tiny_llama, qa_file, out,
                                                                 **{"train.resume": resume})])
            err = capsys.readouterr().err.strip().splitlines()
            assert rc == 2 and "in use" in err[-1] and str(out / ".lock") in err[-1]
            assert [p.name for p in out.iterdir()] == [".lock"]  # nothing written, nothing removed
    # the holder has ended (without letting go itself): the same command now trains
    assert main(["train", "--no-progress", *tiny_overrides(tiny_llama, qa_file, out, **{"train.max_steps": 1})]) == 0


def test_resume_skips_a_run_another_process_is_training(tiny_llama, qa_file, tmp_path):
    root = tmp_path / "outputs"
    busy = root / "busy-run"
    extra = {"train.max_steps": 4, "train.save_steps": 1, "train.resume": "auto"}
    with pytest.raises(TrainingInterrupted):  # an unfinished run with a checkpoint, as resume=auto looks for
        train(_cfg(*tiny_overrides(tiny_llama, qa_file, busy, **extra)), show_progress=False,
              stop_flag=SimpleNamespace(requested=True))
    cfg = _cfg(*_under_root(tiny_llama, qa_file, root, **extra))
    assert run_dir_for(cfg) == busy  # the candidate, while nobody holds it
    in_progress = busy / "checkpoints" / "checkpoint-2"  # what the other process is writing right now
    with held_by_another_process(busy):
        in_progress.mkdir()
        (in_progress / "adapter_model.safetensors").write_bytes(b"half written")
        assert run_dir_for(cfg) != busy
        run = train(cfg, show_progress=False)
        assert run != busy and (run / "adapter").is_dir()
        assert in_progress.is_dir() and not (in_progress / COMPLETE).exists()  # left alone
        # resume=true takes the latest checkpointed run: the one nobody holds
        assert run_dir_for(_cfg(*_under_root(tiny_llama, qa_file, root, **{**extra, "train.resume": "true"}))) == run


def test_other_ranks_take_rank_zeros_choice_and_hold_no_lock(tmp_path, monkeypatch):
    import nekotune.distributed as D

    run = tmp_path / "chosen-by-rank-0"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(D, "agree_on", lambda value: str(run))
    got, lock = claim_run_dir(_cfg())
    assert got == run and lock is None and not run.exists()
    monkeypatch.setattr(D, "agree_on", lambda value: R._REFUSED + "refused on rank 0")
    with pytest.raises(UserError, match="refused on rank 0"):  # rank 0's refusal reaches every rank
        claim_run_dir(_cfg())
