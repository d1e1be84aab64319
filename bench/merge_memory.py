"""Peak memory of `nekotune merge --low-memory` on a multi-shard model, against its bound.

The bound promised by the low-memory merge: the largest shard + the adapter + a small margin,
on top of what the process holds before merging (Python, torch, transformers, peft imported).
Each merge runs in a fresh subprocess; its peak RSS (VmHWM) is reset after the imports, so the
peak is the merge's own. The default merge
is measured too, for contrast.

    .venv/bin/python bench/merge_memory.py [--shard-size 100MB] [--margin-mb 64]

Uses the embedded SmolLM2-135M (fp32, 538 MB) re-saved in shards, and the latest run's adapter
under outputs/ (a random r=16 LoRA on all projections when there is none). Prints a table and
writes bench/results/merge_memory-<time>.json. Not part of the test suite (about a minute).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
MB = 2**20


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / MB


def child(base: str, adapter: str, out: str, low_memory: bool) -> None:
    """Runs inside the subprocess: import everything, note RSS, merge, report."""
    import peft  # noqa: F401  (imported before the baseline: the bound is about the merge itself)
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from nekotune.commands.export import merge_command
    from nekotune.config import load_config

    reset_peak()  # imports peak above where they settle; only the merge's own peak counts
    baseline = rss_mb()
    started = time.perf_counter()
    merge_command(load_config(None, [], default_to_demo=False), adapter, out, low_memory=low_memory)
    print(json.dumps({"baseline_mb": baseline, "peak_mb": peak_mb(), "seconds": time.perf_counter() - started}))


def reset_peak() -> None:
    """Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sharded_base(work: Path, shard_size: str) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nekotune.model import embedded_gguf, gguf_to_hf_dir

    target = work / f"smollm2-sharded-{shard_size}"
    if (target / "model.safetensors.index.json").is_file():
        return target
    source = gguf_to_hf_dir(embedded_gguf())
    AutoModelForCausalLM.from_pretrained(source).save_pretrained(target, max_shard_size=shard_size)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    return target


def adapter_for(base: Path, work: Path) -> Path:
    """The latest run's adapter, pointed at the sharded base; or a random one of the same shape."""
    from nekotune.runs import latest_run

    target = work / "adapter"
    shutil.rmtree(target, ignore_errors=True)
    run = latest_run(ROOT / "outputs")
    if run is not None:
        shutil.copytree(run / "adapter", target)
    else:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(base)
        get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                         init_lora_weights=False)).save_pretrained(target)
    config = json.loads((target / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base)
    (target / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return target


def measure(base: Path, adapter: Path, out: Path, low_memory: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", str(base), str(adapter), str(out)] + (["--low-memory"] if low_memory
                                                                                      else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    shutil.rmtree(out, ignore_errors=True)  # half a gigabyte each; only the numbers are kept
    if proc.returncode != 0:
        raise SystemExit(f"merge failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shard-size", default="100MB")
    parser.add_argument("--margin-mb", type=float, default=64)
    parser.add_argument("--work", default=str(Path.home() / ".cache" / "nekotune" / "bench"))
    parser.add_argument("--child", nargs=3, metavar=("BASE", "ADAPTER", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--low-memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, low_memory=args.low_memory)
        return

    from rich.console import Console
    from rich.table import Table

    work = Path(args.work)
    base = sharded_base(work, args.shard_size)
    adapter = adapter_for(base, work)
    shards = sorted(base.glob("*.safetensors"))
    largest = max(p.stat().st_size for p in shards) / MB
    adapter_mb = sum(p.stat().st_size for p in adapter.glob("adapter_model.*")) / MB
    bound = largest + adapter_mb + args.margin_mb
    rows = {mode: measure(base, adapter, work / f"merged-{mode}", mode == "low-memory")
            for mode in ("low-memory", "default")}
    table = Table(title=f"merge peak memory, SmolLM2-135M fp32 in {len(shards)} shards (largest {largest:.0f} MB), "
                        f"adapter {adapter_mb:.1f} MB")
    for column in ("mode", "baseline RSS", "peak RSS", "peak - baseline", "bound", "within", "seconds"):
        table.add_column(column, justify="left" if column == "mode" else "right")
    for mode, r in rows.items():
        used = r["peak_mb"] - r["baseline_mb"]
        r.update(merge_mb=used, bound_mb=bound, within_bound=used <= bound)
        table.add_row(mode, f"{r['baseline_mb']:.0f} MB", f"{r['peak_mb']:.0f} MB", f"{used:.0f} MB",
                      f"{bound:.0f} MB", "yes" if used <= bound else "no", f"{r['seconds']:.1f}")
    Console().print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"model": "SmolLM2-135M fp32", "shards": len(shards), "largest_shard_mb": largest,
              "adapter_mb": adapter_mb, "margin_mb": args.margin_mb, "runs": rows,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path = RESULTS / f"merge_memory-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
