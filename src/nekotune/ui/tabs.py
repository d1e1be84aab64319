"""The four tabs of the web UI: Train, Chat, Compare, Export. Each handler gathers the page's
values, calls the same library functions as the command line and shows what they return."""

from __future__ import annotations

import html
import os
import threading
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local tool
try:  # module level: gradio resolves the handlers' gr.Request annotations from here
    import gradio as gr
except ImportError:  # commands.ui says how to install it, before anything here runs
    gr = None  # type: ignore[assignment]
from typing import Any, Iterator

import nekotune.api as api  # noqa: E402
from nekotune.config import Config  # noqa: E402
from nekotune.errors import UserError  # noqa: E402
from nekotune.registry import GGUF_TYPES  # noqa: E402
from nekotune.ui.workspace import Workspace, t  # noqa: E402

DATA_FILE_TYPES = [".json", ".jsonl", ".csv", ".parquet", ".txt"]


# -- Train -----------------------------------------------------------------------------------
STATUS_WORDS = {"idle": t("idle", "空闲"), "starting": t("starting", "启动中"), "running": t("running", "训练中"),
                "stopping": t("stopping", "正在停止"), "finished": t("finished", "完成"),
                "stopped": t("stopped", "已停止"), "error": t("error", "出错")}


def training_config(ws: Workspace, model: str, data_path: str, system: str, r: float, alpha: float, lr: float,
                    epochs: float, max_steps: float, batch_size: float, max_seq_len: float, run_name: str) -> Config:
    from nekotune.config import deep_merge, validate

    if not (data_path or "").strip():
        raise UserError("choose a dataset file (a path, or upload one) / 请选择数据文件")
    values = {"model": {"name_or_path": (model or "").strip() or ws.cfg.model.name_or_path},
              "data": {"path": data_path.strip(), "system_prompt": system or None, "max_seq_len": int(max_seq_len)},
              "lora": {"r": int(r), "alpha": float(alpha)},
              "train": {"lr": float(lr), "epochs": float(epochs), "max_steps": int(max_steps),
                        "batch_size": int(batch_size), "logging_steps": 1},  # every step, for a live curve
              "output": {"run_name": (run_name or "").strip() or None, "sample_prompts": None}}
    cfg = validate(deep_merge(ws.cfg.to_dict(), values), "the Train tab")
    if cfg.output.run_name and not cfg.output.dir:  # a named run: new, empty, or an earlier run to train again
        from nekotune.io import claim_run_dir, inside_root

        key = t("Run name", "运行名称")
        claim_run_dir(inside_root(Path(cfg.output.root) / cfg.output.run_name, cfg.output.root, key), key)
    return cfg


def train_status(ws: Workspace) -> tuple[str, Any]:
    import pandas as pd

    s = ws.job.snapshot()
    losses = s["losses"]
    parts = [f"**{STATUS_WORDS.get(s['status'], s['status'])}**"]
    if s["max_steps"]:
        parts.append(f"{t('step', '步')} {s['step']}/{s['max_steps']}")
    if losses:
        parts.append(f"loss {losses[-1][1]:.4f}")
    if s["run"]:
        parts.append(f"`{s['run']}`")
    text = " · ".join(parts) + (f"\n\n{s['message']}" if s["message"] else "")
    # Typed columns even when empty: the plot picks numeric axes only from numeric dtypes.
    curve = pd.DataFrame({"step": pd.Series([p[0] for p in losses], dtype="int64"),
                          "loss": pd.Series([p[1] for p in losses], dtype="float64")})
    return text, curve


def start_training(ws: Workspace, *values: Any) -> tuple[str, Any]:
    try:
        ws.job.start(training_config(ws, *values))
    except UserError as exc:
        raise gr.Error(str(exc)) from None
    return train_status(ws)


