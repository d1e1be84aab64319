"""Issue #7: the same CPU fine-tuning job with nekotune and with what its users would otherwise run.

The job: SmolLM2-135M-Instruct (nekotune's embedded model, as its cached HF directory), LoRA r=16,
alpha 32 on q,k,v,o,gate,up,down, lr 2e-4 cosine, batch 4, 2 epochs, the first 64 rows of
../shared/data/NekoQA-10K/nekoqa_smoke_200.json, max length 512. Held-out eval: rows 150-199.

Rows (each its own process, one after another; peers' venvs are set up on first use and cached):
  a       nekotune with its defaults (it chooses precision, packing and loss)
  b       the seeds' recipe: Trainer + peft + DataCollatorForSeq2Seq, fp32 (jobs/seeds.py)
  c       TRL SFTTrainer, fp32: use_cpu=True, bf16=False, defaults otherwise (jobs/trl_sft.py)
  d       Unsloth, fp32, in bench/.venvs/unsloth (jobs/unsloth_job.py)
  e       LLaMA-Factory 0.9.5, fp32, in bench/.venvs/llamafactory (jobs/llamafactory_job.py)
  d-bf16  Unsloth's fastest setting on this CPU: bf16 autocast, no gradient checkpointing
  c-bf16, e-bf16   TRL and LLaMA-Factory with bf16 autocast (TRL's own CPU default); not in the
          default set, which must finish in 40 minutes: add them with --only

Per row: trained tokens per second (the job's sequence tokens, counted once from the tokenized
dataset, over the tool's own training time), whole-process wall time and peak RSS (measured from
outside: psutil polling of the process tree plus the kernel's ru_maxrss), the tool's final train
loss, the eval loss of its saved adapter (one evaluation script for every row, nekotune's masked
loss on assistant tokens), ratios to row b, and model FLOPs utilisation against the faster of the
fp32/bf16 2048x2048 matmul throughputs measured (2 threads) in the same run.

    .venv/bin/python bench/train_bench.py [--only a,b,c] [--rows 64] [--epochs 2] [--skip-install]

Writes bench/results/<date>-train.json (…-train-smoke.json when --rows/--epochs shrink the job),
per-row logs bench/results/<date>-<row>.log, and the table between the markers in bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
JOBS = HERE / "jobs"
RESULTS = HERE / "results"
README = HERE / "README.md"
VENVS = HERE / ".venvs"
DATA = ROOT.parent / "shared" / "data" / "NekoQA-10K" / "nekoqa_smoke_200.json"
EVAL_ROWS = (150, 200)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TORCH_PIN = "torch==2.13.0"  # the CPU wheel the main venv uses; every peer venv keeps it
JOB_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "WANDB_DISABLED": "true",
           "DO_NOT_TRACK": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
MARK_BEGIN, MARK_END = "<!-- train -->", "<!-- /train -->"


@dataclass(frozen=True)
class Row:
    tool: str
    script: str | None = None  # jobs/<script>; None: nekotune's own CLI
    venv: str | None = None  # bench/.venvs/<venv>; None: the main venv
    precision: str = "fp32"  # what the harness asks the peer for


ROWS = {
    "a": Row("nekotune (defaults)", precision="auto"),
    "b": Row("seeds' recipe (Trainer + peft + Seq2Seq collator)", "seeds.py"),
    "c": Row("TRL SFTTrainer", "trl_sft.py"),
    "d": Row("Unsloth", "unsloth_job.py", "unsloth"),
    "e": Row("LLaMA-Factory", "llamafactory_job.py", "llamafactory"),
    "c-bf16": Row("TRL SFTTrainer", "trl_sft.py", None, "bf16"),
    "d-bf16": Row("Unsloth", "unsloth_job.py", "unsloth", "bf16"),
    "e-bf16": Row("LLaMA-Factory", "llamafactory_job.py", "llamafactory", "bf16"),
}
BASELINE = "b"
DEFAULT_ROWS = ["a", "b", "c", "d", "d-bf16", "e"]


# -- measuring a process ---------------------------------------------------------------------------
def run_measured(cmd: list[str], log_path: Path, cwd: Path, env: dict, timeout: float) -> dict:
    """Run cmd to completion; wall time, peak RSS (max of the polled process-tree sum and the
    kernel's ru_maxrss of the child), exit status. Output goes to log_path."""
    import psutil

    start = time.time()
    peak_tree = 0
    timed_out = False
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        ps = psutil.Process(proc.pid)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            try:
                rss = ps.memory_info().rss
                for child in ps.children(recursive=True):
                    try:
                        rss += child.memory_info().rss
                    except psutil.Error:
                        pass
                peak_tree = max(peak_tree, rss)
            except psutil.Error:
                pass
            if not timed_out and time.time() - start > timeout:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
            time.sleep(0.1)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.time() - start
    peak = max(peak_tree, usage.ru_maxrss * 1024)
    return {"rc": proc.returncode, "timed_out": timed_out, "wall_seconds": round(wall, 1),
            "peak_rss_mb": round(peak / 2**20), "peak_rss_polled_mb": round(peak_tree / 2**20),
            "ru_maxrss_mb": round(usage.ru_maxrss / 1024)}


def first_error_line(text: str) -> str:
    """The first line of the last exception in a log (or pip's first ERROR line)."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    if starts:
        for line in lines[starts[-1] + 1:]:
            if line and not line[0].isspace() and not line.startswith(("Traceback", "During handling")):
                return line.strip()[:300]
    for line in lines:
        if line.startswith("ERROR:"):
            return line.strip()[:300]
    tail = [line.strip() for line in lines if line.strip()]
    return (tail[-1] if tail else "no output")[:300]


# -- matmul peak -----------------------------------------------------------------------------------
def matmul_gflops(dtype_name: str, n: int = 2048, threads: int = 2, seconds: float = 3.0) -> float:
    import torch

    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    for _ in range(2):
        a @ b
    count, start = 0, time.perf_counter()
    while count < 3 or time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e9


# -- the job ---------------------------------------------------------------------------------------
def prepare_job(tmp: Path, rows: int, epochs: float) -> dict:
    from nekotune.model import embedded_gguf, gguf_to_hf_dir

    data = json.loads(DATA.read_text(encoding="utf-8"))
    if len(data) < EVAL_ROWS[1] or rows > EVAL_ROWS[0]:
        raise SystemExit(f"{DATA} has {len(data)} rows; the job needs rows 0-{rows - 1} for training and "
                         f"{EVAL_ROWS[0]}-{EVAL_ROWS[1] - 1} for eval")
    train_file, eval_file = tmp / "train.json", tmp / "eval.json"
    train_file.write_text(json.dumps(data[:rows], ensure_ascii=False), encoding="utf-8")
    eval_file.write_text(json.dumps(data[EVAL_ROWS[0]:EVAL_ROWS[1]], ensure_ascii=False), encoding="utf-8")
    return {"model": str(gguf_to_hf_dir(embedded_gguf())), "data": str(DATA), "train_file": str(train_file),
            "eval_file": str(eval_file), "rows": rows, "eval_rows": list(EVAL_ROWS), "epochs": epochs, "batch": 4,
            "lr": 2e-4, "scheduler": "cosine", "r": 16, "alpha": 32, "max_len": 512, "targets": TARGETS}


def count_tokens(job: dict) -> dict:
    """The job's sequence tokens, counted once for every row: each training row rendered by the
    model's chat template (tokenizer.apply_chat_template, which adds SmolLM2's default system
    prompt), tokenized and cut at max_len; no padding. Also the causal attention pairs."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(job["model"])
    lengths = []
    for r in json.loads(Path(job["train_file"]).read_text(encoding="utf-8")):
        conv = [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]
        text = tok.apply_chat_template(conv, tokenize=False)
        lengths.append(min(len(tok(text)["input_ids"]), job["max_len"]))
    per_epoch = sum(lengths)
    return {"per_epoch": per_epoch, "total": round(per_epoch * job["epochs"]), "longest": max(lengths),
            "attention_pairs_per_epoch": sum(n * (n + 1) // 2 for n in lengths)}


FLOPS_FORMULA = ("per token: 4*N_base + 6*N_lora + 4*V*H, plus 12*L*h*d_head*c per token for attention, where "
                 "N_base = frozen projection weights (q,k,v,o,gate,up,down) of all layers, N_lora = LoRA A and B "
                 "weights, V*H = the tied, frozen vocabulary projection, c = keys a token attends to (causal: "
                 "position+1, averaged over the job's real sequences), h = query heads. Frozen weights: forward "
                 "2N + input gradients 2N, no weight gradients; LoRA: forward 2N + input gradients 2N + weight "
                 "gradients 2N; attention: QK^T and AV forward (4*h*d_head*c) and their gradients for both "
                 "inputs (2x forward). Norms, activations, rotary, softmax, optimizer and recomputation not "
                 "counted; the vocabulary projection is counted at every position, as a plain causal LM does")


def model_flops(job: dict, tokens: dict) -> dict:
    from nekotune.memory import Arch, lora_params

    arch = Arch.from_config(json.loads((Path(job["model"]) / "config.json").read_text()))
    n_base = arch.layers * arch.layer_linear_params
    n_lora = lora_params(arch, job["r"], tuple(TARGETS))
    head = arch.vocab * arch.hidden
    dense = 4 * n_base + 6 * n_lora + 4 * head
    attn_per_pair = 12 * arch.layers * arch.heads * arch.head_dim
    per_epoch = dense * tokens["per_epoch"] + attn_per_pair * tokens["attention_pairs_per_epoch"]
    return {"per_token": per_epoch / tokens["per_epoch"], "dense_per_token": dense,
            "attention_per_token": attn_per_pair * tokens["attention_pairs_per_epoch"] / tokens["per_epoch"],
            "mean_context": tokens["attention_pairs_per_epoch"] / tokens["per_epoch"],
            "N_base": n_base, "N_lora": n_lora, "V*H": head, "layers": arch.layers, "heads": arch.heads,
            "head_dim": arch.head_dim, "formula": FLOPS_FORMULA}


# -- installing the peers --------------------------------------------------------------------------
def pip_log(cmd: list[str], log, timeout: float = 3600) -> int:
    log.write("$ " + " ".join(cmd) + "\n")
    log.flush()
    return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout).returncode


def torch_version(python: str) -> str:
    r = subprocess.run([python, "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else f"torch does not import ({first_error_line(r.stderr)})"


def ensure_trl(stamp: str) -> dict:
    """Rows c/c-bf16 run in the main venv; install trl there if missing, keeping its torch."""
    if subprocess.run([sys.executable, "-c", "import trl"], capture_output=True).returncode == 0:
        return {"cached": True, "install_seconds": 0.0}
    before = torch_version(sys.executable)
    start = time.time()
    log_path = RESULTS / f"{stamp}-install-trl.log"
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as c, open(log_path, "w") as log:
        c.write(f"torch=={before}\n")
        c.flush()
        rc = pip_log([sys.executable, "-m", "pip", "install", "--progress-bar", "off", "-c", c.name, "trl"], log)
    info = {"cached": False, "install_seconds": round(time.time() - start, 1), "log": str(log_path)}
    after = torch_version(sys.executable)
    if rc:
        info["error"] = "pip install trl failed: " + first_error_line(log_path.read_text())
    elif after != before:
        info["error"] = f"pip install trl replaced torch {before} with {after}"
    return info


TORCHAUDIO_STUB = '''"""Stub put here by bench/train_bench.py. LLaMA-Factory imports torchaudio at module level,
and PyPI's torchaudio wheels do not load beside torch 2.13.0+cpu; text-only training never calls it."""
__version__ = "0.0.0+benchstub"


def __getattr__(name):
    raise ImportError(f"torchaudio is a stub in this benchmark venv (torchaudio.{name} is not available)")
'''


def _drop_torchvision(venv: Path, python: str, log) -> str | None:
    """PyPI's torchvision wheels do not load beside torch 2.13.0+cpu ("operator torchvision::nms does
    not exist"), and Unsloth and transformers then fail at import. Text-only training never needs
    it, and both import it only when it is installed: remove it."""
    pip_log([python, "-m", "pip", "uninstall", "-y", "torchvision"], log)
    return None


UNSLOTH_CPU = "2026.10.9"  # the first release that trains on a CPU (the version in issue #7's table)


def _unsloth_cpu(venv: Path, python: str, log) -> str | None:
    """pip's resolver settles on an older Unsloth that refuses to run without a GPU: 2026.10.9 asks
    for certifi>=2026.10.19, newer than the package index here has. Put 2026.10.9 (and its zoo)
    over the resolved set without their dependencies; certifi's version changes nothing they do."""
    _drop_torchvision(venv, python, log)
    rc = pip_log([python, "-m", "pip", "install", "--progress-bar", "off", "--no-deps", f"unsloth=={UNSLOTH_CPU}",
                  f"unsloth_zoo=={UNSLOTH_CPU}", "json5>=0.9.25"], log)
    return f"pip install --no-deps unsloth=={UNSLOTH_CPU} failed" if rc else None


def _stub_torchaudio(venv: Path, python: str, log) -> str | None:
    """Remove the real torchaudio and put a stub package on the venv's sys.path (via a .pth)."""
    _drop_torchvision(venv, python, log)
    pip_log([python, "-m", "pip", "uninstall", "-y", "torchaudio"], log)
    stubs = venv / "stubs"
    (stubs / "torchaudio").mkdir(parents=True, exist_ok=True)
    (stubs / "torchaudio" / "__init__.py").write_text(TORCHAUDIO_STUB)
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True).stdout.strip()
    Path(site, "zz_bench_stubs.pth").write_text(str(stubs) + "\n")
    return None


VENV_SPECS = {
    # name: (pip requirements, import that must work afterwards, extra step)
    "unsloth": (["unsloth"], "import unsloth", _unsloth_cpu),
    "llamafactory": (["llamafactory==0.9.5"], "import llamafactory.train.tuner", _stub_torchaudio),
}


def ensure_venv(name: str, skip_install: bool, stamp: str) -> dict:
    """bench/.venvs/<name> with the CPU torch pinned. Cached: a venv with its .ok marker is reused
    as it is. Returns {"python", "cached", "install_seconds", ...} or {"error": ...}."""
    venv = VENVS / name
    python = str(venv / "bin" / "python")
    marker = venv / ".ok"
    if marker.is_file():
        saved = json.loads(marker.read_text())
        return {"python": python, "cached": True, "install_seconds": 0.0,
                "first_install_seconds": saved.get("install_seconds"), "versions": saved.get("versions", {})}
    if skip_install:
        return {"error": f"bench/.venvs/{name} is not set up (run once without --skip-install)"}
    packages, check, extra = VENV_SPECS[name]
    if venv.exists():
        shutil.rmtree(venv)  # a half-made venv from an interrupted or failed install
    VENVS.mkdir(parents=True, exist_ok=True)
    log_path = RESULTS / f"{stamp}-install-{name}.log"
    start = time.time()
    print(f"   setting up bench/.venvs/{name} (log {log_path.relative_to(ROOT)})", flush=True)
    with open(log_path, "w", encoding="utf-8") as log:
        error = None
        base = getattr(sys, "_base_executable", sys.executable)
        pip = [python, "-m", "pip", "install", "--progress-bar", "off"]
        constraints = venv / "constraints.txt"
        steps = [[base, "-m", "venv", str(venv)], pip + [TORCH_PIN], pip + ["-c", str(constraints), *packages]]
        for i, cmd in enumerate(steps):
            if i == 2:
                constraints.write_text(TORCH_PIN + "\n")
            if pip_log(cmd, log):
                log.flush()
                error = f"install failed ({' '.join(cmd[3:] if i else cmd[1:])}): " + \
                    first_error_line(log_path.read_text())
                break
        if error is None and extra is not None:
            error = extra(venv, python, log)
        if error is None:
            tv = torch_version(python)
            if tv != TORCH_PIN.split("==")[1] + "+cpu":
                error = f"the install changed torch: {tv}"
        if error is None:
            r = subprocess.run([python, "-c", check], capture_output=True, text=True, cwd=tempfile.gettempdir(),
                               env={**os.environ, **JOB_ENV})
            log.write(f"$ python -c {check!r}\n{r.stdout}{r.stderr}")
            if r.returncode:
                error = f"`{check}` fails after install: " + first_error_line(r.stderr)
    seconds = round(time.time() - start, 1)
    if error:
        return {"error": error, "install_seconds": seconds, "log": str(log_path)}
    versions = pip_versions(python)
    marker.write_text(json.dumps({"install_seconds": seconds, "date": datetime.now().isoformat(timespec="seconds"),
                                  "versions": versions}, indent=1))
    return {"python": python, "cached": False, "install_seconds": seconds, "versions": versions,
            "log": str(log_path)}


def pip_versions(python: str) -> dict:
    code = ("from importlib.metadata import version, PackageNotFoundError\nimport json\nout = {}\n"
            "for n in ['torch','transformers','peft','trl','accelerate','datasets','unsloth','unsloth_zoo',"
            "'llamafactory','xformers','bitsandbytes','triton','torchaudio']:\n"
            "    try: out[n] = version(n)\n    except PackageNotFoundError: pass\nprint(json.dumps(out))")
    r = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return json.loads(r.stdout) if r.returncode == 0 else {}


# -- running the rows ------------------------------------------------------------------------------
def nekotune_cmd(job: dict, out: Path) -> list[str]:
    """Only the job's settings; precision, packing, loss, checkpointing: nekotune's defaults."""
    return [sys.executable, "-m", "nekotune", "train", "--no-progress",
            f"model.name_or_path={job['model']}", f"data.path={job['train_file']}", f"output.dir={out}",
            f"lora.r={job['r']}", f"lora.alpha={job['alpha']}", f"lora.target_modules=[{','.join(TARGETS)}]",
            f"train.lr={job['lr']}", f"train.scheduler={job['scheduler']}", f"train.batch_size={job['batch']}",
            f"train.epochs={job['epochs']}", f"data.max_seq_len={job['max_len']}"]


def last_epoch_mean(losses: list[list[float]], steps: int | None, epochs: float) -> float | None:
    """Mean of the losses logged during the last epoch (each tool's own loss definition)."""
    if not losses:
        return None
    steps = steps or int(losses[-1][0])
    first = steps - steps / max(epochs, 1) if epochs >= 1 else 0
    tail = [loss for step, loss in losses if step > first] or [losses[-1][1]]
    return sum(tail) / len(tail)


def run_row(key: str, job: dict, tmp: Path, stamp: str, opts) -> dict:
    spec = ROWS[key]
    row = {"row": key, "tool": spec.tool, "requested_precision": spec.precision}
    python = sys.executable
    setup = None
    if spec.venv:
        setup = ensure_venv(spec.venv, opts.skip_install, stamp)
        python = setup.get("python", "")
    elif spec.script == "trl_sft.py":
        setup = ensure_trl(stamp)
    if setup is not None:
        row["setup"] = {k: v for k, v in setup.items() if k != "python"}
        if "error" in setup:
            row["not_run"] = setup["error"]
            return row
    out = tmp / key
    out.mkdir(parents=True, exist_ok=True)
    log_path = RESULTS / f"{stamp}-{key}.log"
    env = {**os.environ, **JOB_ENV}
    if spec.script is None:
        cmd = nekotune_cmd(job, out)
    else:
        spec_file = out / "job.json"
        spec_file.write_text(json.dumps({**job, "out": str(out), "precision": spec.precision}))
        env["PYTHONPATH"] = str(JOBS)
        cmd = [python, str(JOBS / spec.script), str(spec_file)]
    m = run_measured(cmd, log_path, cwd=out, env=env, timeout=opts.timeout)
    row.update(m)
    row["log"] = str(log_path.relative_to(ROOT))
    log_text = log_path.read_text(encoding="utf-8", errors="replace")
    if m["rc"] != 0:
        row["not_run"] = ("timed out after %d s" % opts.timeout if m["timed_out"] else
                          f"run failed (exit {m['rc']}): {first_error_line(log_text)}")
        return row
    if spec.script is None:
        info = json.loads((out / "run.json").read_text())
        row.update(train_seconds=info["train_seconds"], steps=info["steps"],
                   losses=[list(x) for x in info["train_losses"]], precision=info["precision"],
                   packing=info["packing"], gradient_checkpointing=info["gradient_checkpointing"],
                   loss_on="assistant tokens (chunked, trained positions only)",
                   tool_tokens_seen=info["tokens_seen"], tool_tokens_per_second=info["tokens_per_second"],
                   versions=info.get("versions", {}))
        adapter = out / "adapter"
    else:
        metrics = json.loads((out / "job_metrics.json").read_text())
        row.update({k: v for k, v in metrics.items() if k != "train_seconds"})
        row["train_seconds"] = round(metrics["train_seconds"], 2) if metrics.get("train_seconds") else None
        adapter = out / "adapter"
    row["final_loss"] = row["losses"][-1][1] if row.get("losses") else None
    row["last_epoch_loss"] = last_epoch_mean(row.get("losses", []), row.get("steps"), job["epochs"])
    ev = evaluate(job, adapter, tmp, key)
    row.update(ev)
    return row


def evaluate(job: dict, adapter: Path | None, tmp: Path, key: str) -> dict:
    """Eval loss with jobs/eval_adapter.py in the main venv (not part of the row's measurements)."""
    spec_file = tmp / "eval_job.json"
    spec_file.write_text(json.dumps(job))
    start = time.time()
    r = subprocess.run([sys.executable, str(JOBS / "eval_adapter.py"), str(spec_file),
                        str(adapter) if adapter else "--base"], capture_output=True, text=True,
                       env={**os.environ, **JOB_ENV}, cwd=tmp)
    match = re.search(r"^EVAL (\{.*\})$", r.stdout, re.M)
    if not match:
        return {"eval_loss": None, "eval_error": first_error_line(r.stderr + r.stdout)}
    res = json.loads(match.group(1))
    return {"eval_loss": res["eval_loss"], "eval_tokens": res["tokens"], "eval_seconds": round(time.time() - start, 1)}


def machine() -> dict:
    flags = ""
    model = platform.processor()
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
        model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), model)
    except OSError:
        pass
    return {"cpu": model, "cpus": os.cpu_count(), "avx512_bf16": "avx512_bf16" in flags,
            "amx_bf16": "amx_bf16" in flags, "python": platform.python_version()}


