"""Pure-Python K-quants against llama.cpp's quantizer: time, peak memory and error (issue #20).

A GGUF with Qwen3-1.7B's shapes (tests/data/configs/Qwen3-1.7B: 28 layers, hidden 2048, FFN
6144, 16 heads / 8 KV heads of 128, vocabulary 151936, tied embeddings) and random normal
weights (std 0.02) is written in f16 once, then quantized to Q4_K_M by
- llama.cpp: llama_cpp.llama_model_quantize (llama-cpp-python), all cores;
- nekotune: nekotune.export.requant.quantize_gguf, the same encoders `export gguf` uses, NumPy
  on all cores;
each in its own subprocess, one after the other, after reading the f16 file once so both find it
in the page cache. Peak RSS is the child's VmHWM (llama.cpp maps the input file, so its figure
includes the mapped pages it touched). Both outputs are then compared tensor by tensor: the type
chosen, and the squared error against the f16 weights (sampled rows).

    .venv/bin/python bench/kquant_speed.py [--type q4_k_m] [--layers 28] [--work DIR] [--keep]

About 3.4 GB of f16 input and two 1.1 GB outputs under --work (removed unless --keep). Writes
bench/results/<time>-kquant.json and prints a table; exit 1 when nekotune takes more than 3x
llama.cpp's time. Needs llama-cpp-python.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CONFIG = ROOT / "tests" / "data" / "configs" / "Qwen3-1.7B" / "config.json"
TARGET_RATIO = 3.0
MB = 2**20


def peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def tensor_plan(config: dict) -> list[tuple[str, tuple]]:
    """(GGUF name, shape rows x cols) of a Qwen3 checkpoint, in llama.cpp's layer order."""
    h, ff, hd = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    plan = [("token_embd.weight", (config["vocab_size"], h)), ("output_norm.weight", (h,))]
    for i in range(config["num_hidden_layers"]):
        b = f"blk.{i}."
        plan += [(b + "attn_norm.weight", (h,)), (b + "attn_q.weight", (q, h)), (b + "attn_k.weight", (kv, h)),
                 (b + "attn_v.weight", (kv, h)), (b + "attn_output.weight", (h, q)),
                 (b + "attn_q_norm.weight", (hd,)), (b + "attn_k_norm.weight", (hd,)), (b + "ffn_norm.weight", (h,)),
                 (b + "ffn_gate.weight", (ff, h)), (b + "ffn_up.weight", (ff, h)), (b + "ffn_down.weight", (h, ff))]
    return plan


