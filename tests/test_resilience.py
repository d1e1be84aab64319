"""Crashes, interruptions and hostile input lose nothing."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_overrides
from nekotune.config import load_config
from nekotune.errors import UserError
from nekotune.io import atomic_write_bytes
from nekotune.training import COMPLETE, last_checkpoint, train

STEPS = 12


def _cfg(*overrides):
    return load_config(None, list(overrides), default_to_demo=False)


def _overrides(model, data, out, **extra):
    return tiny_overrides(model, data, out, **{"train.max_steps": STEPS, "train.save_steps": 1,
                                               "train.save_total_limit": 2, "train.lr": 3e-3, **extra})


def _spawn(args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "nekotune", "train", "--no-progress", "--no-samples", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_step(proc, step: int, timeout: float = 120) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            return False
        if line.startswith(f"step {step}/"):
            return True
    return False


def test_sigkill_at_five_random_steps_then_resume_equals_uninterrupted(tiny_llama, qa_file, tmp_path):
    reference = train(_cfg(*_overrides(tiny_llama, qa_file, tmp_path / "ref")), show_progress=False)
    kills = sorted(random.Random(7).sample(range(2, STEPS), 5))
    args = _overrides(tiny_llama, qa_file, tmp_path / "killed", **{"train.resume": "auto"})
    for step in kills:
        proc = _spawn(args)
        reached = _wait_for_step(proc, step)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert reached, proc.stderr.read()
    proc = _spawn(args)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    a = load_file(reference / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "killed" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    ref_log = json.loads((reference / "run.json").read_text())["train_losses"]
    got_log = json.loads((tmp_path / "killed" / "run.json").read_text())["train_losses"]
    assert [s for s, _ in got_log] == list(range(1, STEPS + 1))
    assert [loss for _, loss in got_log] == pytest.approx([loss for _, loss in ref_log], abs=1e-5)


def test_ctrl_c_saves_checkpoint_and_exits_130(tiny_llama, qa_file, tmp_path):
    out = tmp_path / "run"
    proc = _spawn(_overrides(tiny_llama, qa_file, out, **{"train.max_steps": 500, "train.save_steps": 1000}))
    assert _wait_for_step(proc, 2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "train.resume=true" in err and f"output.dir={out}" in err
    ckpt = last_checkpoint(out)
    assert ckpt is not None and (ckpt / "adapter_model.safetensors").is_file()
    # resuming from it works and continues after the saved step
    train(_cfg(*_overrides(tiny_llama, qa_file, out, **{"train.max_steps": int(ckpt.name.split("-")[1]) + 2,
                                                         "train.save_steps": 1000, "train.resume": "true"})),
          show_progress=False)
    assert json.loads((out / "run.json").read_text())["steps"] == int(ckpt.name.split("-")[1]) + 2


def test_second_ctrl_c_exits_at_once(tiny_llama, qa_file, tmp_path):
    proc = _spawn(_overrides(tiny_llama, qa_file, tmp_path / "run", **{"train.max_steps": 500}))
    assert _wait_for_step(proc, 1)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
    assert proc.returncode == 130


def test_checkpoint_cut_off_mid_save_is_never_resumed(tiny_llama, qa_file, tmp_path):
    out = tmp_path / "run"
    train(_cfg(*_overrides(tiny_llama, qa_file, out, **{"train.max_steps": 3})), show_progress=False)
    good = last_checkpoint(out)
    broken = out / "checkpoints" / "checkpoint-4"
    broken.mkdir()
    (broken / "adapter_model.safetensors").write_bytes(b"half a file")
    assert last_checkpoint(out) == good
    train(_cfg(*_overrides(tiny_llama, qa_file, out, **{"train.max_steps": 5, "train.resume": "true"})),
          show_progress=False)
    assert (out / "checkpoints" / "checkpoint-4" / COMPLETE).is_file()


def test_atomic_write_killed_mid_file_keeps_old_content(tmp_path):
    target = tmp_path / "model.gguf"
    target.write_bytes(b"old good content")
    fresh = tmp_path / "new.gguf"
    code = ("import sys, time\nfrom nekotune.io import atomic_write_chunks\n"
            "def slow():\n"
            "    for i in range(100):\n"
            "        yield b'x' * 65536\n"
            "        print('chunk', flush=True)\n"
            "        time.sleep(0.05)\n"
            "atomic_write_chunks(sys.argv[1], slow())\n")
    for path in (target, fresh):
        proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
        for _ in range(5):
            proc.stdout.readline()  # killed after several chunks were written
        proc.kill()
        proc.wait()
    assert target.read_bytes() == b"old good content"
    assert not fresh.exists()
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["model.gguf"]


def test_disk_full_is_a_clear_error_and_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "run.json"
    target.write_text("{}")
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.fh.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: Full(real_fdopen(fd, mode)))
    with pytest.raises(UserError, match="disk full"):
        atomic_write_bytes(target, b'{"new": 1}')
    assert target.read_text() == "{}"


def test_disk_full_during_checkpoint_names_last_good_one(tiny_llama, qa_file, tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, Trainer

    real = Trainer._save_checkpoint
    calls = {"n": 0}

    def failing(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(Trainer, "_save_checkpoint", failing)
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"disk full.*checkpoint-2"):
        train(_cfg(*_overrides(tiny_llama, qa_file, out, **{"train.max_steps": 6})), show_progress=False)
    good = last_checkpoint(out)
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), good)


def _zip_writer_error():
    """What torch.save's zip writer raised on a full tmpfs (torch 2.13): no errno in the text."""
    try:
        raise RuntimeError("basic_ios::clear: iostream error")
    except RuntimeError:
        try:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        except RuntimeError as exc:
            return exc