# -- main ------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(DEFAULT_ROWS),
                    help=f"comma-separated rows out of {','.join(ROWS)} (default {','.join(DEFAULT_ROWS)})")
    ap.add_argument("--rows", type=int, default=64, help="training rows (the job: 64)")
    ap.add_argument("--epochs", type=float, default=2, help="epochs (the job: 2)")
    ap.add_argument("--skip-install", action="store_true", help="never create peer venvs; rows without one say so")
    ap.add_argument("--timeout", type=float, default=7200, help="seconds per row before it is killed")
    ap.add_argument("--no-readme", action="store_true", help="do not write the table into bench/README.md")
    opts = ap.parse_args()
    keys = [k.strip() for k in opts.only.split(",") if k.strip()]
    unknown = [k for k in keys if k not in ROWS]
    if unknown:
        ap.error(f"unknown row(s) {','.join(unknown)}; choose from {','.join(ROWS)}")
    smoke = opts.rows != 64 or opts.epochs != 2
    now = datetime.now()
    stamp = now.strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(exist_ok=True)
    summary = {"date": now.isoformat(timespec="seconds"), "smoke": smoke, "machine": machine(),
               "load_average_start": os.getloadavg(), "rows": []}

    if not DATA.is_file():
        print(f"{DATA} not found: nothing to benchmark", flush=True)
        summary["rows"] = [{"row": k, "tool": ROWS[k].tool, "not_run": f"data file {DATA} is absent"} for k in keys]
        return finish(summary, stamp, smoke, opts)

    print("matmul 2048x2048, 2 threads ...", flush=True)
    summary["matmul_gflops_start"] = {d: round(matmul_gflops(d), 1) for d in ("float32", "bfloat16")}
    print(f"   {summary['matmul_gflops_start']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="nekotune-train-bench-") as tmp_name:
        tmp = Path(tmp_name)
        job = prepare_job(tmp, opts.rows, opts.epochs)
        tokens = count_tokens(job)
        flops = model_flops(job, tokens)
        summary.update(job={k: v for k, v in job.items() if k not in ("train_file", "eval_file")},
                       sequence_tokens=tokens, flops=flops)
        print(f"job: {opts.rows} rows x {opts.epochs} epochs = {tokens['total']:,} sequence tokens; "
              f"{flops['per_token'] / 1e6:.0f} MFLOP per token", flush=True)
        base = evaluate(job, None, tmp, "base")
        summary["base_model_eval_loss"] = base.get("eval_loss")
        print(f"untrained model eval loss: {base.get('eval_loss')}", flush=True)
        for key in keys:
            spec = ROWS[key]
            print(f"== {key}: {spec.tool} ({spec.precision})", flush=True)
            row = run_row(key, job, tmp, stamp, opts)
            if "not_run" not in row and row.get("train_seconds"):
                row["tokens_per_second"] = round(tokens["total"] / row["train_seconds"], 1)
            summary["rows"].append(row)
            shown = {k: v for k, v in row.items() if k not in ("losses", "versions", "log", "setup")}
            print("   " + json.dumps(shown), flush=True)
    summary["matmul_gflops_end"] = {d: round(matmul_gflops(d), 1) for d in ("float32", "bfloat16")}
    summary["load_average_end"] = os.getloadavg()
    return finish(summary, stamp, smoke, opts)


def finish(summary: dict, stamp: str, smoke: bool, opts) -> int:
    peaks = [v for k in ("matmul_gflops_start", "matmul_gflops_end") for v in summary.get(k, {}).values()]
    peak = max(peaks) if peaks else None
    summary["peak_gflops"] = peak
    flops = summary.get("flops")
    ran = {r["row"]: r for r in summary["rows"] if "not_run" not in r and r.get("tokens_per_second")}
    base = ran.get(BASELINE)
    for r in ran.values():
        if flops and peak:
            r["model_gflops"] = round(flops["per_token"] * r["tokens_per_second"] / 1e9, 2)
            r["mfu"] = round(r["model_gflops"] / peak, 4)
        if base:
            r["tokens_per_second_vs_b"] = round(r["tokens_per_second"] / base["tokens_per_second"], 2)
            r["wall_vs_b"] = round(r["wall_seconds"] / base["wall_seconds"], 2)
            r["peak_rss_vs_b"] = round(r["peak_rss_mb"] / base["peak_rss_mb"], 2)
    summary["nekotune_mfu"] = ran["a"].get("mfu") if "a" in ran else None
    out = RESULTS / f"{stamp}-train{'-smoke' if smoke else ''}.json"
    out.write_text(json.dumps(summary, indent=1, ensure_ascii=False))
    table = markdown(summary)
    print("\n" + table + "\n", flush=True)
    if not opts.no_readme:
        write_readme(table)
    print(f"written {out.relative_to(ROOT)}" + ("" if opts.no_readme else " and the table in bench/README.md"))
    return 0


def fmt(v, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def markdown(s: dict) -> str:
    j, m = s.get("job", {}), s.get("machine", {})
    head = []
    if s.get("smoke"):
        head.append(f"**Smoke run ({j.get('rows')} rows, {j.get('epochs')} epoch(s)): not the issue's job; "
                    f"rerun `make bench` for real numbers.**\n")
    head.append(f"Run {s['date']} on {m.get('cpu')} ({m.get('cpus')} CPUs, AVX512-BF16: "
                f"{'yes' if m.get('avx512_bf16') else 'no'}); load average at start "
                f"{', '.join(f'{x:.2f}' for x in s.get('load_average_start', []))}.")
    if "matmul_gflops_start" in s:
        ms, me = s["matmul_gflops_start"], s.get("matmul_gflops_end", {})
        head.append(f"Matmul 2048x2048, 2 threads, GFLOP/s (start / end): fp32 {ms['float32']} / "
                    f"{me.get('float32', '-')}, bf16 {ms['bfloat16']} / {me.get('bfloat16', '-')}; "
                    f"MFU is against {s['peak_gflops']}.")
    if "sequence_tokens" in s:
        t, f = s["sequence_tokens"], s["flops"]
        head.append(f"{t['total']:,} sequence tokens ({t['per_epoch']:,} per epoch, longest {t['longest']}); "
                    f"{f['per_token'] / 1e6:.0f} MFLOP per token (formula below); untrained model eval loss "
                    f"{fmt(s.get('base_model_eval_loss'), 3)}; **nekotune MFU {fmt(s.get('nekotune_mfu'), 3)}**.")
    lines = [" ".join(head), "",
             "| row | tool | precision | tokens/s | train s | wall s | peak RSS MB | final train loss | eval loss "
             "| tok/s ×b | wall ×b | RSS ×b | MFU | setup s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    notes = []
    for r in s["rows"]:
        setup = r.get("setup", {})
        setup_s = ("cached" if setup.get("cached") else fmt(setup.get("install_seconds"), 0)) if setup else ""
        if "not_run" in r:
            lines.append(f"| {r['row']} | {r['tool']} | {r.get('requested_precision', '')} | not run: "
                         f"{r['not_run'].replace('|', '/')} | | | | | | | | | | {setup_s} |")
            continue
        lines.append(f"| {r['row']} | {r['tool']} | {r.get('precision', '-')} | {fmt(r.get('tokens_per_second'), 1)} | "
                     f"{fmt(r.get('train_seconds'), 1)} | {fmt(r.get('wall_seconds'), 1)} | "
                     f"{fmt(r.get('peak_rss_mb'))} | "
                     f"{fmt(r.get('final_loss'), 3)} | {fmt(r.get('eval_loss'), 3)} | "
                     f"{fmt(r.get('tokens_per_second_vs_b'))} | {fmt(r.get('wall_vs_b'))} | "
                     f"{fmt(r.get('peak_rss_vs_b'))} | {fmt(r.get('mfu'), 3)} | {setup_s} |")
        if r.get("eval_error"):
            notes.append(f"- {r['row']}: eval failed: {r['eval_error']}")
    notes.append("- ×b: the row's figure divided by row b's (tokens/s: higher is better; wall time and peak RSS: "
                 "lower is better, so 0.50 means half of b's).")
    if "flops" in s:
        notes.append(f"- FLOPs {s['flops']['formula']}.")
    return "\n".join(lines + ([""] + notes if notes else []))


def write_readme(table: str) -> None:
    sys.path.insert(0, str(HERE / "jobs"))
    from common import replace_readme_block

    replace_readme_block(README, MARK_BEGIN, MARK_END, table)


if __name__ == "__main__":
    raise SystemExit(main())
