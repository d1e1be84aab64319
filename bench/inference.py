"""Inference speed, issue 19: the transformers and llama.cpp engines, and llama.cpp's own server, in one run.

Model: SmolLM2-135M-Instruct with the demo-trained adapter (bench/.work/demo-run, trained with
`nekotune train` on first use). Everything greedy; each row is its own process.

- predict: the whole process, wall and CPU seconds measured from outside, on the 12 held-out demo
  prompts with the run's own settings (greedy, repetition penalty 1.1, at most 80 new tokens),
  GGUF cache warm. transformers is `nekotune predict --engine transformers` (generate.batch_size=1:
  single stream, and the default 8); llama.cpp is `nekotune predict --engine llama.cpp` (a cached
  merged GGUF), per GGUF type. Tokens are the
  answers re-encoded; "persona" counts answers that keep the cat-girl voice; "= tf" counts answers
  equal to transformers' batch-1 answers.
- decode: the engine alone, single stream, tokens/s from (N+1)-token minus 1-token generations.
- serve: HTTP servers with 1 client and with 8 at once (natural stops, greedy, no repetition
  penalty so all sides do the same work): `nekotune serve --engine transformers`, `nekotune serve
  --engine llama.cpp` (base GGUF + LoRA GGUF, per type) and llama_cpp.server on the same base + LoRA
  GGUF (q8_0 through bench/jobs/llama_server.py --no-repack, the AMX workaround).

The box may be shared: the load average is recorded beside every row, and tokens per CPU-second
(the process's own CPU time) is the figure another process disturbs least.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = HERE / ".work"
RUN = WORK / "demo-run"
README = HERE / "README.md"
RESULTS = HERE / "results"
SERVER_DEPS = HERE / ".venvs" / "llama-server"
SERVER_PACKAGES = ["pydantic-settings==2.16.3", "sse-starlette==3.7.0", "starlette-context==0.3.6"]
MARK_BEGIN, MARK_END = "<!-- inference -->", "<!-- /inference -->"
PERSONA = re.compile(r"nya|master|purr|meow|paw|tail|ears", re.I)
LONG_PROMPT = "Tell me a long story about a cat who learns to fly, with many details."
PY = sys.executable


def env() -> dict:
    # OMP_WAIT_POLICY: passed through as the user set it (unset: libgomp's default), as a user runs
    # nekotune; an earlier version forced PASSIVE here, which slowed every row (3x llama.cpp's)
    e = dict(os.environ, PYTHONPATH=str(ROOT / "src"), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    return e


def timed(cmd: list[str], extra_env: dict | None = None, timeout: float = 3600) -> dict:
    """Run a process; wall seconds and its CPU seconds (from the kernel's rusage of the child)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env={**env(), **(extra_env or {})}, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])}... failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "stdout": proc.stdout, "stderr": proc.stderr,
            "load_avg": [round(load, 2), round(os.getloadavg()[0], 2)]}


# -- setup -------------------------------------------------------------------------------------
def ensure_run() -> Path:
    if (RUN / "adapter" / "adapter_model.safetensors").is_file():
        return RUN
    print("training the demo adapter once (bench/.work/demo-run) ...", flush=True)
    timed([PY, "-m", "nekotune.cli", "train", "--no-progress", "--no-samples", f"output.root={WORK}",
           "output.run_name=demo-run"], timeout=4 * 3600)
    return RUN


def ensure_server_deps() -> bool:
    """llama_cpp.server's three pure-Python dependencies, beside (not in) the project venv."""
    if (SERVER_DEPS / "sse_starlette").is_dir():
        return True
    proc = subprocess.run([PY, "-m", "pip", "install", "-q", "--no-deps", "--target", str(SERVER_DEPS),
                           *SERVER_PACKAGES], capture_output=True, text=True)
    return proc.returncode == 0


def prepare(types: list[str]) -> dict:
    """Cached GGUFs for every row (built on first use), the prompts and the first-build times."""
    sys.path.insert(0, str(ROOT / "src"))
    from nekotune.config import load_config
    from nekotune.data import DEMO_HELDOUT, load_conversations
    from nekotune.data.formats import Conversation, Turn
    from nekotune.engines.gguf_files import llamacpp_files

    cfg = load_config(None, [], default_to_demo=False)
    files, build = {}, {}
    for t in types:
        for merge in (False, True):
            t0 = time.perf_counter()
            f = llamacpp_files(cfg, str(RUN), t, merge=merge)
            build[f"{t}{'-merged' if merge else ''}"] = round(time.perf_counter() - t0, 1)
            files[(t, merge)] = f
    f = files[(types[0], False)]
    convs, _ = load_conversations(str(DEMO_HELDOUT), f.cfg.data, prompts_only=True)
    chats = [c.prompt_part() for c in convs] + [Conversation(turns=[Turn("user", LONG_PROMPT)])]
    return {"files": files, "build_s": build, "renderer": f.renderer, "chats": chats,
            "tokenizer_dir": str(Path(f.renderer.tokenizer.name_or_path)), "adapter": next(iter(f.adapters))}


