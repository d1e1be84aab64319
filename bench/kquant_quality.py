"""K-quant quality on a real model: nekotune's pure-Python files against llama.cpp's (issue #20).

For one model (default: the latest run under outputs/, merged on the fly), writes
- the f16 GGUF (the reference) and an f32 GGUF (llama.cpp's quantizer input), with nekotune;
- each type of --types twice: `nekotune export gguf --type T` (pure Python) and
  llama_cpp.llama_model_quantize on the f32 file (llama.cpp's own quantizer);
then measures every file in llama.cpp as `nekotune export verify --reference f16.gguf` does on
the fixed text (60 demo conversations with their answers, verify.fixed_texts): top-1 next-token agreement
with the f16 file and mean KL(f16 || file); plus verify's pass criterion, teacher-forced top-1
against transformers on the held-out prompts' greedy continuations.

    .venv/bin/python bench/kquant_quality.py [--model outputs/my-run] [--types q4_k_m,q5_k_m,q6_k]

Writes bench/results/<time>-kquant-quality.json and prints a Markdown table (docs/export.md).
Needs llama-cpp-python.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TYPES = "q2_k,q3_k_m,q4_k_s,q4_k_m,q5_k_s,q5_k_m,q6_k"
MB = 2**20


def measure(llama_cpp, path: Path, reference, texts, prompts) -> dict:
    """Fixed-text divergence from the f16 file; held-out teacher-forced top-1 vs transformers."""
    from nekotune.export.divergence import divergence, open_llama
    from nekotune.export.verify import gguf_file_type, teacher_forced_top1

    n_ctx = max([len(t) for t in texts] + [len(p) + len(c) for p, c in prompts]) + 8
    llm = open_llama(llama_cpp, path, n_ctx)
    try:
        d = divergence(reference, llm, texts, "f16")
        top1_hf = sum(teacher_forced_top1(llm, p, c) for p, c in prompts) / len(prompts)
    finally:
        llm.close()
    return {"file_type": gguf_file_type(path), "size_mb": path.stat().st_size / MB, "top1_vs_f16": d.top1,
            "mean_kl_vs_f16": d.mean_kl, "max_kl_vs_f16": d.max_kl, "positions": d.positions,
            "heldout_top1_vs_transformers": top1_hf}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="run dir, adapter or merged dir (default: the latest run)")
    parser.add_argument("--types", default=TYPES)
    parser.add_argument("--work", default=None, help="keep the GGUF files here (default: a temporary dir)")
    parser.add_argument("--noise", action="store_true",
                        help="also llama.cpp's quantizer on the f16 file: how far two equally good files land apart")
    args = parser.parse_args()
    import llama_cpp

    from nekotune.api import export_gguf
    from nekotune.config import load_config
    from nekotune.export.divergence import fixed_texts, llama_logits, open_llama
    from nekotune.export.gguf import quantize_k
    from nekotune.export.verify import N_TOKENS, heldout_prompts, hf_greedy
    from nekotune.model import load_source, resolve_source

    cfg = load_config(None, [], default_to_demo=False)
    loaded = load_source(*resolve_source(cfg, args.model, merged_prompts=True))
    texts = fixed_texts(loaded)
    renderer = loaded.renderer
    prompts = []
    for conv in heldout_prompts(loaded.cfg):
        ids = renderer.prompt_ids(conv)
        prompts.append((ids, hf_greedy(loaded.model, ids, renderer.stop_token_ids, renderer.tokenizer.pad_token_id)))
    types = [t for t in args.types.split(",") if t]
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        f16 = export_gguf(args.model, str(work / "f16.gguf"), "f16", cfg).path
        f32 = export_gguf(args.model, str(work / "f32.gguf"), "f32", cfg).path
        llm = open_llama(llama_cpp, f16, max(len(t) for t in texts) + 8)
        try:
            cached = {tuple(ids): llama_logits(llm, ids) for ids in texts}
        finally:
            llm.close()
        rows = {"f16": measure(llama_cpp, f16, lambda ids: cached[tuple(ids)], texts, prompts)}
        for t in types:
            ours = export_gguf(args.model, str(work / f"nekotune-{t}.gguf"), t, cfg).path
            theirs = work / f"llama.cpp-{t}.gguf"
            quantize_k(f32, theirs, t)
            runs = [("nekotune", ours), ("llama.cpp", theirs)]
            if args.noise:
                quantize_k(f16, work / f"llama.cpp-f16-{t}.gguf", t)
                runs.append(("llama.cpp (from f16)", work / f"llama.cpp-f16-{t}.gguf"))
            for tool, path in runs:
                rows[f"{t} {tool}"] = measure(llama_cpp, path, lambda ids: cached[tuple(ids)], texts, prompts)
    print(f"\n{loaded.spec.label}: fixed text {len(texts)} conversations, {rows['f16']['positions']} next tokens; "
          f"held-out prompts {len(prompts)} x {N_TOKENS} greedy tokens\n")
    print("| GGUF | quantizer | size | top-1 vs f16 | mean KL vs f16 | held-out top-1 vs transformers |")
    print("|---|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        kind, _, tool = name.partition(" ")
        print(f"| `{kind}` | {tool or 'nekotune'} | {r['size_mb']:.0f} MB | {r['top1_vs_f16']:.1%} | "
              f"{r['mean_kl_vs_f16']:.4f} | {r['heldout_top1_vs_transformers']:.1%} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"bench": "kquant_quality", "model": loaded.spec.label, "rows": rows, "cpus": os.cpu_count(),
              "versions": {"llama_cpp_python": llama_cpp.__version__}, "seconds": time.time() - started,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path = RESULTS / f"{time.strftime('%Y%m%d-%H%M%S')}-kquant-quality.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
