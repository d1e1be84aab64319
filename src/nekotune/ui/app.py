"""`nekotune ui`: a Gradio web UI over the same functions as the command line.

Train runs nekotune.training.train in a thread (stopped through its stop_flag, watched through a
TrainerCallback); Chat streams from nekotune.generate.stream; Compare asks several models the
same question; Export calls the merge/GGUF/Ollama commands. The UI only gathers settings and
shows results: no stage is re-implemented here, so the UI trains and answers exactly as the CLI.
The tabs are in tabs.py, what they share in workspace.py; commands/ui.py starts it.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local tool
try:  # module level: gradio resolves the handlers' gr.Request annotations from here
    import gradio as gr
except ImportError:  # commands.ui says how to install it, before anything here runs
    gr = None  # type: ignore[assignment]

from nekotune.errors import UserError  # noqa: E402
from nekotune.ui.tabs import build_chat_tab, build_compare_tab, build_export_tab, build_train_tab  # noqa: E402
from nekotune.ui.workspace import Workspace, t  # noqa: E402

CSS = "footer {display: none !important} #train-status {min-height: 3em}"


# -- the app ---------------------------------------------------------------------------------
def build_app(cfg: Any, model_arg: str | None = None) -> Any:
    """The Blocks app; `launch` serves it."""
    ws = Workspace(cfg, model_arg)
    with gr.Blocks(title="nekotune", analytics_enabled=False) as app:
        gr.Markdown(f"# nekotune · {t('LoRA fine-tuning', 'LoRA 微调')}")
        with gr.Tab(t("Train", "训练"), id="train"):
            build_train_tab(ws)
        with gr.Tab(t("Chat", "对话"), id="chat"):
            chat = build_chat_tab(ws)
        with gr.Tab(t("Compare", "对比"), id="compare"):
            compare = build_compare_tab(ws)
        with gr.Tab(t("Export", "导出"), id="export"):
            export = build_export_tab(ws)

        def refresh_lists():
            choices = ws.model_choices()
            return gr.update(choices=choices), gr.update(choices=choices), gr.update(choices=ws.run_choices())

        chat["refresh"].click(refresh_lists, None, [chat["model"], compare["models"], export["model"]])
    app.workspace = ws
    return app


def theme() -> Any:
    # System fonts: the default theme would fetch web fonts, and the UI must work offline.
    return gr.themes.Soft(font=["ui-sans-serif", "system-ui", "Noto Sans CJK SC", "sans-serif"],
                          font_mono=["ui-monospace", "monospace"])


def private_events(app: Any) -> None:
    """No event of this page is a public API endpoint.

    The page itself calls its events through Gradio's queue; marked private, they are left out
    of /gradio_api/info and the "Use via API" page, and gradio_client will not call them. Done
    here for every event at once, so one added later (train, export, upload: they start work and
    write files) cannot be forgotten. The real guard is the Host/Origin check and --auth.
    """
    for fn in app.fns.values():
        fn.api_visibility = "private"


def parse_auth(value: str | None) -> tuple[str, str] | None:
    """`--auth USER:PASS` (or NEKOTUNE_UI_AUTH) -> Gradio's (user, password)."""
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise UserError("--auth / NEKOTUNE_UI_AUTH: write USER:PASS, e.g. NEKOTUNE_UI_AUTH=neko:a-long-password")
    return user, password


def launch(app: Any, host: str = "127.0.0.1", port: int = 7860, block: bool = True, allow_hosts: Iterable[str] = (),
           auth: tuple[str, str] | None = None) -> Any:
    from starlette.middleware import Middleware

    from nekotune.data.images import DATA_POLICY
    from nekotune.serve.guard import HostGuard, host_policy

    private_events(app)
    # Gradio's own FastAPI app takes the Host/Origin guard as its outermost user middleware.
    # No SSR (a Node server in front would not be guarded), no MCP server, no share link; the
    # REST routes that skip the queue are closed (api_open=False).
    guard = Middleware(HostGuard, policy=host_policy(host, allow_hosts))
    return app.queue(api_open=False).launch(
        server_name=host, server_port=port, prevent_thread_lock=not block, share=False, inbrowser=False,
        quiet=not block, theme=theme(), css=CSS, footer_links=[], auth=auth, ssr_mode=False, mcp_server=False,
        strict_cors=True, app_kwargs={"middleware": [guard]},
        max_file_size=DATA_POLICY.max_bytes)  # uploads (chat images) bounded like dataset images
