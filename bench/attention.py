"""Per-example causal attention on a packed row, forward + backward, bf16 inputs, on this CPU: the
choices behind nekotune.training.speed.packed_sdpa, measured side by side (interleaved repetitions, median).

  slice flash      query[:, :, a:b] per example, torch's flash kernel in bf16 (packed_sdpa's first version)
  split flash      one split per tensor: one concatenation in the backward instead of N zero tensors
  split flash32    the same with the inputs upcast to fp32 for the kernel and the output cast back
  grouped matmul   nekotune.training.speed.grouped_matmul_attention: two batched matmuls per key/value head

packed_sdpa uses grouped matmul on CPU for bf16 examples up to MATMUL_ATTENTION_MAX_LEN tokens and
split flash otherwise. SmolLM2's attention shape (9 query heads, 3 key/value heads, head size 64),
4 examples per packed row.

    .venv/bin/python bench/attention.py      -> table; bench/results/<date>-attention.json
"""

from __future__ import annotations

import json
import statistics
import time
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F

from nekotune.training.speed import MATMUL_ATTENTION_MAX_LEN, grouped_matmul_attention

RESULTS = Path(__file__).resolve().parent / "results"
HEADS, KV_HEADS, HEAD_DIM, EXAMPLES = 9, 3, 64, 4
WAYS = ["slice flash", "split flash", "split flash32", "grouped matmul"]


def flash(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def attend(q, k, v, lengths: list[int], how: str):
    if how == "slice flash":
        bounds = [0]
        for n in lengths:
            bounds.append(bounds[-1] + n)
        parts = [flash(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
        return torch.cat(parts, 2)
    split = list(zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2)))
    if how == "split flash":
        return torch.cat([flash(a, b, c) for a, b, c in split], 2)
    if how == "split flash32":
        return torch.cat([flash(a.float(), b.float(), c.float()).to(q.dtype) for a, b, c in split], 2)
    return torch.cat([grouped_matmul_attention(a, b, c) for a, b, c in split], 2)


def one_step(length: int, how: str) -> float:
    total = length * EXAMPLES

    def leaf(heads):
        return torch.randn(1, total, heads, HEAD_DIM, dtype=torch.bfloat16, requires_grad=True)

    q, k, v = leaf(HEADS), leaf(KV_HEADS), leaf(KV_HEADS)
    start = time.perf_counter()
    out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), [length] * EXAMPLES, how)
    out.float().sum().backward()
    return time.perf_counter() - start


def check_equal() -> float:
    q = torch.randn(1, HEADS, 100, HEAD_DIM)
    k, v = torch.randn(1, KV_HEADS, 100, HEAD_DIM), torch.randn(1, KV_HEADS, 100, HEAD_DIM)
    return (grouped_matmul_attention(q, k, v) - flash(q, k, v)).abs().max().item()


def main() -> None:
    torch.set_num_threads(2)
    diff = check_equal()
    rows = []
    for length in (64, 128, 192, 256, 384, 512):
        times = {w: [] for w in WAYS}
        for w in WAYS:
            one_step(length, w)  # warm-up
        for _ in range(11):
            for w in WAYS:  # interleaved, so a busy moment hits every variant alike
                times[w].append(one_step(length, w))
        med = {w: statistics.median(t) * 1000 for w, t in times.items()}
        used = "grouped matmul" if length <= MATMUL_ATTENTION_MAX_LEN else "split flash"
        rows.append({"length": length, "ms": {w: round(m, 2) for w, m in med.items()}, "packed_sdpa_uses": used,
                     "speedup_vs_slice_flash": round(med["slice flash"] / med[used], 2)})
    print(f"fp32 check: grouped matmul vs flash max abs difference {diff:.1e}")
    print("| example length | " + " | ".join(f"{w} ms" for w in WAYS) + " | packed_sdpa uses | speed-up |")
    print("|---:|" + "---:|" * len(WAYS) + "---|---:|")
    for r in rows:
        print(f"| {r['length']} | " + " | ".join(f"{r['ms'][w]:.1f}" for w in WAYS) +
              f" | {r['packed_sdpa_uses']} | {r['speedup_vs_slice_flash']:.2f}x |")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{datetime.now():%Y%m%d-%H%M%S}-attention.json"
    out.write_text(json.dumps({"date": datetime.now().isoformat(timespec="seconds"), "rows": rows,
                               "fp32_max_abs_difference": diff, "shape": {
                                   "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
                                   "examples_per_row": EXAMPLES}}, indent=1))
    print(f"written {out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out}")


if __name__ == "__main__":
    main()
