"""Multi-process training on CPU with gloo: torchrun and accelerate launch, equivalence with accumulation."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]


def _args(model, data, out, **extra):
    return tiny_overrides(model, data, out, **{"train.max_steps": 6, "train.batch_size": 2, "train.lr": 5e-3,
                                               "train.save_steps": 3, **extra})


def _run(cmd, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _result(run: Path):
    info = json.loads((run / "run.json").read_text())
    return info, load_file(run / "adapter" / "adapter_model.safetensors")


def test_two_processes_equal_one_process_with_accumulation(tiny_llama, qa_file, tmp_path):
    py = sys.executable
    _run([py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "nekotune", "train",
          "--no-progress", *_args(tiny_llama, qa_file, tmp_path / "ddp")])
    _run([py, "-m", "nekotune", "train", "--no-progress",
          *_args(tiny_llama, qa_file, tmp_path / "single", **{"train.grad_accum": 2})])
    ddp, ddp_w = _result(tmp_path / "ddp")
    one, one_w = _result(tmp_path / "single")
    assert [s for s, _ in ddp["train_losses"]] == list(range(1, 7))
    for (_, a), (_, b) in zip(ddp["train_losses"], one["train_losses"]):
        assert abs(a - b) < 1e-4
    for key in one_w:
        assert torch.allclose(ddp_w[key], one_w[key], atol=1e-5), key
    # one set of outputs: a single run directory, rank 0's checkpoints only, locked by rank 0 alone
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == [
        ".lock", "adapter", "checkpoints", "config.yaml", "loss.png", "run.json"]
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir()) == ["checkpoint-3", "checkpoint-6"]


def test_accelerate_launch_and_nproc_shorthand(tiny_llama, qa_file, tmp_path):
    accelerate = Path(sys.executable).parent / "accelerate"
    _run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "-m", "nekotune", "train", "--no-progress",
          *_args(tiny_llama, qa_file, tmp_path / "acc")])
    info, _ = _result(tmp_path / "acc")
    assert info["steps"] == 6
    # --nproc calls torchrun; without output.dir all ranks agree on one timestamped run directory
    args = [a for a in _args(tiny_llama, qa_file, tmp_path / "unused") if not a.startswith("output.dir")]
    _run([sys.executable, "-m", "nekotune", "train", "--nproc", "2", "--no-progress", *args,
          f"output.root={tmp_path / 'runs'}"])
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "adapter" / "adapter_config.json").is_file()


def test_shipped_distributed_configs_match_the_docs():
    d = ROOT / "examples" / "distributed"
    ddp = yaml.safe_load((d / "accelerate_ddp.yaml").read_text())
    assert ddp["distributed_type"] == "MULTI_GPU"
    fsdp = yaml.safe_load((d / "accelerate_fsdp.yaml").read_text())
    assert fsdp["distributed_type"] == "FSDP"
    fc = fsdp["fsdp_config"]
    assert fc["fsdp_sharding_strategy"] == "FULL_SHARD"
    assert fc["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fc["fsdp_use_orig_params"] is True  # required for LoRA (frozen + trainable in one layer)
    assert fc["fsdp_cpu_ram_efficient_loading"] is True and fc["fsdp_sync_module_states"] is True
    for stage in (2, 3):
        acc = yaml.safe_load((d / f"accelerate_deepspeed_zero{stage}.yaml").read_text())
        ds_file = ROOT / acc["deepspeed_config"]["deepspeed_config_file"]
        assert json.loads(ds_file.read_text())["zero_optimization"]["stage"] == stage
    docs = (ROOT / "docs" / "distributed.md").read_text()
    for name in ("accelerate_ddp.yaml", "accelerate_fsdp.yaml", "fsdp_use_orig_params", "TRANSFORMER_BASED_WRAP",
                 "accelerate_deepspeed_zero2.yaml", "--rdzv_endpoint"):
        assert name in docs
