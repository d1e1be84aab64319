"""Regenerate the popular-models table in docs/estimate.md from the shipped config.json files."""

from __future__ import annotations

import json
import re
from pathlib import Path

from nekotune.memory import SEEDS_RULES, Arch, Settings, estimate, inference_mb

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "tests" / "data" / "configs"
DOC = ROOT / "docs" / "estimate.md"
MODELS = ["Qwen3-0.6B", "Qwen3-1.7B", "Qwen3-4B", "Qwen3-8B", "Meta-Llama-3-8B", "Qwen2.5-7B"]


def gb(settings: Settings, arch: Arch) -> float:
    return estimate(arch, settings).total_mb / 1024


def table() -> str:
    lines = ["| model | params | LoRA 512 | LoRA 2048 | QLoRA 512 | QLoRA 2048 | seeds' rule LoRA / QLoRA "
             "| inference bf16 / 4-bit |",
             "|---|---|---|---|---|---|---|---|"]
    for name in MODELS:
        arch = Arch.from_config(json.loads((CONFIGS / name / "config.json").read_text()), name)
        cells = []
        for quant in (False, True):
            for seq in (512, 2048):
                cells.append(f"{gb(Settings(device='cuda', quant4=quant, batch=4, seq=seq, grad_ckpt=True), arch):.1f}")
        b = arch.params / 1e9
        lo, hi = SEEDS_RULES["lora"]
        rule = f"{lo * b:.1f}-{hi * b:.1f} / {SEEDS_RULES['qlora'][0] * b:.1f}"
        inf = inference_mb(arch)
        lines.append(f"| {name} | {b:.2f}B | " + " | ".join(cells) + f" | {rule} | "
                     f"{inf['bf16'] / 1024:.1f} / {inf['4-bit'] / 1024:.1f} |")
    return "\n".join(lines)


def main() -> None:
    text = DOC.read_text()
    new = re.sub(r"<!-- table -->.*<!-- /table -->", f"<!-- table -->\n{table()}\n<!-- /table -->", text, flags=re.S)
    DOC.write_text(new)
    print(table())


if __name__ == "__main__":
    main()