# The messages are those measured on a 256 KB tmpfs (safetensors 0.8, torch 2.13).
FULL_DISK_WRITERS = {
    "safetensors": ("peft.peft_model.safe_save_file",
                    lambda: __import__("safetensors").SafetensorError(
                        "Error while serializing: I/O error: No space left on device (os error 28)")),
    "torch-legacy": ("torch.save", lambda: RuntimeError("write(): fd 3 failed with No space left on device")),
    "torch-zip": ("torch.save", _zip_writer_error),
    "torch-old-zip": ("torch.save", lambda: RuntimeError(
        "[enforce fail at inline_container.cc:595] . PytorchStreamWriter failed writing file data/0: "
        "file write failed")),
}


def _fail_writes_into(monkeypatch, target: str, make_exc, where: str):
    """Make one real writer fail the way a full disk makes it fail, for files under `where` only."""
    import importlib

    module_name, attr = target.rsplit(".", 1)
    module = importlib.import_module(module_name)
    real = getattr(module, attr)

    def write(obj, path, *a, **k):
        if where in str(path):
            Path(path).write_bytes(b"the first blocks")  # what a full disk leaves behind
            raise make_exc()
        return real(obj, path, *a, **k)

    monkeypatch.setattr(module, attr, write)


def _nearly_full(monkeypatch, free: int):
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=free))


@pytest.mark.parametrize("writer", sorted(FULL_DISK_WRITERS))
def test_disk_full_inside_any_checkpoint_writer_is_the_clear_error(tiny_llama, qa_file, tmp_path, monkeypatch,
                                                                   writer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    target, make_exc = FULL_DISK_WRITERS[writer]
    _fail_writes_into(monkeypatch, target, make_exc, "checkpoint-3")
    _nearly_full(monkeypatch, free=1 << 20)
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"disk full while saving to .*checkpoint-2"):
        train(_cfg(*_overrides(tiny_llama, qa_file, out, **{"train.max_steps": 6})), show_progress=False)
    assert not (out / "checkpoints" / "checkpoint-3").exists()  # the cut-off checkpoint is gone
    monkeypatch.undo()
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), last_checkpoint(out))


def test_a_write_error_with_space_left_is_not_called_disk_full(tiny_llama, qa_file, tmp_path, monkeypatch):
    _fail_writes_into(monkeypatch, "torch.save", _zip_writer_error, "checkpoint-2")
    _nearly_full(monkeypatch, free=50 << 30)
    with pytest.raises(RuntimeError, match="unexpected pos"):
        train(_cfg(*_overrides(tiny_llama, qa_file, tmp_path / "run", **{"train.max_steps": 3})),
              show_progress=False)


def test_disk_full_while_saving_the_adapter_is_the_clear_error(tiny_llama, qa_file, tmp_path, monkeypatch):
    target, make_exc = FULL_DISK_WRITERS["safetensors"]
    _fail_writes_into(monkeypatch, target, make_exc, ".adapter.")  # atomic_dir's temporary directory
    out = tmp_path / "run"
    with pytest.raises(UserError, match="disk full"):
        train(_cfg(*_overrides(tiny_llama, qa_file, out, **{"train.max_steps": 2})), show_progress=False)
    assert not (out / "adapter").exists() and not [p for p in out.iterdir() if p.name.startswith(".adapter")]
    assert last_checkpoint(out).name == "checkpoint-2"


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nan_loss_guard(tiny_llama, qa_file, tmp_path, monkeypatch, policy):
    import nekotune.training.trainer as T

    real = T.trained_positions_loss
    calls = {"n": 0}

    def poisoned(model, inputs):
        loss, n = real(model, inputs)
        if model.training:
            calls["n"] += 1
            if calls["n"] == 3:
                return loss * float("nan"), n
        return loss, n

    monkeypatch.setattr(T, "trained_positions_loss", poisoned)
    cfg = _cfg(*_overrides(tiny_llama, qa_file, tmp_path / "run", **{"train.max_steps": 5, "train.save_steps": 2,
                                                                    "train.nan_policy": policy}))
    if policy == "stop":
        with pytest.raises(UserError, match=r"NaN/inf at step 3.*checkpoint-2"):
            train(cfg, show_progress=False)
    else:
        run = train(cfg, show_progress=False)
        info = json.loads((run / "run.json").read_text())
        assert info["skipped_steps"] == [3] and info["steps"] == 5
        for t in load_file(run / "adapter" / "adapter_model.safetensors").values():
            assert torch.isfinite(t).all()


def test_out_of_memory_gets_advice(tiny_llama, qa_file, tmp_path, monkeypatch, capsys):
    import nekotune.training.trainer as T
    from nekotune.cli import main

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(T, "trained_positions_loss", oom)
    rc = main(["train", *_overrides(tiny_llama, qa_file, tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "out of memory" in err and "train.batch_size=2" in err and "grad_checkpointing" in err


def test_adapters_load_from_safetensors_only(tiny_llama, qa_file, tmp_path, capsys):
    from nekotune.cli import main

    run = train(_cfg(*_overrides(tiny_llama, qa_file, tmp_path / "run", **{"train.max_steps": 1})),
                show_progress=False)
    adapter = run / "adapter"
    weights = load_file(adapter / "adapter_model.safetensors")
    (adapter / "adapter_model.safetensors").unlink()
    torch.save(weights, adapter / "adapter_model.bin")
    rc = main(["ask", "hi", "--model", str(run)])
    assert rc == 2 and "safetensors only" in capsys.readouterr().err
