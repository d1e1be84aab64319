"""Multi-process training rides on torchrun/accelerate and the Trainer's DDP/FSDP/DeepSpeed
support; nekotune only keeps the ranks agreeing on one run directory."""

from __future__ import annotations

import os
import subprocess
import sys


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def agree_on(value: str) -> str:
    """Every rank takes rank 0's value (e.g. a timestamped run name)."""
    if world_size() <= 1:
        return value
    import torch.distributed as dist
    from accelerate import PartialState

    PartialState()  # initialises the process group the Trainer will use
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def launch_torchrun(nproc: int, rest: list[str]) -> int:
    """`nekotune train --nproc N ...` is shorthand for `torchrun --nproc_per_node N -m nekotune train ...`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "nekotune", "train", *rest]
    print("running:", " ".join(cmd), flush=True)
    return subprocess.call(cmd)
