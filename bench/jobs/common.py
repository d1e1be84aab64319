"""Shared by the peer jobs (run in the main venv or in bench/.venvs/*): the job's settings, read
from the JSON the harness writes, the rows as conversations, and one Trainer callback that times
training and records the per-step losses the same way for every peer.

Nothing here imports transformers at module level: Unsloth must be imported before it.
"""

import json
import sys
import time


def job() -> dict:
    with open(sys.argv[1], encoding="utf-8") as fh:
        return json.load(fh)


def rows(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def conversations(items: list[dict]) -> list[list[dict]]:
    """One user turn and one assistant turn per row, no system turn: the model's chat template
    adds its own default system prompt, as it does for every tool that applies the template."""
    return [[{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]
            for r in items]


def make_callback():
    """A TrainerCallback: training time from on_train_begin to on_train_end (what nekotune's
    run.json reports too) and every logged training loss with its step."""
    from transformers import TrainerCallback

    class BenchCallback(TrainerCallback):
        def __init__(self):
            self.start = self.end = None
            self.losses = []
            self.max_steps = None

        def on_train_begin(self, args, state, control, **kw):
            self.start = time.time()

        def on_train_end(self, args, state, control, **kw):
            self.end = time.time()
            self.max_steps = state.max_steps

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append([state.global_step, float(logs["loss"])])

    return BenchCallback()


def versions(*names: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def report(cfg: dict, cb, extra: dict | None = None) -> None:
    """Write job_metrics.json next to the adapter; the harness reads it."""
    import torch

    seconds = (cb.end - cb.start) if cb.start and cb.end else None
    out = {"train_seconds": seconds, "losses": cb.losses, "steps": cb.max_steps,
           "torch_threads": torch.get_num_threads(),
           "versions": versions("torch", "transformers", "peft", "trl", "accelerate", "datasets", "unsloth",
                                "unsloth_zoo", "llamafactory"),
           **(extra or {})}
    with open(f"{cfg['out']}/job_metrics.json", "w", encoding="utf-8") as fh:
        json.dump(out, fh, indent=1)


def replace_readme_block(readme, begin: str, end: str, text: str) -> None:
    """Put `text` between the markers `begin` and `end` in `readme` (a Path), or append the
    marked block when the markers are not there yet; the rest of the file is kept."""
    import re

    old = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    block = f"{begin}\n{text}\n{end}"
    if begin in old and end in old:
        new = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, old, flags=re.S)
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    readme.write_text(new, encoding="utf-8")
