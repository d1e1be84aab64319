"""nekotune's Python API from end to end: train, chat, evaluate, merge, export.

    python examples/api.py                          # the demo: SmolLM2 and the built-in neko dataset
    python examples/api.py MODEL DATA OUTDIR        # any model and dataset (tests run it on a tiny model)

The README's "Python API" section shows the lines below the marker; tests/test_api.py runs this
file and checks that the README still shows what it runs.
"""

import sys

import nekotune
from nekotune.data import DEMO_DATA

MODEL, DATA, OUT = (sys.argv[1:] + ["smollm2", str(DEMO_DATA), "outputs/api-example"][len(sys.argv) - 1:])[:3]

# -- the README's example --------------------------------------------------------------------
cfg = nekotune.Config.load(None, [f"model.name_or_path={MODEL}", f"data.path={DATA}", "train.max_steps=10",
                                  f"output.root={OUT}"])
run = nekotune.train(cfg)  # a Run: run.dir, run.adapter, run.metrics (run.json)
print(run.dir, run.metrics["final_loss"])

model = nekotune.load(run)  # base + adapter, with the run's system prompt and chat template
print(model.generate("Who are you?", max_new_tokens=40))
for piece in model.stream([{"role": "user", "content": "What do you like?"}], temperature=0, max_new_tokens=20):
    print(piece, end="", flush=True)
print()

scores = nekotune.evaluate(run, DATA, limit=4)  # eval loss, perplexity, BLEU-4, ROUGE, chrF
print(scores.summary)
merged = nekotune.merge(run, f"{OUT}/merged")  # a standalone HF model directory
gguf = nekotune.export_gguf(run, f"{OUT}/neko.gguf", "q8_0")  # for llama.cpp
print(merged.out, gguf.path, gguf.size)
print(nekotune.estimate(MODEL, cfg).estimate.total_mb, "MB to train")
