"""Shared by the peer jobs: the job's data and settings, read from the JSON the harness writes."""

import json
import sys
import time


def job() -> dict:
    return json.loads(open(sys.argv[1]).read())


def conversations(rows):
    return [[{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}] for r in rows]


def report(out_dir: str, train_seconds: float, losses: list[float]) -> None:
    with open(f"{out_dir}/job_metrics.json", "w") as fh:
        json.dump({"train_seconds": train_seconds, "losses": losses}, fh)


class Timer:
    def __enter__(self):
        self.start = time.time()
        return self

    def __exit__(self, *a):
        self.seconds = time.time() - self.start
