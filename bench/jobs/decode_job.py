"""One decode measurement in its own process: reads a JSON job, prints one JSON line.

kind "decode": single-stream greedy decode rate. Time to generate 1 token (prompt processing)
and N+1 tokens, best of `reps`; N / the difference is the decode rate, in wall and CPU seconds
(process CPU time counts every thread). Stops are off so every engine decodes exactly N tokens.
kind "clients": K threads each generating one answer (natural stops) at once on one engine;
tokens over wall time.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time


def _settings(job):
    from nekotune.generate import GenSettings

    return GenSettings(max_new_tokens=job["tokens"] + 1, temperature=0.0,
                       repetition_penalty=job.get("repetition_penalty", 1.1))


def llamacpp(job):
    from transformers import AutoTokenizer

    from nekotune.engines.llamacpp import LlamaCppEngine, LlamaCppOptions

    tok = AutoTokenizer.from_pretrained(job["tokenizer"])
    engine = LlamaCppEngine(job["model"], tok, job.get("adapters") or {}, LlamaCppOptions(n_threads=job["threads"]))
    adapter = job.get("adapter")

    def run(ids, n, stops=()):
        from dataclasses import replace

        return len(list(engine.generate_ids(ids, replace(_settings(job), max_new_tokens=n), list(stops),
                                            adapter=adapter)))

    return engine, run


def transformers(job):
    import torch

    from nekotune.config import load_config
    from nekotune.model import load_for_inference

    torch.set_num_threads(job["threads"])
    loaded = load_for_inference(load_config(None, [], default_to_demo=False), job["run"])
    model = loaded.model
    lock = threading.Lock() if job.get("serialise") else None

    def run(ids, n, stops=()):
        x = torch.tensor([ids])
        kwargs = dict(max_new_tokens=n, do_sample=False, repetition_penalty=job.get("repetition_penalty", 1.1),
                      temperature=None, top_p=None, top_k=None, pad_token_id=loaded.renderer.tokenizer.pad_token_id)
        if stops:
            kwargs["eos_token_id"] = list(stops)
        else:
            kwargs["min_new_tokens"] = n
        with torch.no_grad(), (lock or _null()):
            out = model.generate(x, attention_mask=torch.ones_like(x), **kwargs)
        return out.shape[1] - len(ids)

    return None, run


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def decode(job, run):
    ids, n = job["prompts"][0], job["tokens"]
    run(ids, 2)  # warm-up
    best_wall = best_cpu = 0.0
    for _ in range(job.get("reps", 3)):
        t0, c0 = time.perf_counter(), time.process_time()
        run(ids, 1)
        t1, c1 = time.perf_counter(), time.process_time()
        got = run(ids, n + 1)
        t2, c2 = time.perf_counter(), time.process_time()
        decoded = got - 1
        wall, cpu = (t2 - t1) - (t1 - t0), (c2 - c1) - (c1 - c0)
        best_wall, best_cpu = max(best_wall, decoded / wall), max(best_cpu, decoded / max(cpu, 1e-9))
    return {"tok_s": round(best_wall, 2), "tok_per_cpu_s": round(best_cpu, 2), "tokens": n,
            "prompt_tokens": len(ids)}


def clients(job, run):
    prompts, k = job["prompts"], job["clients"]
    counts = [0] * k
    run(prompts[0], 2)

    def one(i):
        counts[i] = run(prompts[i % len(prompts)], job["tokens"], job["stop_ids"])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(k)]
    t0, c0 = time.perf_counter(), time.process_time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"tok_s": round(sum(counts) / wall, 2), "tok_per_cpu_s": round(sum(counts) / cpu, 2),
            "tokens": sum(counts), "clients": k, "wall_s": round(wall, 2)}


def main() -> int:
    job = json.loads(open(sys.argv[1], encoding="utf-8").read())
    if job.get("omp_wait_policy"):
        os.environ["OMP_WAIT_POLICY"] = job["omp_wait_policy"]
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    engine, run = llamacpp(job) if job["engine"] == "llama.cpp" else transformers(job)
    load_s = time.perf_counter() - t0
    result = decode(job, run) if job["kind"] == "decode" else clients(job, run)
    result.update(load_s=round(load_s, 2), load_avg=[round(load0, 2), round(os.getloadavg()[0], 2)])
    if engine is not None:
        engine.close()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
