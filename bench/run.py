"""`make bench`: every benchmark, one after another, each printing a table and writing JSON
to bench/results/. Run on a quiet machine: numbers are ratios measured side by side in one run."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = [
    ("training speed and memory vs peers (issue #7)", "train_bench.py"),
    ("memory estimate vs measured peak (issue #6)", "estimate_memory.py"),
    ("low-memory merge peak RSS vs bound (issue #4)", "merge_memory.py"),
    ("per-example attention variants, bf16 on CPU (issue #7)", "attention.py"),
    ("pure-Python Q4_K_M vs llama.cpp's quantizer, Qwen3-1.7B shapes (issue #20)", "kquant_speed.py"),
    ("K-quant quality on the latest run vs llama.cpp's quantizer (issue #20)", "kquant_quality.py"),
    ("DPO on persona pairs, held-out reward accuracy on SmolLM2 (issue #18)", "preference.py"),
    ("inference engines: transformers, llama.cpp, llama_cpp.server (issue #19)", "inference.py"),
]


def main(argv: list[str]) -> int:
    only = set(argv)
    failed = []
    for title, script in BENCHES:
        if only and script.removesuffix(".py") not in only:
            continue
        path = HERE / script
        if not path.is_file():
            print(f"== {title}: {script} missing, skipped", flush=True)
            continue
        print(f"\n== {title} ({script})", flush=True)
        start = time.time()
        rc = subprocess.call([sys.executable, str(path)])
        print(f"== {script}: exit {rc} after {time.time() - start:.0f} s", flush=True)
        if rc:
            failed.append(script)
    if failed:
        print("failed:", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