def build_train_tab(ws: Workspace) -> None:
    cfg = ws.cfg
    with gr.Row():
        model = gr.Textbox(cfg.model.name_or_path, label=t("Base model (path, hub id or smollm2)", "基座模型"),
                           elem_id="train-model")
        data_path = gr.Textbox(cfg.data.path or "", label=t("Dataset file", "数据文件"), elem_id="train-data")
        upload = gr.UploadButton(t("Upload a dataset", "上传数据"), file_types=DATA_FILE_TYPES, type="filepath",
                                 scale=0, min_width=180)
    upload.upload(lambda f: f or "", upload, data_path)
    with gr.Row():
        r = gr.Number(cfg.lora.r, label="LoRA r", precision=0, elem_id="train-r")
        alpha = gr.Number(cfg.lora.alpha, label="LoRA alpha", elem_id="train-alpha")
        lr = gr.Number(cfg.train.lr, label=t("Learning rate", "学习率"), elem_id="train-lr")
        epochs = gr.Number(cfg.train.epochs, label=t("Epochs", "轮数"), elem_id="train-epochs")
        max_steps = gr.Number(cfg.train.max_steps, label=t("Max steps (-1: by epochs)", "最大步数"), precision=0,
                              elem_id="train-max-steps")
        batch = gr.Number(cfg.train.batch_size, label=t("Batch size", "批大小"), precision=0, elem_id="train-batch")
        seq = gr.Number(cfg.data.max_seq_len, label=t("Max sequence length", "最大长度"), precision=0,
                        elem_id="train-seq")
    with gr.Row():
        system = gr.Textbox(cfg.data.system_prompt or "", label=t("System prompt (optional)", "系统提示词（可选）"))
        run_name = gr.Textbox("", label=t("Run name (optional)", "运行名称（可选）"))
    with gr.Row():
        start = gr.Button(t("Start training", "开始训练"), variant="primary", elem_id="train-start")
        stop = gr.Button(t("Stop", "停止"), variant="stop", elem_id="train-stop")
    status = gr.Markdown(train_status(ws)[0], elem_id="train-status")
    plot = gr.LinePlot(train_status(ws)[1], x="step", y="loss", title=t("Training loss", "训练损失"),
                       elem_id="loss-plot", height=300)
    inputs = [model, data_path, system, r, alpha, lr, epochs, max_steps, batch, seq, run_name]
    start.click(lambda *v: start_training(ws, *v), inputs, [status, plot])
    def stop_training():
        ws.job.stop()
        return train_status(ws)

    stop.click(stop_training, None, [status, plot])
    gr.Timer(1.0).tick(lambda: train_status(ws), None, [status, plot], show_progress="hidden")


