"""DPO on persona pairs with LoRA on the embedded SmolLM2 (issue #18): does held-out reward accuracy rise
well above chance?

Pairs: the prompts of the demo persona dataset (src/nekotune/demo/neko_demo.json); chosen = the
persona's answer from that file, rejected = the base model's own greedy answer (nekotune.generate, as
`nekotune predict` makes them). A seeded split holds out pairs the run never sees. The policy is a
fresh LoRA (r 16, all linear layers, bf16 autocast on CPU) trained by nekotune's DPO stage
(nekotune.preference on TRL's DPOTrainer, the reference being the base with the adapter disabled).

Held-out figures come from nekotune.preference.preference_eval (the DPO implicit reward
beta * (log pi - log ref) of chosen vs rejected answers; a tie counts as wrong): before training the
policy is the reference, every reward is 0 and reward accuracy 0. `policy_prefers_chosen` (how often
the model itself gives the persona answer the higher log-probability) is the reference-free view.

    .venv/bin/python bench/preference.py [--train 48 --held 24 --epochs 1]
        -> table line; bench/results/<date>-preference.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def options(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=int, default=48, help="training pairs")
    p.add_argument("--held", type=int, default=24, help="held-out pairs")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--max-new-tokens", type=int, default=48, help="length of the base model's (rejected) answers")
    p.add_argument("--pairs-cache", type=Path, help="reuse (or write) the generated pairs from/to this JSON file")
    return p.parse_args(argv)


def make_pairs(opts, spec, renderer) -> list[dict]:
    """Persona answers (chosen) against the base model's own greedy answers (rejected)."""
    from nekotune.config import ModelConfig
    from nekotune.data import DEMO_DATA
    from nekotune.data.formats import Conversation, Turn
    from nekotune.generate import GenSettings, generate_batch
    from nekotune.model import load_model, pick_precision

    if opts.pairs_cache and opts.pairs_cache.is_file():
        return json.loads(opts.pairs_cache.read_text(encoding="utf-8"))
    rows = json.loads(DEMO_DATA.read_text(encoding="utf-8"))
    random.Random(0).shuffle(rows)
    rows = rows[: opts.train + opts.held]
    base = load_model(spec, ModelConfig(), pick_precision("cpu", "fp32", training=False), training=False)
    prompts = [Conversation(turns=[Turn("user", r["instruction"])]) for r in rows]
    settings = GenSettings(max_new_tokens=opts.max_new_tokens, temperature=0.0, repetition_penalty=1.1)
    answers = generate_batch(base, renderer, prompts, settings, batch_size=8)
    pairs = [{"instruction": r["instruction"], "chosen": r["output"], "rejected": a}
             for r, a in zip(rows, answers, strict=True) if a.strip() and a.strip() != r["output"].strip()]
    if opts.pairs_cache:
        opts.pairs_cache.write_text(json.dumps(pairs, ensure_ascii=False, indent=1), encoding="utf-8")
    return pairs


def policy(spec):
    """A fresh LoRA the way nekotune's recipe builds one (bf16 weights + autocast where the CPU has bf16)."""
    from nekotune.config import load_config
    from nekotune.model import load_model, pick_precision
    from nekotune.training import build_peft_model
    from nekotune.training.speed import fuse_lora_adds

    cfg = load_config(None, ["lora.r=16", "lora.alpha=32", "lora.target_modules=all-linear"], default_to_demo=False)
    precision = pick_precision("cpu", "auto", training=True)
    model = build_peft_model(load_model(spec, cfg.model, precision, training=True), cfg, grad_ckpt=False)
    return model, precision, fuse_lora_adds(model)


