"""`nekotune chat` (interactive, streaming, multi-turn), `nekotune ask` (one answer), and the
commands that print what predict, eval and compare wrote."""

from __future__ import annotations

import json
import sys
import threading
from typing import Any

from nekotune.commands.console import command, progress_bar
from nekotune.config import Config
from nekotune.data.formats import Conversation, Turn
from nekotune.data.image_rows import user_turn
from nekotune.engines.session import open_session
from nekotune.generate import GenSettings

HELP = """commands:
  /reset          forget the conversation
  /system TEXT    set the system prompt (and reset); /system alone shows it
  /set KEY VALUE  generation setting: max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed,
                  no_repeat_ngram_size
  /image FILE     attach an image to your next message (vision-language models)
  /help           this help
  /exit           quit (also `exit`, Ctrl-D)
Ctrl-C while the model writes stops that answer."""

SETTING_TYPES = {"max_new_tokens": int, "temperature": float, "top_p": float, "top_k": int,
                 "repetition_penalty": float, "seed": int, "no_repeat_ngram_size": int}


def _image_refs(paths: list[str] | None, where: str) -> list[Any]:
    """--image FILE / /image FILE (issue 17): relative to the current directory, checked now
    (header only) so a missing image fails before the model loads, naming the file."""
    from pathlib import Path

    from nekotune.data.images import ImageRef, image_size

    refs = [ImageRef(p, (Path.cwd(),)) for p in paths or []]
    for ref in refs:
        image_size(ref, where)
    return refs


def _needs_vision(session: Any, refs: list[Any]) -> None:
    from nekotune.engines.session import text_model_error

    if refs and not session.renderer.takes_images:
        raise text_model_error(session.label)


@command
def run_chat(cfg: Config, model_arg: str | None, system: str | None = None, stdin: Any = None,
             stdout: Any = None, images: list[str] | None = None) -> int:
    stdin = stdin or sys.stdin
    out = stdout or sys.stdout
    pending = _image_refs(images, "--image")  # checked before the model loads
    with open_session(cfg, model_arg, images=bool(pending)) as session:
        _needs_vision(session, pending)
        return _chat_loop(session, system, stdin, out, pending)


def _chat_loop(session: Any, system: str | None, stdin: Any, out: Any, pending: list[Any]) -> int:
    settings = session.settings()
    conv = Conversation(system=system)
    interactive = stdin.isatty()
    out.write(f"nekotune chat with {session.label}. /help for commands, /exit to quit.\n")
    out.flush()
    while True:
        try:
            if interactive:
                line = input("you> ")
            else:
                out.write("you> ")
                out.flush()
                line = stdin.readline()
                if not line:
                    raise EOFError
                line = line.rstrip("\n")
        except EOFError:
            out.write("\n")
            return 0
        except KeyboardInterrupt:
            out.write("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("exit", "quit", "/exit", "/quit"):
            return 0
        if text.startswith("/image"):
            pending += _attach(text, session, out)
            continue
        if text.startswith("/"):
            conv, settings = _slash(text, conv, settings, out)
            continue
        conv.turns.append(user_turn(text, pending))
        pending = []
        out.write("neko> ")
        out.flush()
        stop = threading.Event()
        pieces: list[str] = []
        try:
            for piece in session.stream(conv, settings, stop=stop):
                pieces.append(piece)
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            stop.set()
            out.write(" [stopped]")
        out.write("\n")
        out.flush()
        conv.turns.append(Turn("assistant", "".join(pieces).strip() or "..."))


def _attach(text: str, session: Any, out: Any) -> list[Any]:
    """`/image FILE`: a bad or missing image is one line, and the chat goes on."""
    from nekotune.errors import UserError

    path = text.partition(" ")[2].strip()
    try:
        if not path:
            raise UserError("/image needs a file: /image photo.jpg")
        refs = _image_refs([path], "/image")
        _needs_vision(session, refs)
    except UserError as exc:
        out.write(f"(not attached: {exc})\n")
        return []
    out.write(f"(image {path} attached to your next message)\n")
    return refs


def _slash(text: str, conv: Conversation, settings: GenSettings, out):
    cmd, _, arg = text.partition(" ")
    arg = arg.strip()
    if cmd == "/reset":
        out.write("(conversation reset)\n")
        return Conversation(system=conv.system), settings
    if cmd == "/system":
        if not arg:
            out.write(f"(system prompt: {conv.system or 'the template default'})\n")
            return conv, settings
        out.write("(system prompt set; conversation reset)\n")
        return Conversation(system=arg), settings
    if cmd == "/set":
        key, _, value = arg.partition(" ")
        if key not in SETTING_TYPES:
            out.write(f"(unknown setting {key!r}; one of {', '.join(SETTING_TYPES)})\n")
            return conv, settings
        try:
            new = GenSettings(**{**settings.__dict__, key: SETTING_TYPES[key](value)}).validated()
        except Exception as exc:  # a bad number or a value out of range
            out.write(f"(not set: {exc})\n")
            return conv, settings
        out.write(f"({key} = {getattr(new, key)})\n")
        return conv, new
    if cmd == "/help":
        out.write(HELP + "\n")
        return conv, settings
    out.write(f"(unknown command {cmd}; /help lists them)\n")
    return conv, settings


@command
def ask(cfg: Config, model_arg: str | None, question: str, as_json: bool = False, system: str | None = None,
        images: list[str] | None = None) -> int:
    from nekotune.errors import UserError

    if not question.strip():
        raise UserError("the question is empty; pass the question as one argument in quotes")
    refs = _image_refs(images, "--image")
    with open_session(cfg, model_arg, images=bool(refs)) as session:
        _needs_vision(session, refs)
        conv = Conversation(turns=[user_turn(question.strip(), refs)], system=system)
        answer = session.generate(conv, session.settings())
    if as_json:
        print(json.dumps({"model": session.label, "question": question, "answer": answer}, ensure_ascii=False))
    else:
        print(answer)
    return 0


@command
def predict_command(cfg: Config, model_arg: str | None, file: str, out: str, limit: int | None = None) -> int:
    from nekotune.api import predict

    with progress_bar(description="predict") as progress:
        done = predict(model_arg, file, out, cfg, limit=limit, progress=progress)
    print(f"{len(done.rows)} predictions written to {out}")
    return 0


@command
def eval_command(cfg: Config, model_arg: str | None, file: str, out_dir: str | None = None, baseline: bool = False,
                 limit: int | None = None, generate: bool = True) -> int:
    from nekotune.api import evaluate

    done = evaluate(model_arg, file, cfg, out=out_dir, baseline=baseline, limit=limit, generate=generate)
    print(done.summary)
    print(f"written: {done.json_path}, {done.summary_path}")
    return 0


@command
def compare_command(cfg: Config, models: list[str], prompts_file: str, out_dir: str, limit: int | None = None,
                    eval_file: str | None = None, names: list[str] | None = None) -> int:
    from nekotune.api import compare

    done = compare(models, prompts_file, out_dir, cfg, limit=limit, eval_file=eval_file, names=names)
    print(f"report: {done.html} and {done.markdown}")
    return 0