# -- Chat ------------------------------------------------------------------------------------
def _text(content) -> str:
    """Gradio hands message content back as a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return str(content or "")


def _uploaded(path: Any) -> str | None:
    """A file Gradio uploaded into its own cache; anything else (a path a client typed into the
    history it sends back) is not read (issue 17)."""
    from gradio.utils import get_upload_folder

    if not isinstance(path, str) or not path:
        return None
    real = Path(path).resolve()
    return str(real) if real.is_relative_to(Path(get_upload_folder()).resolve()) and real.is_file() else None


def _images(content) -> list[str]:
    """The uploaded images of one chat message (file parts, in order)."""
    parts = content if isinstance(content, list) else [content]
    paths = [(p.get("file") or {}).get("path") if p.get("type") == "file" else p.get("path")
             for p in parts if isinstance(p, dict)]
    return [ok for ok in map(_uploaded, paths) if ok]


def _turns(history: list) -> list:
    """The chat so far as Turns, each user turn with the images it was sent with."""
    from nekotune.data.formats import Turn
    from nekotune.data.image_rows import user_turn

    turns = []
    for m in history or []:
        if m["role"] == "user":
            turns.append(user_turn(_text(m["content"]), _images(m["content"])))
        elif m["role"] == "assistant":
            turns.append(Turn("assistant", _text(m["content"])))
    return turns


def _settings(loaded, temperature, max_new_tokens, top_p, top_k, repetition_penalty):
    from nekotune.generate import GenSettings

    return GenSettings.from_config(loaded.cfg.generate, temperature=float(temperature),
                                   max_new_tokens=int(max_new_tokens), top_p=float(top_p), top_k=int(top_k),
                                   repetition_penalty=float(repetition_penalty))


def _shown(text: str, images: list[str]) -> Any:
    return [*({"path": p} for p in images), text] if images else text


def chat_reply(ws: Workspace, message: str, history: list, model: str, system: str, temperature: float,
               max_new_tokens: float, top_p: float, top_k: float, repetition_penalty: float, request: Any,
               image: str | None = None) -> Iterator[tuple[list, str]]:
    """Stream the answer into the chat, one piece at a time. `image`: an uploaded image for this
    message (vision-language models); earlier turns keep theirs."""
    from nekotune.data.formats import Conversation
    from nekotune.data.image_rows import user_turn
    from nekotune.generate import stream

    if not (message or "").strip():
        yield history, message
        return
    images = [ok for ok in [_uploaded(image)] if ok]
    try:
        loaded = ws.cache.get(model or ws.default_model)
        settings = _settings(loaded, temperature, max_new_tokens, top_p, top_k, repetition_penalty)
        conv = Conversation(turns=_turns(history) + [user_turn(message, images)], system=system or None)
        if conv.images and not loaded.renderer.takes_images:
            raise UserError(f"{loaded.spec.label} is a text model; images need a vision-language model")
        inputs = loaded.renderer.prompt_inputs(conv)  # a bad image is an error here, before the reply
    except UserError as exc:
        raise gr.Error(str(exc)) from None
    stop = ws.chat_stops[request.session_hash] = threading.Event()
    shown = [{"role": m["role"], "content": _shown(_text(m["content"]), _images(m["content"]))}
             for m in history or []]
    shown += [{"role": "user", "content": _shown(message, images)}, {"role": "assistant", "content": ""}]
    yield shown, ""
    answer = ""
    for piece in stream(loaded.model, loaded.renderer, conv, settings, stop=stop, inputs=inputs):
        answer += piece
        shown[-1]["content"] = answer.lstrip()
        yield shown, ""


def stop_chat(ws: Workspace, request: Any) -> None:
    event = ws.chat_stops.get(request.session_hash)
    if event is not None:
        event.set()


def build_chat_tab(ws: Workspace) -> dict:
    g = ws.cfg.generate
    with gr.Row():
        model = gr.Dropdown(ws.model_choices(), value=ws.default_model, allow_custom_value=True, scale=4,
                            label=t("Model or adapter (runs in outputs/)", "模型或适配器（outputs/ 中的运行）"),
                            elem_id="chat-model")
        refresh = gr.Button(t("Refresh list", "刷新列表"), scale=1, elem_id="chat-refresh")
    system = gr.Textbox("", label=t("System prompt (empty: the run's own)", "系统提示词（留空：使用训练时的）"),
                        elem_id="chat-system")
    with gr.Accordion(t("Generation settings", "生成设置"), open=False):
        with gr.Row():
            temperature = gr.Slider(0, 2, g.temperature, step=0.05, label=t("Temperature", "温度"))
            max_new = gr.Slider(1, 2048, g.max_new_tokens, step=1, label=t("Max new tokens", "最大生成长度"))
            top_p = gr.Slider(0.05, 1, g.top_p, step=0.05, label="top_p")
            top_k = gr.Slider(0, 200, g.top_k, step=1, label="top_k")
            rep = gr.Slider(0.8, 2, g.repetition_penalty, step=0.05, label=t("Repetition penalty", "重复惩罚"))
    chatbot = gr.Chatbot(label=t("Chat", "对话"), elem_id="chatbot", height=420)
    with gr.Row():
        message = gr.Textbox(placeholder=t("Say something and press Enter", "输入消息后按回车"), show_label=False,
                             scale=6, elem_id="chat-input")
        send = gr.Button(t("Send", "发送"), variant="primary", scale=1, elem_id="chat-send")
        stop = gr.Button(t("Stop", "停止"), scale=1, elem_id="chat-stop")
        clear = gr.Button(t("Clear", "清空"), scale=1)
    # issue 17: an image for the next message (vision-language models); bounded like a data image
    image = gr.Image(type="filepath", sources=["upload"],
                     label=t("Image (vision-language models)", "图片（视觉语言模型）"),
                     elem_id="chat-image", height=160)

    def reply(msg, history, m, s, temp, mx, tp, tk, rp, img, request: gr.Request):
        yield from chat_reply(ws, msg, history, m, s, temp, mx, tp, tk, rp, request, image=img)

    def halt(request: gr.Request):
        stop_chat(ws, request)

    inputs = [message, chatbot, model, system, temperature, max_new, top_p, top_k, rep, image]
    for event in (message.submit, send.click):  # the image goes with one message: cleared after it
        event(reply, inputs, [chatbot, message]).then(lambda: None, None, image)
    stop.click(halt, None, None)
    clear.click(lambda: [], None, chatbot)
    return {"model": model, "refresh": refresh}


# -- Compare ---------------------------------------------------------------------------------
def compare_table(prompt: str, answers: dict[str, str]) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(Path(m).name or m)}</th>" for m in answers)
    cells = "".join(f"<td style='white-space:pre-wrap;vertical-align:top'>{esc(a)}</td>" for a in answers.values())
    return (f"<p><b>{esc(prompt)}</b></p><table id='compare-table' style='width:100%;table-layout:fixed'>"
            f"<tr>{head}</tr><tr>{cells}</tr></table>")


def compare_models(ws: Workspace, prompt: Any, models: Any, system: Any, max_new_tokens: Any) -> Iterator[str]:
    """Greedy answers, one model after the other, shown as each arrives."""
    from nekotune.data.formats import Conversation, Turn
    from nekotune.generate import GenSettings, generate

    if not (prompt or "").strip() or not models:
        raise gr.Error(t("write a prompt and pick at least one model", "请输入问题并至少选择一个模型"))
    answers = {m: "…" for m in models}
    yield compare_table(prompt, answers)
    for m in models:
        try:
            loaded = ws.cache.get(m)
            settings = GenSettings.from_config(loaded.cfg.generate, temperature=0.0, max_new_tokens=int(max_new_tokens))
            conv = Conversation(turns=[Turn("user", prompt)], system=system or None)
            answers[m] = generate(loaded.model, loaded.renderer, conv, settings)
        except UserError as exc:
            answers[m] = f"[{t('error', '出错')}] {exc}"
        yield compare_table(prompt, answers)


def build_compare_tab(ws: Workspace) -> dict:
    prompt = gr.Textbox(label=t("Prompt", "问题"), lines=2, elem_id="compare-prompt")
    models = gr.CheckboxGroup(ws.model_choices(), value=[ws.default_model], label=t("Models", "模型"),
                              elem_id="compare-models")
    with gr.Row():
        system = gr.Textbox("", label=t("System prompt (empty: each run's own)", "系统提示词（留空：各自训练时的）"))
        max_new = gr.Slider(1, 1024, min(ws.cfg.generate.max_new_tokens, 256), step=1,
                            label=t("Max new tokens", "最大生成长度"))
    run = gr.Button(t("Compare (greedy)", "对比（贪心解码）"), variant="primary", elem_id="compare-run")
    out = gr.HTML(elem_id="compare-out")
    def compare(*values):
        yield from compare_models(ws, *values)

    run.click(compare, [prompt, models, system, max_new], out)
    return {"models": models}


# -- Export ----------------------------------------------------------------------------------
def default_export_path(model: str, action: str, gguf_type: str, root: str | Path = "outputs") -> Path:
    """Next to the run, never inside it: an export may not write into what it reads."""
    name = Path(str(model).rstrip("/\\")).name or "model"
    names = {"merge": f"{name}-merged", "gguf": f"{name}-{gguf_type}.gguf", "ollama": f"{name}-ollama"}
    return Path(root) / names[action]


def export_path(ws: Workspace, out: str | None, model: str, action: str, gguf_type: str) -> Path:
    """The page writes only under output.root: a relative path is taken inside it."""
    from nekotune.io import inside_root

    root = ws.cfg.output.root
    out = (out or "").strip()
    if not out:
        path = default_export_path(model, action, gguf_type, root)
    else:
        path = Path(out).expanduser()
        if not path.is_absolute() and not path.resolve().is_relative_to(Path(root).resolve()):
            path = Path(root) / path
    return inside_root(path, root, t("Output path", "输出路径"))


def run_export(ws: Workspace, model: Any, action: Any, gguf_type: Any, dtype: Any, low_memory: Any, out: Any) -> str:
    """The same functions as `nekotune merge` / `nekotune export gguf|ollama` (nekotune.api)."""
    if not model:
        raise gr.Error(t("pick a run to export", "请选择要导出的运行"))
    try:
        out = str(export_path(ws, out, model, action, gguf_type))
    except UserError as exc:
        raise gr.Error(str(exc)) from None
    started = time.time()
    try:
        if action == "merge":
            written = api.merge(model, out, ws.cfg, low_memory=bool(low_memory),
                                dtype=None if dtype == "auto" else dtype).out
        elif action == "gguf":
            written = api.export_gguf(model, out, gguf_type, ws.cfg).path
        else:
            written = api.export_ollama(model, out, gguf_type, ws.cfg).export.path
    except UserError as exc:
        raise gr.Error(str(exc)) from None
    written = Path(written or out)
    files = sorted(p.name for p in written.iterdir()) if written.is_dir() else [written.name]
    return (f"**{t('done', '完成')}** ({time.time() - started:.0f}s): `{written}`\n\n"
            + "\n".join(f"- {name}" for name in files))


def build_export_tab(ws: Workspace) -> dict:
    runs = ws.run_choices()
    model = gr.Dropdown(runs, value=runs[0][1] if runs else None, allow_custom_value=True,
                        label=t("Run to export", "要导出的运行"), elem_id="export-model")
    with gr.Row():
        action = gr.Radio([(t("Merge (HF safetensors)", "合并（HF 格式）"), "merge"), ("GGUF", "gguf"),
                           (t("Ollama (GGUF + Modelfile)", "Ollama（GGUF + Modelfile）"), "ollama")],
                          value="gguf", label=t("What", "导出内容"))
        gguf_type = gr.Dropdown(list(GGUF_TYPES), value="q8_0", label=t("GGUF type", "GGUF 量化类型"))
        dtype = gr.Dropdown(["auto", "fp32", "bf16", "fp16"], value="auto", label=t("Merge dtype", "合并精度"))
        low_memory = gr.Checkbox(False, label=t("Low memory (shard by shard)", "低内存（逐分片）"))
    root = ws.cfg.output.root
    out = gr.Textbox("", label=t(f"Output path inside {root}/ (empty: <run>-merged, <run>-<type>.gguf, <run>-ollama)",
                                 f"输出路径，须在 {root}/ 内"
                                 f"（留空：<运行>-merged、<运行>-<类型>.gguf、<运行>-ollama）"))
    run = gr.Button(t("Export", "导出"), variant="primary")
    log = gr.Markdown()
    run.click(lambda *v: run_export(ws, *v), [model, action, gguf_type, dtype, low_memory, out], log)
    return {"model": model}
