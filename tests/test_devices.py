"""Device rules with the device faked: MPS precision by macOS/torch version, what a device
can run, presets and --fit without QLoRA off CUDA, unified memory, peak memory."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from nekotune import devices
from nekotune.devices import DeviceFacts, choose_precision
from nekotune.errors import UserError


def mac(macos=(15, 1), torch=(2, 13), chip="Apple M3 Pro", ram=32768.0, recommended=24576.0) -> DeviceFacts:
    return DeviceFacts("mps", torch, macos_version=macos, chip=chip, total_memory_mb=ram,
                       recommended_max_mb=recommended)


CPU = DeviceFacts("cpu", (2, 13), total_memory_mb=16384.0, cpu_fast_bf16=True)
OLD_CPU = DeviceFacts("cpu", (2, 13), total_memory_mb=16384.0, cpu_fast_bf16=False)
GPU = DeviceFacts("cuda", (2, 13), chip="RTX 3060", total_memory_mb=6144.0, cuda_bf16=True, bitsandbytes=True)
OLD_GPU = DeviceFacts("cuda", (2, 13), chip="GTX 1660", total_memory_mb=6144.0, cuda_bf16=False, bitsandbytes=True)


@pytest.mark.parametrize("facts, training, weights, autocast, note", [
    (mac(), True, "bf16", "bf16", ""),
    (mac(chip="Apple M1"), True, "bf16", "bf16", "emulates bf16"),
    (mac(chip="Apple M2 Max"), True, "bf16", "bf16", "emulates bf16"),
    (mac(macos=(13, 6)), True, "fp16", "fp16", "loss scaling"),  # no bf16 before Sonoma
    (mac(macos=(14, 0), torch=(2, 5)), True, "fp32", None, "fp32 needs twice the memory"),  # bf16 AMP needs 2.6
    (mac(macos=(14, 0), torch=(2, 7)), True, "bf16", "bf16", ""),
    (mac(macos=(13, 6), torch=(2, 7)), True, "fp32", None, "upgrade torch"),  # fp16 GradScaler on MPS needs 2.8
    (mac(), False, "bf16", None, ""),
    (mac(macos=(13, 6), torch=(2, 2)), False, "fp16", None, "no bf16"),
    (CPU, True, "bf16", "bf16", ""), (OLD_CPU, True, "fp32", None, ""), (CPU, False, "fp32", None, ""),
    (GPU, True, "bf16", "bf16", ""), (OLD_GPU, True, "fp16", "fp16", ""),
])
def test_auto_precision(facts: DeviceFacts, training: bool, weights: str, autocast: str | None, note: str):
    choice = choose_precision(facts, "auto", training)
    assert (choice.weights, choice.autocast) == (weights, autocast)
    assert note in choice.note if note else choice.note == ""


@pytest.mark.parametrize("facts, requested, training, words", [
    (mac(macos=(13, 6)), "bf16", False, ["macOS 14", "model.dtype=fp16"]),
    (mac(torch=(2, 5)), "bf16", True, ["torch 2.6"]),
    (mac(torch=(2, 7)), "fp16", True, ["torch 2.8"]),
    (CPU, "fp16", True, ["100x slower"]),
])
def test_impossible_precision_is_a_user_error(facts, requested, training, words):
    with pytest.raises(UserError) as err:
        choose_precision(facts, requested, training)
    for word in words:
        assert word in str(err.value)


def test_explicit_choices_that_work():
    assert choose_precision(mac(macos=(13, 6), torch=(2, 8)), "fp16").autocast == "fp16"
    assert choose_precision(mac(), "fp32").weights == "fp32"
    assert choose_precision(OLD_CPU, "bf16").autocast == "bf16"
    assert choose_precision(GPU, "fp32") == devices.PrecisionChoice("fp32", None)
    assert choose_precision(mac(), "auto").weight_bytes == 2.0


def test_the_cpu_rule_matches_what_train_picks_today():
    """devices.choose_precision is meant to replace model.pick_precision: on this CPU they agree."""
    from nekotune.model import cpu_has_fast_bf16, pick_precision

    facts = DeviceFacts("cpu", (2, 13), cpu_fast_bf16=cpu_has_fast_bf16())
    for requested in ("auto", "bf16", "fp32"):
        for training in (True, False):
            assert choose_precision(facts, requested, training).name == pick_precision("cpu", requested, training).name


@pytest.mark.parametrize("facts", [CPU, mac()])
def test_no_qlora_off_cuda(facts: DeviceFacts):
    ok, why = devices.capability(facts, "qlora")
    assert not ok and "NVIDIA GPU" in why and "data.max_seq_len" in why  # says what works instead
    options = devices.fit_options(facts)
    assert options.quantization == (False,) and options.note == why
    preset = {"model": {"quantization": "4bit"}, "train": {"batch_size": 1, "grad_accum": 16}}
    adapted, notes = devices.adapt_preset("6gb", preset, facts)
    assert adapted == {"model": {}, "train": {"batch_size": 1, "grad_accum": 16}}
    assert notes == [f"preset 6gb: model.quantization=4bit left out: {why}"]
    assert preset["model"] == {"quantization": "4bit"}  # the table itself is untouched


def test_qlora_on_cuda():
    assert devices.capability(GPU, "qlora") == (True, "")
    assert devices.fit_options(GPU).quantization == (False, True)
    preset = {"model": {"quantization": "4bit"}}
    assert devices.adapt_preset("6gb", preset, GPU) == (preset, [])
    no_bnb = DeviceFacts("cuda", (2, 13), bitsandbytes=False)
    assert devices.capability(no_bnb, "qlora") == (False, "QLoRA needs bitsandbytes: pip install 'nekotune[qlora]'")
    assert devices.capability(mac(), "flash_attention")[0] is False
    assert devices.capability(CPU, "grad_checkpointing") == (True, "")


def test_unified_memory():
    # 32 GB Mac: Metal recommends 24 GB; the system keeps ~3 GB: the smaller one is the budget
    assert devices.memory_budget_mb(mac()) == 24576.0
    assert devices.memory_budget_mb(mac(ram=8192.0, recommended=6000.0)) == 5120.0
    assert devices.memory_budget_mb(GPU) == 6144.0
    items = devices.unified_items({"base weights": 1000.0, "activations": 500.0,
                                   "CUDA context (outside torch allocations)": 600.0})
    assert "CUDA context (outside torch allocations)" not in items
    assert items["Python + torch runtime (same memory pool)"] == devices.CPU_RUNTIME_MB
    assert items["Metal / MPSGraph overhead (not yet measured)"] == pytest.approx(devices.MPS_FIXED_MB + 150.0)
    assert mac().unified and not GPU.unified and mac().to_dict()["unified_memory"] is True


def test_probe_this_machine():
    facts = devices.probe()
    assert facts.kind in ("cpu", "cuda", "mps") and facts.torch_version >= (2, 0)
    assert facts.total_memory_mb and facts.total_memory_mb > 0


def _proc_peak_kib() -> int:
    status = Path("/proc/self/status")
    if not status.is_file():
        pytest.skip("no /proc on this system")
    return next(int(line.split()[1]) for line in status.read_text(encoding="utf-8").splitlines()
                if line.startswith("VmHWM:"))


def test_libc_getrusage_reads_the_same_peak_as_proc():
    """The getrusage structure macOS is read with, checked here on Linux (ru_maxrss in KiB)."""
    maxrss = devices.getrusage_maxrss()
    hwm = _proc_peak_kib()
    assert maxrss is not None and abs(maxrss - hwm) <= 0.05 * hwm + 8192


def test_peak_rss_matches_the_kernel():
    peak = devices.peak_rss_mb()
    hwm = _proc_peak_kib() / 1024
    assert abs(peak - hwm) <= 0.05 * hwm + 8


def test_peak_rss_without_a_kernel_peak_uses_psutil(monkeypatch):
    monkeypatch.setattr(devices, "_kernel_peak_mb", lambda: None)  # as where no peak source answers
    import psutil

    assert devices.peak_rss_mb() == pytest.approx(psutil.Process().memory_info().rss / 2**20, rel=0.2)


def test_training_plan():
    plan = devices.plan_training(GPU, quantization="4bit")
    assert (plan.precision.name, plan.quantization, plan.grad_checkpointing, plan.packing) == ("bf16", "4bit", True,
                                                                                             True)
    plan = devices.plan_training(mac(chip="Apple M1"), grad_checkpointing=True, packing=False)
    assert (plan.device, plan.precision.name, plan.grad_checkpointing, plan.packing) == ("mps", "bf16", True, False)
    assert plan.notes and "emulates" in plan.notes[0]
    assert devices.plan_training(CPU).grad_checkpointing is False
    for facts in (CPU, mac()):
        with pytest.raises(UserError, match="model.quantization=4bit: QLoRA .* needs an NVIDIA GPU"):
            devices.plan_training(facts, quantization="4bit")


def test_the_plan_matches_what_train_decides_today():
    """wants_grad_checkpointing (train.py) and plan_training agree, so phase B can swap them."""
    from nekotune.config import load_config
    from nekotune.training import wants_grad_checkpointing

    for facts in (CPU, GPU, mac()):
        for overrides in ([], ["train.grad_checkpointing=true"], ["train.grad_checkpointing=false"],
                          ["model.quantization=4bit"]):
            cfg = load_config(None, overrides, default_to_demo=False)
            if cfg.model.quantization and facts.kind != "cuda":
                continue
            plan = devices.plan_training(facts, cfg.model.dtype, cfg.model.quantization, cfg.train.grad_checkpointing)
            assert plan.grad_checkpointing == wants_grad_checkpointing(cfg, facts.kind)