# -- rows ----------------------------------------------------------------------------------------
def predictions(path: Path) -> list[str]:
    return [json.loads(line)["prediction"] for line in path.read_text(encoding="utf-8").splitlines() if line]


def predict_rows(ctx: dict, threads: int, types: list[str]) -> list[dict]:
    from nekotune.data import DEMO_HELDOUT

    tok = ctx["renderer"].tokenizer
    rows, reference = [], None
    with tempfile.TemporaryDirectory() as tmp:
        predict = [PY, "-m", "nekotune.cli", "predict", str(DEMO_HELDOUT), "--model", str(RUN)]
        tf = predict + ["--engine", "transformers"]
        jobs = [("transformers", "batch 1", tf + ["--out", f"{tmp}/tf1.jsonl", "generate.batch_size=1"]),
                ("transformers", "batch 8", tf + ["--out", f"{tmp}/tf8.jsonl"])]
        for t in types:  # the real command: nekotune predict --engine llama.cpp (a cached merged GGUF)
            jobs.append(("llama.cpp", f"nekotune predict --engine llama.cpp, {t} merged",
                         predict + ["--engine", "llama.cpp", "--out", f"{tmp}/{t}.jsonl", f"generate.gguf_type={t}"]))
        for engine, what, cmd in jobs:
            res = timed(cmd, {"OMP_NUM_THREADS": str(threads)})
            out = Path(cmd[cmd.index("--out") + 1] if "--out" in cmd else cmd[4])
            preds = predictions(out)
            reference = reference or preds
            tokens = sum(len(tok(p, add_special_tokens=False)["input_ids"]) for p in preds)
            rows.append({"group": "predict", "engine": engine, "what": what, "tokens": tokens,
                         "wall_s": res["wall_s"], "cpu_s": res["cpu_s"], "tok_s": round(tokens / res["wall_s"], 2),
                         "tok_per_cpu_s": round(tokens / res["cpu_s"], 2), "load_avg": res["load_avg"],
                         "persona": f"{sum(bool(PERSONA.search(p)) for p in preds)}/{len(preds)}",
                         "equal_tf": f"{sum(a == b for a, b in zip(preds, reference, strict=True))}/{len(preds)}"})
            print(fmt(rows[-1]), flush=True)
    return rows


def decode_job(job: dict) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(job, fh)
    try:
        res = timed([PY, str(HERE / "jobs" / "decode_job.py"), fh.name])
    finally:
        os.unlink(fh.name)
    return json.loads(res["stdout"].strip().splitlines()[-1])


def decode_rows(ctx: dict, threads: int, tokens: int, reps: int, types: list[str]) -> list[dict]:
    ids = [ctx["renderer"].prompt_ids(ctx["chats"][-1])]
    common = {"kind": "decode", "prompts": ids, "tokens": tokens, "threads": threads, "reps": reps,
              "tokenizer": ctx["tokenizer_dir"], "repetition_penalty": 1.1}
    plan = [("transformers", "fp32 + LoRA (peft)", {"engine": "transformers", "run": str(RUN)})]
    for t in types:
        f, m = ctx["files"][(t, False)], ctx["files"][(t, True)]
        plan += [("llama.cpp", f"{t} base + LoRA", {"engine": "llama.cpp", "model": str(f.model),
                                                   "adapters": {k: str(v) for k, v in f.adapters.items()},
                                                   "adapter": ctx["adapter"]}),
                 ("llama.cpp", f"{t} merged", {"engine": "llama.cpp", "model": str(m.model)})]
    last = ctx["files"][(types[-1], True)]
    plan.append(("llama.cpp", f"{types[-1]} merged, OMP_WAIT_POLICY=PASSIVE",
                 {"engine": "llama.cpp", "model": str(last.model), "omp_wait_policy": "PASSIVE"}))
    rows = []
    for engine, what, job in plan:
        res = decode_job({**common, **job})
        rows.append({"group": "decode", "engine": engine, "what": what, **res})
        print(fmt(rows[-1]), flush=True)
    return rows


