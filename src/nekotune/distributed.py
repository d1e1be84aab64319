"""Multi-process training rides on torchrun/accelerate and the Trainer's DDP/FSDP/DeepSpeed
support; nekotune only keeps the ranks agreeing on one run directory."""

from __future__ import annotations

import os


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