def train_dpo(opts, model, precision, tokenizer, renderer, train_rows, out: Path):
    import torch

    from nekotune.training.callbacks import Stats
    from nekotune.training.preference import PreferenceSettings, build_preference_trainer

    bf16 = precision.autocast == torch.bfloat16
    kwargs = dict(output_dir=str(out / "checkpoints"), per_device_train_batch_size=opts.batch,
                  per_device_eval_batch_size=opts.batch, num_train_epochs=opts.epochs, learning_rate=opts.lr,
                  lr_scheduler_type="cosine", warmup_steps=0, logging_steps=1, logging_first_step=True,
                  save_strategy="no", eval_strategy="no", seed=42, data_seed=42, bf16=bf16, use_cpu=True,
                  optim="adamw_torch", prediction_loss_only=True)
    stats = Stats()
    trainer = build_preference_trainer("dpo", model, tokenizer, [r.row() for r in train_rows], None, kwargs,
                                       PreferenceSettings(beta=opts.beta), max_length=renderer.max_seq_len,
                                       stats=stats)
    start = time.time()
    trainer.train()
    return trainer, {"train_seconds": round(time.time() - start, 1), "steps": trainer.state.global_step,
                            "policy_tokens": stats.tokens, "precision": precision.name}


def main(argv: list[str]) -> int:
    import tempfile

    import torch

    from nekotune.data.preference import to_examples
    from nekotune.data.preference_tokens import PreferenceEncoder
    from nekotune.data.render import Renderer
    from nekotune.data.sources import Row
    from nekotune.model import ModelSource, embedded_gguf, gguf_to_hf_dir, load_tokenizer
    from nekotune.preference import preference_eval
    from nekotune.training.rewards import reward_metrics
    from train_bench import machine, matmul_gflops

    opts = options(argv)
    torch.set_num_threads(2)
    t0 = time.time()
    load = os.getloadavg()
    gflops = {d: round(matmul_gflops(d, seconds=2.0), 1) for d in ("float32", "bfloat16")}
    spec = ModelSource(base=str(gguf_to_hf_dir(embedded_gguf())))
    tokenizer = load_tokenizer(spec)
    renderer = Renderer(tokenizer, max_seq_len=192)

    pairs = make_pairs(opts, spec, renderer)
    gen_seconds = time.time() - t0
    items, _ = to_examples([Row(p, f"pair {i}") for i, p in enumerate(pairs, 1)], "pairs")
    encoder = PreferenceEncoder(renderer)
    encoded = [e for e in map(encoder.encode_pair, items) if e is not None]
    train_rows, held = encoded[: opts.train], encoded[opts.train: opts.train + opts.held]

    model, precision, fused = policy(spec)
    t_eval = time.time()
    before = preference_eval(model, renderer, held, beta=opts.beta)  # fresh LoRA == reference: all ties
    eval_seconds = time.time() - t_eval
    with tempfile.TemporaryDirectory() as tmp:
        trainer, run = train_dpo(opts, model, precision, tokenizer, renderer, train_rows, Path(tmp))
    run.update(fused_lora_layers=fused, eval_seconds=round(eval_seconds, 1))
    after = preference_eval(model, renderer, held, beta=opts.beta)
    history = reward_metrics(trainer.state.log_history)
    result = {
        "date": datetime.now().isoformat(timespec="seconds"), "machine": machine(), "load_average_start": load,
        "matmul_gflops_2048": gflops, "model": "SmolLM2-135M-Instruct (embedded GGUF, dequantized)",
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(opts).items()},
        "pairs": {"train": len(train_rows), "held_out": len(held), "generation_seconds": round(gen_seconds, 1),
                  "examples": pairs[:3]},
        "run": run, "train_losses": [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h],
        "train_rewards": history["rewards"], "held_out_before": before, "held_out_after": after,
        "wall_seconds": round(time.time() - t0, 1),
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{datetime.now():%Y%m%d-%H%M%S}-preference.json"
    path.write_text(json.dumps(result, ensure_ascii=False, indent=1), encoding="utf-8")
    print(f"| DPO persona pairs, SmolLM2 | {len(train_rows)} train / {len(held)} held-out pairs | "
          f"{run['steps']} steps, {run['train_seconds']} s ({run['precision']}) | held-out reward accuracy "
          f"{before['reward_accuracy']:.2f} -> {after['reward_accuracy']:.2f} (margin {after['mean_margin']:.3f}); "
          f"log-prob preference for the persona answer {before['policy_prefers_chosen']:.2f} -> "
          f"{after['policy_prefers_chosen']:.2f} |")
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
