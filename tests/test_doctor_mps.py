"""`nekotune doctor` on a faked Apple-silicon Mac (issue 15): MPS, unified memory, the precision
`train` picks there, and no QLoRA advice."""

from __future__ import annotations

import json

from nekotune.cli import main
from nekotune.devices import DeviceFacts


def _fake_mac(monkeypatch, macos=(14, 5), torch_version=(2, 13)):
    import torch

    import nekotune.devices as devices

    facts = DeviceFacts("mps", torch_version, macos_version=macos, chip="Apple M2 Pro",
                        total_memory_mb=16 * 1024, recommended_max_mb=10.7 * 1024)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "probe", lambda kind=None: facts)


def test_doctor_reports_mps_and_the_unified_pool(monkeypatch, capsys):
    _fake_mac(monkeypatch)
    assert main(["doctor", "--json"]) == 0
    gpu = json.loads(capsys.readouterr().out)["apple_gpu"]
    # the pool is 16 GB; a training may use Metal's 10.7 GB working set (less than 16 - 3 GB)
    assert gpu["unified_memory_gb"] == 16.0 and gpu["training_budget_gb"] == 10.7
    assert gpu["chip"] == "Apple M2 Pro" and gpu["macos"] == "14.5"
    assert gpu["training_precision"].startswith("bf16")
    assert main(["doctor"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "MPS: yes" in out and "unified memory shared with macOS" in out and "about 10.7 GB" in out
    assert "QLoRA (bitsandbytes 4-bit) needs CUDA" in out
    assert out.split("training precision here: ")[1].startswith("bf16")
    assert "no GPU: training runs on the CPU" not in out


def test_doctor_on_an_older_mac_says_fp16(monkeypatch, capsys):
    _fake_mac(monkeypatch, macos=(13, 6))  # bf16 on MPS needs macOS 14
    assert main(["doctor", "--json"]) == 0
    gpu = json.loads(capsys.readouterr().out)["apple_gpu"]
    assert gpu["training_precision"].startswith("fp16")
