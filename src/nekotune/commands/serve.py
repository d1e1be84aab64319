"""`nekotune serve` and `nekotune ui`: check the flags, load, print where to connect, run the server."""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

from nekotune.commands.console import command
from nekotune.config import Config
from nekotune.errors import UserError
from nekotune.serve.api import create_app
from nekotune.serve.guard import host_policy
from nekotune.serve.pool import load_pool, parse_adapter_args

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _check_port_free(host: str, port: int) -> None:
    """Say so before a minute of model loading, not after."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise UserError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port "
                            f"or stop what uses it") from None


def _model_arg(args) -> str | None:
    pos, opt = getattr(args, "model_pos", None), getattr(args, "model", None)
    if pos and opt and pos != opt:
        raise UserError(f"two models given ({pos} and --model {opt}); give one")
    return pos or opt


# -- issue 19: the engine that serves ---------------------------------------------------------
def _serving_engine(cfg: Config, model_arg: str | None) -> str:
    """generate.engine (--engine) for serving; the pick is a note on stderr."""
    from nekotune.engines.session import choose, note
    from nekotune.model import resolve_source

    try:
        source, effective = resolve_source(cfg, model_arg)
    except UserError:
        if cfg.generate.engine != "auto":
            raise
        return "transformers"  # its loader says what is wrong with --model, as before
    choice = choose(effective, source, serving=True, lora=True)
    note(choice)
    return choice.name


def _vllm_launch(cfg: Config, args: Any, adapters, api_key, cors, executable: str | None = None):
    from nekotune.engines.vllm import vllm_launch

    return vllm_launch(cfg, _model_arg(args), adapters, host=args.host, port=args.port, api_key=api_key,
                       allow_hosts=args.allow_host, cors=cors, max_concurrency=args.max_concurrency,
                       executable=executable)


def _serve_vllm(cfg: Config, args: Any, adapters, api_key, cors) -> int:
    from nekotune.engines.choose import vllm_executable
    from nekotune.engines.vllm import run_vllm

    launch = _vllm_launch(cfg, args, adapters, api_key, cors, executable=vllm_executable())
    print(f"nekotune serve: starting vLLM's server:\n  {launch.shell()}\n"
          f"  OpenAI base URL: http://{args.host}:{args.port}/v1{'  (API key required)' if api_key else ''}",
          flush=True)
    return run_vllm(launch)


def _print_vllm_equivalent(cfg: Config, args: Any, adapters, api_key, cors) -> None:
    """The `vllm serve` command that serves the same, for a GPU machine (never fails the serve)."""
    try:
        launch = _vllm_launch(cfg, args, adapters, api_key, cors)
    except UserError as exc:
        print(f"  (no vllm equivalent: {exc})", flush=True)
        return
    print(f"  on a GPU, vLLM serves the same: {launch.shell()}", flush=True)


@command
def serve_command(cfg: Config, args: Any) -> int:
    import uvicorn


    api_key = args.api_key or os.environ.get("NEKOTUNE_API_KEY") or None
    cors = [o.strip() for o in (args.cors or "").split(",") if o.strip()] or None
    adapters = parse_adapter_args(args.adapter)
    if args.max_concurrency < 1 or args.max_tokens_cap < 1 or args.max_body < 1 or args.max_queue < 0:
        raise UserError("--max-concurrency, --max-tokens-cap and --max-body must be at least 1, "
                        "--max-queue at least 0")
    host_policy(args.host, args.allow_host, cors or [])  # a bad --allow-host is refused before loading
    _check_port_free(args.host, args.port)
    engine = _serving_engine(cfg, _model_arg(args))
    if engine == "vllm":
        return _serve_vllm(cfg, args, adapters, api_key, cors or [])
    if engine == "llama.cpp":
        from nekotune.engines.serve_pool import load_llamacpp_pool

        pool = load_llamacpp_pool(cfg, _model_arg(args), adapters)
        print(f"nekotune serve: {pool.engine.describe()}", file=sys.stderr)
    else:
        pool = load_pool(cfg, _model_arg(args), adapters, allow_remote_images=args.allow_remote_images)
    app = create_app(pool, api_key=api_key, max_concurrency=args.max_concurrency,
                     max_tokens_cap=args.max_tokens_cap, cors_origins=cors, host=args.host,
                     allow_hosts=args.allow_host, max_body=args.max_body, max_queue=args.max_queue)
    if args.api_key:
        print("nekotune serve: note: --api-key is visible to every user of this machine (ps, shell history); "
              "set NEKOTUNE_API_KEY instead", file=sys.stderr)
    if not api_key and args.host not in LOOPBACK:
        print(f"nekotune serve: warning: listening on {args.host} without an API key; anyone who can reach "
              f"this port can use it (set NEKOTUNE_API_KEY)", file=sys.stderr)
    print(f"nekotune serve: models {', '.join(pool.names)} (context {pool.context_length} tokens)\n"
          f"  OpenAI base URL: http://{args.host}:{args.port}/v1"
          f"{'  (API key required)' if api_key else ''}", flush=True)
    _print_vllm_equivalent(cfg, args, adapters, api_key, cors or [])
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
