"""`nekotune ui`: check the flags, say where the page is, serve it."""

from __future__ import annotations

import os
from typing import Any

from nekotune.commands.console import command
from nekotune.config import Config
from nekotune.errors import UserError


@command
def ui_command(cfg: Config, args: Any) -> int:
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        raise UserError("the web UI needs gradio: pip install 'nekotune[ui]' (or pip install gradio)")
    from nekotune.serve.guard import host_policy
    from nekotune.ui.app import build_app, launch, parse_auth

    auth = parse_auth(args.auth or os.environ.get("NEKOTUNE_UI_AUTH"))
    host_policy(args.host, args.allow_host)  # a bad --allow-host is refused before anything starts
    if args.auth:
        print("nekotune ui: note: --auth is visible to every user of this machine (ps, shell history); "
              "set NEKOTUNE_UI_AUTH instead", flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1") and auth is None:
        print(f"nekotune ui: warning: listening on {args.host} without a login (--auth / NEKOTUNE_UI_AUTH); "
              f"anyone who can reach this port can train and write files on this machine", flush=True)
    app = build_app(cfg, getattr(args, "model", None))
    print(f"nekotune ui: http://{args.host}:{args.port}", flush=True)
    launch(app, args.host, args.port, block=True, allow_hosts=args.allow_host, auth=auth)
    return 0
