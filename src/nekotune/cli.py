"""Thin command line: the argument table, and one call into the command layer (nekotune.commands) per command.

No stage imports this module. A UserError becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from nekotune.errors import UserError
from nekotune.registry import ENGINE_CHOICES, GGUF_TYPES

EXIT_USER = 2
EXIT_INTERRUPTED = 130  # also commands.train's, for an interrupted training


def _split_rest(rest: list[str]) -> tuple[str | None, list[str]]:
    """`[cfg.yaml] key=value ...` -> (config path, overrides)."""
    config, overrides = None, []
    for item in rest:
        if "=" in item:
            overrides.append(item)
        elif config is None and item.endswith((".yaml", ".yml")):
            config = item
        else:
            raise UserError(f"unexpected argument {item!r}; give a config .yaml file and key=value overrides")
    return config, overrides


def _config(args, default_to_demo: bool = True):
    from nekotune.config import load_config

    path, overrides = _split_rest(getattr(args, "rest", []) or [])
    if getattr(args, "engine", None):  # --engine is generate.engine, over the file and overrides
        overrides = [*overrides, f"generate.engine={args.engine}"]
    return load_config(path, overrides, default_to_demo=default_to_demo)


# -- commands --------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from nekotune.commands.train import launch_torchrun, train_command

    if args.nproc and args.nproc > 1:
        return launch_torchrun(args.nproc, getattr(args, "rest", []) or [])
    cfg = _config(args)
    return train_command(cfg, args.rest or [], show_progress=not args.no_progress and sys.stdout.isatty()
                         or args.progress, samples=not args.no_samples)


def cmd_config_show(args: argparse.Namespace) -> int:
    from nekotune.config import load_config_notes

    path, overrides = _split_rest(getattr(args, "rest", []) or [])
    cfg, notes = load_config_notes(path, overrides)
    # one comment line per translated or ignored key: the output stays a valid nekotune YAML
    for note in notes:
        print(f"# {note}")
    print(cfg.to_yaml(), end="")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from nekotune.commands.data import check_command

    cfg = _config(args)
    return check_command(cfg, args.file, model=args.model)


def cmd_chat(args: argparse.Namespace) -> int:
    from nekotune.commands.chat import run_chat

    cfg = _config(args, default_to_demo=False)
    return run_chat(cfg, args.model, system=args.system, images=args.image)


def cmd_ask(args: argparse.Namespace) -> int:
    from nekotune.commands.chat import ask

    cfg = _config(args, default_to_demo=False)
    return ask(cfg, args.model, args.question, as_json=args.json, system=args.system, images=args.image)


def cmd_predict(args: argparse.Namespace) -> int:
    from nekotune.commands.chat import predict_command

    cfg = _config(args, default_to_demo=False)
    return predict_command(cfg, args.model, args.file, args.out, limit=args.limit)


def cmd_eval(args: argparse.Namespace) -> int:
    from nekotune.commands.chat import eval_command

    cfg = _config(args, default_to_demo=False)
    return eval_command(cfg, args.model, args.file, out_dir=args.out, baseline=args.baseline,
                        limit=args.limit, generate=not args.no_generate)


def cmd_compare(args: argparse.Namespace) -> int:
    from nekotune.commands.chat import compare_command

    cfg = _config(args, default_to_demo=False)
    models = [m.strip() for m in (args.models or "").split(",") if m.strip()]
    names = [n.strip() for n in args.names.split(",")] if args.names else None
    return compare_command(cfg, models, args.prompts, args.out, limit=args.limit, eval_file=args.eval_file,
                           names=names)


def cmd_merge(args: argparse.Namespace) -> int:
    from nekotune.commands.export import merge_command

    cfg = _config(args, default_to_demo=False)
    merge_command(cfg, args.model, args.out, low_memory=args.low_memory, dtype=args.dtype)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from nekotune.commands import export

    cfg = _config(args, default_to_demo=False)
    if args.what == "gguf":
        export.export_command(cfg, args.model, args.out, args.type, imatrix=args.imatrix)
    elif args.what == "gguf-lora":
        export.lora_command(cfg, args.model, args.out, args.type)
    elif args.what == "ollama":
        export.ollama_command(cfg, args.model, args.out, args.type, imatrix=args.imatrix, adapter=args.adapter)
    else:
        return export.verify_command(cfg, args.file, args.model, reference=args.reference)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from nekotune.commands.serve import serve_command

    cfg = _config(args, default_to_demo=False)
    return serve_command(cfg, args)


def cmd_ui(args: argparse.Namespace) -> int:
    from nekotune.commands.ui import ui_command

    cfg = _config(args, default_to_demo=False)
    return ui_command(cfg, args)


def cmd_estimate(args: argparse.Namespace) -> int:
    from nekotune.commands.estimate import estimate_command

    cfg = _config(args, default_to_demo=False)
    return estimate_command(cfg, args.model, fit=args.fit, as_json=args.json)


def cmd_doctor(args: argparse.Namespace) -> int:
    from nekotune.commands.estimate import doctor_command

    return doctor_command(as_json=args.json)


# -- parser ----------------------------------------------------------------------------------
def _rest(p: argparse.ArgumentParser) -> None:
    p.add_argument("rest", nargs="*", metavar="[config.yaml] [key=value ...]",
                   help="a config file and/or dotted overrides such as lora.r=16 train.epochs=1")


def _model(p: argparse.ArgumentParser, help_text: str = "run dir, adapter dir, HF dir, .gguf or hub id "
           "(default: the latest run under outputs/)") -> None:
    p.add_argument("--model", "-m", default=None, help=help_text)


def _engine(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", default=None, choices=list(ENGINE_CHOICES),
                   help="inference engine (generate.engine; default auto: llama.cpp on CPUs and Apple silicon "
                        "when llama-cpp-python is installed, transformers otherwise)")


def _listen(p: argparse.ArgumentParser, port: int) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=port)
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also answer requests addressed to NAME (Host header), e.g. mybox.lan; repeatable")


def _byte_size(text: str) -> int:
    found = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMG]?)(?:I?B)?", text.strip().upper())
    if not found:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 8MB, 500KB or 1048576")
    return int(float(found.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[found.group(2)])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nekotune", description="LoRA/QLoRA fine-tuning: data -> train -> chat, "
                                     "serve and GGUF. Every command takes [config.yaml] [key=value ...].")
    parser.add_argument("--version", action="store_true", help="print the version")
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("train", help="fine-tune (no arguments: the built-in demo)")
    _rest(p)
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    p.add_argument("--progress", action="store_true", help="force the progress bar")
    p.add_argument("--no-samples", action="store_true", help="skip the before/after answers")
    p.add_argument("--nproc", type=int, default=0, help="run on N processes through torchrun")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("config", help="show the effective config")
    csub = p.add_subparsers(dest="config_command")
    ps = csub.add_parser("show", help="print the effective config as YAML")
    _rest(ps)
    ps.set_defaults(func=cmd_config_show)

    p = sub.add_parser("data", help="inspect a dataset")
    dsub = p.add_subparsers(dest="data_command")
    pc = dsub.add_parser("check", help="report problems by row before training")
    pc.add_argument("file")
    _model(pc, "tokenizer to measure lengths with (default: the config's model)")
    _rest(pc)
    pc.set_defaults(func=cmd_data_check)

    p = sub.add_parser("chat", help="interactive streaming chat")
    _model(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--image", action="append", metavar="FILE",
                   help="an image for the first message (repeatable; vision-language models)")
    _engine(p)
    _rest(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("ask", help="one answer on stdout")
    p.add_argument("question")
    _model(p)
    p.add_argument("--system", default=None)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--image", action="append", metavar="FILE",
                   help="an image to ask about (repeatable; vision-language models)")
    _engine(p)
    _rest(p)
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("predict", help="batched generation for every row of a dataset")
    p.add_argument("file")
    p.add_argument("--out", required=True, help="output JSONL")
    p.add_argument("--limit", type=int, default=None)
    _model(p)
    _engine(p)
    _rest(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("eval", help="eval loss, perplexity, BLEU/ROUGE/chrF; on chosen/rejected pairs: held-out "
                       "reward accuracy and margin against the run's reference")
    p.add_argument("file")
    p.add_argument("--out", default=None, help="directory for eval_results.json and summary.md")
    p.add_argument("--baseline", action="store_true", help="also evaluate the base model")
    p.add_argument("--limit", type=int, default=None, help="rows to generate for the metrics")
    p.add_argument("--no-generate", action="store_true", help="loss and perplexity only")
    _model(p)
    _engine(p)
    _rest(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", help="HTML/Markdown report of several models side by side")
    p.add_argument("--models", required=True, help="comma-separated: base, run dirs, adapters, checkpoints")
    p.add_argument("--names", default=None, help="comma-separated column titles, one per model (default: the paths)")
    p.add_argument("--prompts", required=True, help="a prompts file (.txt lines, or any dataset)")
    p.add_argument("--out", required=True)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--eval-file", default=None, help="dataset for per-model eval loss (default: the prompts file)")
    _engine(p)
    _rest(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("merge", help="merge the adapter into the base model")
    _model(p)
    p.add_argument("--out", required=True)
    p.add_argument("--low-memory", action="store_true", help="merge shard by shard")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"])
    _rest(p)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("export", help="GGUF, Ollama, verify")
    esub = p.add_subparsers(dest="what")
    for what in ("gguf", "ollama"):
        pe = esub.add_parser(what)
        _model(pe)
        pe.add_argument("--type", default="q8_0" if what == "gguf" else "q4_0",
                        choices=list(GGUF_TYPES))
        pe.add_argument("--imatrix", default=None, metavar="FILE",  # issue 20
                        help="llama.cpp importance matrix (llama-imatrix output, GGUF or .dat) for the 2-6 bit types")
        pe.add_argument("--out", required=True)
        if what == "ollama":
            pe.add_argument("--adapter", action="store_true", help="the base GGUF with the adapter as a LoRA GGUF "
                            "(Modelfile ADAPTER) instead of merging; llama and qwen2 models only")
        _rest(pe)
        pe.set_defaults(func=cmd_export)
    pl = esub.add_parser("gguf-lora", help="the adapter as llama.cpp's LoRA GGUF (for the base's own GGUF)")
    _model(pl, "run or adapter directory (default: the latest run)")
    pl.add_argument("--out", required=True, help="the .gguf file to write, e.g. neko-lora.gguf")
    pl.add_argument("--type", default="f16", choices=["f16", "f32"])
    _rest(pl)
    pl.set_defaults(func=cmd_export)
    pv = esub.add_parser("verify")
    pv.add_argument("file")
    _model(pv, "source model to compare with (default: the latest run)")
    pv.add_argument("--reference", default=None, metavar="GGUF",  # issue 20
                    help="compare next-token distributions on the fixed text with this GGUF (e.g. the f16 "
                         "export) instead of the source model in transformers")
    _rest(pv)
    pv.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="OpenAI-compatible API")
    p.add_argument("model_pos", nargs="?", default=None, metavar="MODEL")
    _model(p)
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH")
    _listen(p, 8000)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY'; other users see it in ps: prefer NEKOTUNE_API_KEY")
    p.add_argument("--max-concurrency", type=int, default=4)
    p.add_argument("--max-tokens-cap", type=int, default=1024)
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a slot; more get 429 with Retry-After (default 64)")
    p.add_argument("--max-body", type=_byte_size, default="8MB",
                   help="largest request body, e.g. 8MB or 500KB; larger ones get 413 (default 8MB)")
    p.add_argument("--cors", default=None, help="comma-separated allowed origins (off by default)")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="let image_url parts name http(s) URLs the server downloads (default: data URLs only)")
    _engine(p)
    _rest(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("ui", help="web UI (Gradio)")
    _model(p)
    _listen(p, 7860)
    p.add_argument("--auth", default=None, metavar="USER:PASS",
                   help="require a login; other users see it in ps: prefer NEKOTUNE_UI_AUTH=USER:PASS")
    _rest(p)
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser("estimate", help="peak training memory before you train")
    _model(p, "model directory, config.json or hub id")
    p.add_argument("--fit", default=None, help="memory budget like 8GB (or auto) to fit settings into")
    p.add_argument("--json", action="store_true")
    _rest(p)
    p.set_defaults(func=cmd_estimate)

    p = sub.add_parser("doctor", help="check this machine")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_doctor)
    _localize_help(parser)
    return parser


def _localize_help(parser: argparse.ArgumentParser) -> None:
    """issue 15: the help in Chinese when the locale or NEKOTUNE_LANG says so (messages.HELP_ZH)."""
    from nekotune.messages import help_text, lang

    if lang() != "zh":
        return
    parser.description = help_text(parser.description or "") or None
    for action in parser._actions:  # argparse keeps no public list of its actions
        if action.help:
            action.help = help_text(action.help)
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                choice.help = help_text(choice.help or "")
            for sub in set(action.choices.values()):
                _localize_help(sub)


def _quiet_libraries() -> None:
    """Library deprecation chatter hides the messages a beginner needs to see."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*gradient checkpointing.*")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    _quiet_libraries()
    parser = build_parser()
    # Other tools' `--learning_rate 1e-4` / `--load_in_4bit` forms -> `learning_rate=1e-4` (issue 15)
    argv = _normalize_argv(sys.argv[1:] if argv is None else list(argv))
    # Overrides may follow options (`data check f.json --model m key=value`): argparse leaves
    # those as unknown, and they join the overrides here.
    args, unknown = parser.parse_known_args(argv)
    stray = [u for u in unknown if u.startswith("-") or "=" not in u]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if unknown:
        if not hasattr(args, "rest"):
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.rest = list(args.rest or []) + unknown
    if args.version:
        from nekotune import __version__

        print(__version__)
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else EXIT_USER
    from nekotune.commands.console import notes_to_stderr
    from nekotune.messages import label, localize

    try:
        with notes_to_stderr():
            return int(args.func(args) or 0)
    except UserError as exc:
        print(f"nekotune: {label('error')}: {localize(str(exc))}", file=sys.stderr)
        return EXIT_USER
    except KeyboardInterrupt:
        print(f"\nnekotune: {label('interrupted')}", file=sys.stderr)
        return EXIT_INTERRUPTED


def _normalize_argv(argv: list[str]) -> list[str]:
    from nekotune.aliases import normalize_argv
    from nekotune.config import all_keys

    return normalize_argv(argv, all_keys())


if __name__ == "__main__":
    raise SystemExit(main())