def write_f16(path: Path, config: dict) -> None:
    """Random weights, streamed tensor by tensor; metadata as nekotune writes it, a placeholder vocabulary."""
    import gguf
    import numpy as np

    from nekotune.export.gguf import _tensor_info
    from nekotune.export.gguf_meta import add_hparams

    writer = gguf.GGUFWriter(path=None, arch="qwen3")
    writer.add_name("random-Qwen3-1.7B-shapes")
    add_hparams(writer, config, config["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list([f"t{i}" for i in range(config["vocab_size"])])
    writer.add_token_types([gguf.TokenType.NORMAL] * config["vocab_size"])
    plan = tensor_plan(config)
    for name, shape in plan:
        _tensor_info(writer, name, shape, gguf.GGMLQuantizationType.F32 if len(shape) == 1
                     else gguf.GGMLQuantizationType.F16)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for _name, shape in plan:
        if len(shape) == 1:
            writer.write_tensor_data(np.ones(shape, dtype=np.float32))
            continue
        rows = np.empty(shape, dtype=np.float16)
        step = max(1, (1 << 24) // shape[1])
        for start in range(0, shape[0], step):
            part = rng.standard_normal((min(step, shape[0] - start), shape[1]), dtype=np.float32)
            rows[start:start + part.shape[0]] = part * np.float32(0.02)
        writer.write_tensor_data(rows)
        del rows
    writer.close()


def child(tool: str, source: str, target: str, type_name: str) -> None:
    """In the subprocess: quantize, report seconds and peak RSS as one JSON line."""
    if tool == "llama.cpp":
        from nekotune.export.gguf import quantize_k

        started = time.perf_counter()
        quantize_k(Path(source), Path(target), type_name)
    else:
        from nekotune.export.requant import quantize_gguf

        started = time.perf_counter()
        quantize_gguf(source, target, type_name)
    print(json.dumps({"seconds": time.perf_counter() - started, "peak_rss_mb": peak_mb()}))


def measure(tool: str, source: Path, target: Path, type_name: str) -> dict:
    load = os.getloadavg()
    cmd = [sys.executable, __file__, "--child", tool, str(source), str(target), type_name]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{tool} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(load_before=load, load_after=os.getloadavg(), size_mb=target.stat().st_size / MB)
    return result


def compare(source: Path, ours: Path, theirs: Path, rows: int = 64) -> dict:
    """Per tensor: both types; over all quantized tensors: error ratio and identical blocks."""
    import gguf
    import numpy as np

    src = {t.name: t for t in gguf.GGUFReader(source).tensors}
    a = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    b = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    mismatched = {n: (a[n].tensor_type.name, b[n].tensor_type.name) for n in a
                  if a[n].tensor_type != b[n].tensor_type}
    err_a = err_b = 0.0
    same = total = 0
    by_type: dict[str, int] = {}
    for name, t in a.items():
        by_type[t.tensor_type.name] = by_type.get(t.tensor_type.name, 0) + 1
        if len(t.shape) < 2 or name in mismatched or t.tensor_type == gguf.GGMLQuantizationType.F32:
            continue
        x = np.asarray(src[name].data[:rows], dtype=np.float32)
        qa, qb = np.asarray(t.data[:rows]), np.asarray(b[name].data[:rows])
        err_a += float(np.sum((gguf.quants.dequantize(qa, t.tensor_type) - x) ** 2))
        err_b += float(np.sum((gguf.quants.dequantize(qb, t.tensor_type) - x) ** 2))
        block = gguf.GGML_QUANT_SIZES[t.tensor_type][1]
        same += int(np.all(qa.reshape(-1, block) == qb.reshape(-1, block), axis=1).sum())
        total += qa.size // block
    return {"type_mismatches": mismatched, "tensor_types": by_type, "error_ratio": err_a / err_b,
            "identical_blocks": same / total, "rows_compared_per_tensor": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--type", default="q4_k_m")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers for a quick run")
    parser.add_argument("--work", default="/tmp/nekotune-kquant-bench")
    parser.add_argument("--keep", action="store_true", help="keep the GGUF files")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return 0
    import importlib.metadata as md

    from rich.console import Console
    from rich.table import Table

    config = json.loads(CONFIG.read_text())
    if args.layers:
        config["num_hidden_layers"] = args.layers
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    source = work / f"qwen3-1.7b-random-{config['num_hidden_layers']}l-f16.gguf"
    started = time.time()
    if not source.is_file():
        write_f16(source, config)
    with open(source, "rb") as fh:  # into the page cache, so neither tool pays the first read
        while fh.read(64 * MB):
            pass
    outputs = {tool: work / f"{tool}-{args.type}.gguf" for tool in ("llama.cpp", "nekotune")}
    runs = {tool: measure(tool, source, path, args.type) for tool, path in outputs.items()}
    ratio = runs["nekotune"]["seconds"] / runs["llama.cpp"]["seconds"]
    quality = compare(source, outputs["nekotune"], outputs["llama.cpp"])
    table = Table(title=f"{args.type.upper()} from f16, random weights with Qwen3-1.7B's shapes "
                        f"({config['num_hidden_layers']} layers), {os.cpu_count()} CPUs")
    for column in ("quantizer", "seconds", "x llama.cpp", "peak RSS", "output", "load before/after"):
        table.add_column(column, justify="left" if column == "quantizer" else "right")
    for tool, r in runs.items():
        table.add_row(tool, f"{r['seconds']:.1f}", f"{r['seconds'] / runs['llama.cpp']['seconds']:.2f}",
                      f"{r['peak_rss_mb']:,.0f} MB", f"{r['size_mb']:,.0f} MB",
                      f"{r['load_before'][0]:.1f} / {r['load_after'][0]:.1f}")
    Console().print(table)
    print(f"tensor types: {quality['tensor_types']}; differing from llama.cpp's: {len(quality['type_mismatches'])}")
    print(f"squared error vs f16, nekotune / llama.cpp: {quality['error_ratio']:.5f}; "
          f"identical blocks {quality['identical_blocks']:.1%}")
    result = {"bench": "kquant_speed", "type": args.type, "config": config, "runs": runs, "ratio": ratio,
              "target_ratio": TARGET_RATIO, "within_target": ratio <= TARGET_RATIO, "quality": quality,
              "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
              "versions": {p: md.version(p) for p in ("numpy", "gguf", "llama_cpp_python")},
              "f16_size_mb": source.stat().st_size / MB, "total_seconds": time.time() - started,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{time.strftime('%Y%m%d-%H%M%S')}-kquant.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    if not args.keep:
        for p in [source, *outputs.values()]:
            p.unlink(missing_ok=True)
    return 0 if ratio <= TARGET_RATIO else 1


if __name__ == "__main__":
    raise SystemExit(main())