# -- servers ---------------------------------------------------------------------------------------
def post(url: str, body: dict, timeout: float = 600) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def wait_up(url: str, proc, timeout: float = 600) -> None:
    start = time.time()
    while time.time() - start < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"server exited ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except Exception:
            time.sleep(1)
    raise SystemExit(f"server at {url} did not come up")


def load_phase(send, bodies: list[dict], clients: int, pid: int) -> dict:
    import psutil

    proc = psutil.Process(pid)
    results: list = [None] * clients
    c0 = sum(proc.cpu_times()[:2])
    load = os.getloadavg()[0]

    def one(i):
        results[i] = send(bodies[i % len(bodies)])["usage"]["completion_tokens"]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    cpu = sum(proc.cpu_times()[:2]) - c0
    tokens = sum(results)
    return {"tok_s": round(tokens / wall, 2), "tok_per_cpu_s": round(tokens / max(cpu, 1e-9), 2), "tokens": tokens,
            "wall_s": round(wall, 2), "load_avg": [round(load, 2), round(os.getloadavg()[0], 2)], "clients": clients}


def server_rows(ctx: dict, threads: int, tokens: int, types: list[str], port: int = 18431) -> list[dict]:
    chats = ctx["chats"][:8]
    renderer = ctx["renderer"]
    rows = []
    serve = [PY, "-m", "nekotune.cli", "serve", str(RUN), "--port", str(port), "--max-concurrency", "8"]
    servers = [("nekotune serve (transformers)", serve + ["--engine", "transformers"],
                f"http://127.0.0.1:{port}/health", "chat")]
    servers += [(f"nekotune serve llama.cpp {t} base + LoRA", serve + ["--engine", "llama.cpp",
                 f"generate.gguf_type={t}"], f"http://127.0.0.1:{port}/health", "chat") for t in types]
    if ensure_server_deps():
        for t in types:
            f = ctx["files"][(t, False)]
            lora = str(next(iter(f.adapters.values())))
            servers.append((f"llama_cpp.server {t} base + LoRA",
                            [PY, str(HERE / "jobs" / "llama_server.py"), *(["--no-repack"] if t != "f16" else []),
                             "--model", str(f.model), "--lora_path", lora, "--model_alias", "neko", "--n_ctx", "2048",
                             "--n_threads", str(threads), "--n_threads_batch", str(threads), "--logits_all", "False",
                             "--interrupt_requests", "False", "--host", "127.0.0.1", "--port", str(port),
                             "--verbose", "False"], f"http://127.0.0.1:{port}/v1/models", "text"))
    else:
        print("note: could not install llama_cpp.server's dependencies; its rows are skipped", flush=True)
    for name, cmd, health, kind in servers:
        extra = {"PYTHONPATH": f"{SERVER_DEPS}:{ROOT / 'src'}", "OMP_NUM_THREADS": str(threads)}
        proc = subprocess.Popen(cmd, env={**env(), **extra}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        try:
            wait_up(health, proc)
            if kind == "chat":
                model = post(f"http://127.0.0.1:{port}/v1/chat/completions", {"model": "base", "max_tokens": 1,
                             "messages": [{"role": "user", "content": "hi"}]})["model"]
                names = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models").read())["data"]
                model = next(m["id"] for m in names if m["id"] != model)
                bodies = [{"model": model, "messages": c.messages(None), "max_tokens": tokens, "temperature": 0,
                           "repetition_penalty": 1.0} for c in chats]
                send = lambda b: post(f"http://127.0.0.1:{port}/v1/chat/completions", b)  # noqa: E731
            else:
                bodies = [{"model": "neko", "prompt": renderer.prompt_text(c), "max_tokens": tokens, "temperature": 0,
                           "repeat_penalty": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0} for c in chats]
                send = lambda b: post(f"http://127.0.0.1:{port}/v1/completions", b)  # noqa: E731
            send(bodies[0])  # warm-up
            for clients in (1, 8):
                res = load_phase(send, bodies, clients, proc.pid)
                rows.append({"group": "serve", "engine": name, "what": f"{clients} client{'s' * (clients > 1)}", **res})
                print(fmt(rows[-1]), flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    return rows


# -- report ------------------------------------------------------------------------------------
def fmt(row: dict) -> str:
    return (f"{row['group']:8} {row['engine']:40} {row['what']:32} {row['tok_s']:8.2f} tok/s "
            f"{row['tok_per_cpu_s']:8.2f} tok/CPU-s  load {row['load_avg']}")


def matmul_gflops(threads: int, n: int = 1024, seconds: float = 2.0) -> float:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    count, start = 0, time.perf_counter()
    while count < 3 or time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return round(2 * n**3 * count / (time.perf_counter() - start) / 1e9, 1)


def reference(row: dict, rows: list[dict], engine: str) -> dict | None:
    """The row `row` is compared with: same group, the given engine (prefix), same clients/batch."""
    for r in rows:
        if r["group"] == row["group"] and r["engine"].startswith(engine) and (
                row["group"] == "decode" or r["what"] == row["what"] or r["what"] == "batch 1"):
            return r
    return None


def ratio(a: dict, b: dict | None, key: str) -> str:
    return f"{a[key] / b[key]:.2f}" if b and b[key] else ""


def table(summary: dict) -> str:
    m = summary["machine"]
    head = (f"Run {summary['started']} on {m['cpu']} ({m['cpus']} CPUs); {summary['threads']} threads everywhere "
            f"(OMP_WAIT_POLICY={summary.get('omp_wait_policy') or 'unset'} unless a row says otherwise); "
            f"load average {summary['load_start'][0]:.2f} at "
            f"start, {summary['load_end'][0]:.2f} at end; fp32 matmul 1024x1024: {summary['gflops']} GFLOP/s. First "
            f"(cold) GGUF conversions, seconds: {summary['build_s']}.")
    lines = [head, "", "| group | engine | what | tok/s | tok/CPU-s | ×tf | ×tf CPU | ×llama server | wall s "
             "| persona | = tf | load avg |", "|---|---|---|---:|---:|---:|---:|---:|---:|---|---|---|"]
    rows = summary["rows"]
    for r in rows:
        tf = reference(r, rows, "nekotune serve" if r["group"] == "serve" else "transformers")
        server = None
        if r["group"] == "serve" and r["engine"].startswith("nekotune serve llama.cpp "):
            kind = r["engine"].split("llama.cpp ")[1]
            server = next((b for b in rows if b["engine"] == f"llama_cpp.server {kind}" and b["what"] == r["what"]),
                          None)
        lines.append(f"| {r['group']} | {r['engine']} | {r['what']} | {r['tok_s']:.1f} | {r['tok_per_cpu_s']:.1f} | "
                     f"{ratio(r, tf, 'tok_s')} | {ratio(r, tf, 'tok_per_cpu_s')} | {ratio(r, server, 'tok_s')} | "
                     f"{r.get('wall_s', '')} | {r.get('persona', '')} | {r.get('equal_tf', '')} | "
                     f"{r['load_avg'][0]}-{r['load_avg'][1]} |")
    return "\n".join(lines)


def write_readme(text: str) -> None:
    sys.path.insert(0, str(HERE / "jobs"))
    from common import replace_readme_block

    replace_readme_block(README, MARK_BEGIN, MARK_END, text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="predict,decode,serve", help="groups to run (predict, decode, serve)")
    ap.add_argument("--types", default="f16,q8_0", help="GGUF types for the llama.cpp rows")
    ap.add_argument("--threads", type=int, default=None, help="threads everywhere (default: physical cores, max 8)")
    ap.add_argument("--tokens", type=int, default=128, help="decode tokens per measurement")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--run", default=None, help="a trained run directory (default: the demo run, trained once)")
    ap.add_argument("--no-readme", action="store_true")
    opts = ap.parse_args()
    if opts.run:
        global RUN
        RUN = Path(opts.run).resolve()
    sys.path.insert(0, str(ROOT / "src"))
    from nekotune.engines.llamacpp import available, default_threads

    if not available():
        print("llama-cpp-python is not installed: pip install llama-cpp-python (the llama.cpp rows need it)")
        return 1
    threads = opts.threads or default_threads()
    types, groups = opts.types.split(","), opts.only.split(",")
    summary = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "threads": threads,
               "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "load_start": os.getloadavg(),
               "machine": {"cpu": cpu_name(), "cpus": os.cpu_count(), "python": platform.python_version()},
               "gflops": matmul_gflops(threads), "rows": []}
    ensure_run()
    ctx = prepare(types)
    summary["build_s"] = ctx["build_s"]
    if "predict" in groups:
        summary["rows"] += predict_rows(ctx, threads, types)
    if "decode" in groups:
        summary["rows"] += decode_rows(ctx, threads, opts.tokens, opts.reps, types)
    if "serve" in groups:
        summary["rows"] += server_rows(ctx, threads, opts.tokens, types)
    summary["load_end"] = os.getloadavg()
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{time.strftime('%Y%m%d-%H%M%S')}-inference.json"
    out.write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    text = table(summary)
    print("\n" + text)
    if not opts.no_readme:
        write_readme(text)
    print(f"written {out.relative_to(ROOT)}" + ("" if opts.no_readme else " and the table in bench/README.md"))
    return 0


def cpu_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        return next(ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
