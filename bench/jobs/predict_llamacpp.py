"""What `nekotune predict FILE --model RUN --engine llama.cpp` will do (issue 19 phase B), for the
benchmark to time as a whole process: the same config resolution, conversations, prompts and
settings as `nekotune predict`, generation on the llama.cpp engine over nekotune's cached GGUFs.

usage: predict_llamacpp.py RUN FILE OUT [--type q8_0] [--merge] [--threads N] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import sys


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("file")
    ap.add_argument("out")
    ap.add_argument("--type", default="auto")
    ap.add_argument("--merge", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("rest", nargs="*")
    args = ap.parse_args()

    from nekotune.config import load_config
    from nekotune.data import load_conversations
    from nekotune.engines.gguf_files import open_llamacpp
    from nekotune.engines.llamacpp import LlamaCppOptions
    from nekotune.generate import GenSettings
    from nekotune.io import atomic_write_text

    cfg = load_config(None, args.rest, default_to_demo=False)
    engine, files = open_llamacpp(cfg, args.run, args.type, merge=args.merge,
                                  options=LlamaCppOptions(n_threads=args.threads))
    with engine:
        convs, _ = load_conversations(args.file, files.cfg.data, prompts_only=True)
        settings = GenSettings.from_config(files.cfg.generate)
        prompts = [c.prompt_part() for c in convs]
        ids = [files.renderer.prompt_ids(p) for p in prompts]
        adapter = None if files.merged else next(iter(files.adapters), None)
        preds = engine.generate_batch(ids, settings, files.renderer.stop_token_ids, adapter=adapter)
        print(engine.describe(), file=sys.stderr)
    lines = [json.dumps({"prompt": p.turns[-1].content if p.turns else "", "prediction": pred}, ensure_ascii=False)
             for p, pred in zip(prompts, preds, strict=True)]
    atomic_write_text(args.out, "\n".join(lines) + "\n")
    print(f"{len(lines)} predictions written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
