"""`estimate` follows the device rules (devices.py) with the device faked: MPS counted as unified
memory in its own precision, `--fit` never proposing 4-bit off CUDA, the 6gb preset on the
flagship example, and `train` leaving a preset's QLoRA out where it cannot run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nekotune import devices
from nekotune.cli import main
from nekotune.config import load_config
from nekotune.devices import DeviceFacts
from nekotune.errors import UserError
from nekotune.memory import estimate_training

CONFIGS = Path(__file__).parent / "data" / "configs"
QWEN3_1_7B = str(CONFIGS / "Qwen3-1.7B" / "config.json")
QWEN3_8B = str(CONFIGS / "Qwen3-8B" / "config.json")
EXAMPLE = str(Path(__file__).parents[1] / "examples" / "qwen3-1.7b-nekoqa.yaml")
MAC = DeviceFacts("mps", (2, 13), macos_version=(15, 1), chip="Apple M3 Pro", total_memory_mb=32768.0,
                  recommended_max_mb=24576.0)
CPU = DeviceFacts("cpu", (2, 13), total_memory_mb=16384.0, cpu_fast_bf16=True)
GPU = DeviceFacts("cuda", (2, 13), cuda_bf16=True, bitsandbytes=True)


def _cfg(*overrides: str):
    return load_config(None, list(overrides), default_to_demo=False)


def test_the_example_with_preset_6gb_fits_6gb(capsys):
    assert main(["estimate", EXAMPLE, "preset=6gb", "--model", QWEN3_1_7B]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "QLoRA 4-bit on cuda" in out and "preset 6gb: fits 6 GB" in out
    assert main(["estimate", EXAMPLE, "preset=6gb", "--model", QWEN3_1_7B, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["preset"] == {"name": "6gb", "budget_mb": 6144, "fits": True}
    assert result["estimate"]["settings"]["quant4"] and result["estimate"]["total_gb"] <= 6
    # the example alone (LoRA in 16 bits, batch 4 x 1024) would not fit a 6 GB card
    report = estimate_training(load_config(EXAMPLE), QWEN3_1_7B, facts=GPU)
    assert report.estimate.total_mb > 6 * 1024


def test_mps_is_unified_memory_in_its_own_precision():
    report = estimate_training(_cfg("lora.r=8"), QWEN3_1_7B, facts=MAC)
    assert report.result["device"] == "mps" and report.result["unified_memory"] is True
    assert report.settings.weight_bytes == 2.0  # bf16 on macOS 15 + torch 2.13, not fp32
    items = report.estimate.items
    assert any(k.startswith("Metal") for k in items) and "Python + torch runtime (same memory pool)" in items
    assert not any(k.startswith("CUDA context") for k in items)
    old = DeviceFacts("mps", (2, 5), macos_version=(14, 0), total_memory_mb=32768.0)  # no bf16 AMP: fp32
    assert estimate_training(_cfg("lora.r=8"), QWEN3_1_7B, facts=old).settings.weight_bytes == 4.0


@pytest.mark.parametrize("facts", [CPU, MAC], ids=["cpu", "mps"])
def test_fit_off_cuda_never_proposes_4bit(facts: DeviceFacts):
    for budget in ("24GB", "12GB", "6GB"):
        fit = estimate_training(_cfg("train.batch_size=4", "data.max_seq_len=2048"), QWEN3_8B, budget,
                                facts=facts).result["fit"]
        if fit["settings"] is None:
            assert "QLoRA (bitsandbytes 4-bit) needs an NVIDIA GPU" in fit["message"]
        else:
            assert not fit["settings"]["quant4"] and "model.quantization=4bit" not in fit["overrides"]
    # the same budget on a GPU takes 4-bit: the difference is the device, not the budget
    assert estimate_training(_cfg("train.batch_size=4", "data.max_seq_len=2048"), QWEN3_8B, "12GB",
                             facts=GPU).result["fit"]["settings"]["quant4"]


def test_fit_on_a_faked_mac_through_the_cli(monkeypatch, capsys):
    monkeypatch.setattr(devices, "light_facts", lambda requested="auto": MAC)
    assert main(["estimate", "--model", QWEN3_8B, "train.batch_size=4", "data.max_seq_len=2048", "--fit", "auto",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["device"] == "mps" and result["fit"]["budget_mb"] == 24576  # Metal's working set, not all RAM
    assert result["fit"]["settings"] is not None and "model.quantization=4bit" not in result["fit"]["overrides"]


@pytest.mark.parametrize("facts", [CPU, MAC], ids=["cpu", "mps"])
def test_a_presets_qlora_is_left_out_where_it_cannot_run(facts: DeviceFacts):
    cfg = _cfg(f"model.device={facts.kind}", "preset=6gb")
    report = estimate_training(cfg, QWEN3_1_7B, facts=facts)
    assert not report.settings.quant4 and report.result["device"] == facts.kind
    assert any("model.quantization=4bit left out" in n for n in report.result["notes"])
    adapted, notes = devices.adapt_config(cfg, facts)
    assert adapted.model.quantization is None and cfg.model.quantization == "4bit" and notes
    assert devices.adapt_config(cfg, GPU)[0].model.quantization == "4bit"
    # a quantization the user asked for without a preset is refused there, with what to do instead
    with pytest.raises(UserError, match="QLoRA .* needs an NVIDIA GPU"):
        estimate_training(_cfg(f"model.device={facts.kind}", "model.quantization=4bit"), QWEN3_1_7B, facts=facts)


def test_train_picks_the_mps_precision(monkeypatch):
    import torch

    from nekotune.model import pick_precision

    monkeypatch.setattr(devices, "probe", lambda kind=None: MAC)
    p = pick_precision("mps", "auto", training=True)
    assert (p.weights, p.autocast) == (torch.bfloat16, torch.bfloat16)
    monkeypatch.setattr(devices, "probe", lambda kind=None: DeviceFacts("mps", (2, 13), macos_version=(13, 6)))
    p = pick_precision("mps", "auto", training=True)
    assert (p.weights, p.autocast) == (torch.float16, torch.float16)  # no bf16 before macOS 14


def test_modules_to_save_are_counted():
    plain = estimate_training(_cfg("model.device=cuda"), QWEN3_8B, facts=GPU)
    saved = estimate_training(_cfg("model.device=cuda", "lora.modules_to_save=[embed_tokens,lm_head]"), QWEN3_8B,
                              facts=GPU)
    arch = saved.arch
    extra = saved.estimate.items["modules_to_save copies + grads + AdamW"]
    assert extra * 2**20 == 2 * arch.vocab * arch.hidden * 4 * 2  # two vocab x hidden copies, bf16, grad + 2 moments
    assert saved.estimate.total_mb > plain.estimate.total_mb + extra  # and their allocator slack
