"""Issue 17 end to end through the real CLI, config and recipe on tiny random Qwen3-VL and Qwen2-VL:
data check, LoRA training on both data shapes with the exact label masks of the batches the
Trainer saw, ask --image, chat /image, a missing image, estimate, the server's image_url and the
UI's image chat."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
from transformers import TrainerCallback
from vision_fixtures import build_tiny_vlm, noise_image, save_image

from conftest import tiny_overrides
from nekotune.cli import main
from nekotune.config import load_config
from nekotune.data.render import IGNORE

ARCHS = ["qwen3_vl", "qwen2_vl"]
ANSWERS = ["A red square.", "Two images.", "Blue noise, mostly.", "A cat in the dark."]


@pytest.fixture(scope="module")
def vlm_dirs(smol_dir, tmp_path_factory):
    return {a: build_tiny_vlm(a, smol_dir, tmp_path_factory.mktemp(a)) for a in ARCHS}


def image_data(root: Path) -> Path:
    """One folder, both shapes: LLaMA-Factory rows (<image> + images) and OpenAI/TRL content parts;
    image paths relative to each file."""
    for i, (h, w) in enumerate([(64, 48), (90, 120), (48, 64), (100, 70)]):
        save_image(noise_image(h, w, seed=i), root / "img" / f"{i}.png")
    lf = [{"messages": [{"role": "user", "content": "<image>What is it?"}, {"role": "assistant", "content": ANSWERS[0]}],
           "images": ["img/0.png"]},
          {"messages": [{"role": "user", "content": "<image>And <image>?"}, {"role": "assistant", "content": ANSWERS[1]}],
           "images": ["img/1.png", "img/2.png"]}]
    parts = [{"messages": [{"role": "user", "content": [{"type": "image", "image": "img/2.png"},
                                                         {"type": "text", "text": "Describe."}]},
                           {"role": "assistant", "content": ANSWERS[2]}]},
             {"messages": [{"role": "user", "content": [{"type": "text", "text": "Who? "},
                                                         {"type": "image", "image": "img/3.png"}]},
                           {"role": "assistant", "content": ANSWERS[3]}]}]
    (root / "a_llamafactory.json").write_text(json.dumps(lf))
    (root / "b_parts.json").write_text(json.dumps(parts))
    return root


class Batches(TrainerCallback):
    """Every batch of the run's own DataLoader (the recipe's dataset and collator), read at the start."""

    def __init__(self):
        self.batches = []

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self.batches = list(train_dataloader)


@pytest.fixture(scope="module", params=ARCHS)
def vlm_run(request, vlm_dirs, tmp_path_factory):
    from nekotune.training import train

    arch = request.param
    root = tmp_path_factory.mktemp(f"data-{arch}")
    data = image_data(root / "data")
    cfg = load_config(None, tiny_overrides(vlm_dirs[arch], data, root / "run", **{
        "data.max_seq_len": 256, "train.max_steps": 2, "train.batch_size": 2, "train.save_steps": 2,
        "data.shuffle": "false"}), default_to_demo=False)
    seen = Batches()
    run = train(cfg, show_progress=False, callbacks=[seen])
    return arch, run, data, seen.batches, vlm_dirs[arch]


def test_training_label_masks_are_exact_and_no_image_token_trained(vlm_run):
    from transformers import AutoTokenizer

    arch, run, _, batches, base = vlm_run
    tok = AutoTokenizer.from_pretrained(base)
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    vision = {tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>")}
    trained_runs, images = [], 0
    for batch in batches:
        ids, labels = batch["input_ids"], batch["labels"]
        assert batch["mm_token_type_ids"].tolist() == (ids == image_id).long().tolist()  # always sent
        assert "pixel_values" in batch and batch["image_grid_thw"].shape[1] == 3
        assert batch["position_ids"].shape[0] == 4  # packed: per-example M-RoPE rows, not 2-D positions
        images += batch["image_grid_thw"].shape[0]
        for row_ids, row_labels in zip(ids.tolist(), labels.tolist()):
            assert not any(lab in vision for lab in row_labels)
            assert all(lab == IGNORE for i, lab in zip(row_ids, row_labels) if i in vision)
            run_ids: list[int] = []
            for i, lab in zip(row_ids, row_labels):
                if lab != IGNORE:
                    assert lab == i
                    run_ids.append(i)
                elif run_ids:
                    trained_runs.append(tok.decode(run_ids))
                    run_ids = []
            if run_ids:
                trained_runs.append(tok.decode(run_ids))
    assert images == 5
    assert sorted(trained_runs) == sorted(a + "<|im_end|>" for a in ANSWERS)
    stats = json.loads((run / "run.json").read_text())
    assert "images" in json.dumps(stats)


def test_run_adapter_is_language_model_only_and_loads_as_vlm(vlm_run):
    arch, run, _, _, _ = vlm_run
    adapter = run / "adapter"
    conf = json.loads((adapter / "adapter_config.json").read_text())
    assert "language_model" in str(conf["target_modules"]) and "visual" not in str(conf["target_modules"])
    assert (adapter / "preprocessor_config.json").is_file()
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not any("visual" in k for k in keys)


def test_data_check_reports_images(vlm_run, capsys):
    arch, _, data, _, base = vlm_run
    rc = main(["data", "check", str(data), "--model", str(base), "data.max_seq_len=256"])
    out = capsys.readouterr().out
    assert rc == 0, out
    line = next(ln for ln in out.splitlines() if ln.startswith("images:"))
    assert "5 in 4 rows (at most 2 per row)" in line and "image tokens:" in line


def test_ask_with_an_image(vlm_run, capsys, tmp_path):
    arch, run, data, _, _ = vlm_run
    rc = main(["ask", "What is it?", "--model", str(run), "--image", str(data / "img" / "0.png"), "--json",
               "generate.max_new_tokens=4", "generate.temperature=0"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert json.loads(out.out)["question"] == "What is it?"
    rc = main(["ask", "What is it?", "--model", str(run), "--image", str(tmp_path / "nope.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "nope.png" in err[0] and "not found" in err[0]


def test_missing_image_in_data_is_one_line_naming_it(vlm_dirs, tmp_path, capsys):
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"messages": [{"role": "user", "content": "<image>hi"},
                                              {"role": "assistant", "content": "ok"}], "images": ["gone.jpg"]}]))
    rc = main(["train", *tiny_overrides(vlm_dirs["qwen3_vl"], data, tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "d.json row 1" in err[0] and "gone.jpg" in err[0] and "Traceback" not in err[0]


def test_text_model_refuses_image_rows_and_images(tiny_llama, tmp_path, capsys):
    save_image(noise_image(32, 32), tmp_path / "x.png")
    rc = main(["ask", "hi", "--model", str(tiny_llama), "--image", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "vision-language" in err[0]


def test_chat_image_command(vlm_run):
    from nekotune.commands.chat import run_chat

    arch, run, data, _, _ = vlm_run
    img = data / "img" / "1.png"
    stdin = io.StringIO(f"/image {img}\nWhat is it?\n/image missing.png\n/exit\n")
    out = io.StringIO()
    cfg = load_config(None, ["generate.max_new_tokens=3", "generate.temperature=0"], default_to_demo=False)
    assert run_chat(cfg, str(run), stdin=stdin, stdout=out) == 0
    text = out.getvalue()
    assert f"(image {img} attached" in text and "neko> " in text
    assert "(not attached:" in text and "missing.png" in text


def _data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def test_estimate_counts_image_tokens_and_the_vision_tower(vlm_dirs, tmp_path, capsys):
    from nekotune.data.images import image_tokens
    from nekotune.model.processor import load_processor

    base = vlm_dirs["qwen3_vl"]
    yml = tmp_path / "vl.yaml"
    yml.write_text(f"model: {{name_or_path: {base}}}\ndata: {{max_seq_len: 512}}\ntrain: {{batch_size: 2}}\n"
                   "image_max_pixels: 65536\n")  # LLaMA-Factory's name, 256 tokens at patch 16 x merge 2
    assert main(["estimate", str(yml), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    vision = result["vision"]
    ip = load_processor(str(base), max_pixels=65536).image_processor
    assert vision["max_pixels"] == 65536 and vision["max_tokens_per_image"] == 64 == image_tokens(ip, 256, 256)
    assert vision["vision_params"] > 0 and vision["images_per_micro_batch"] == 2
    items = result["estimate"]["items_mb"]
    assert items["vision tower weights"] > 0 and items["vision tower activations"] > 0
    assert main(["estimate", str(yml), "lora.vision=true", "--json"]) == 0
    trained = json.loads(capsys.readouterr().out)["estimate"]["items_mb"]
    assert trained["vision tower activations"] > items["vision tower activations"]
    assert "vision LoRA weights + grads + AdamW (fp32)" in trained
    assert main(["estimate", str(yml)]) == 0
    assert "images (qwen3_vl): at most 64 tokens per image" in capsys.readouterr().out


def _client(pool):
    from fastapi.testclient import TestClient

    from nekotune.serve.api import create_app

    return TestClient(create_app(pool, max_tokens_cap=4), base_url="http://127.0.0.1:8000",
                      raise_server_exceptions=False)


def _image_message(url: str, text: str = "What is it?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


def test_server_image_url_request(vlm_run, tmp_path, tiny_llama):
    from nekotune.serve.pool import load_pool

    arch, run, data, _, _ = vlm_run
    cfg = load_config(None, [], default_to_demo=False)
    pool = load_pool(cfg, str(run), [])
    img = data / "img" / "1.png"
    with _client(pool) as api:
        name = pool.names[-1]
        body = {"model": name, "messages": _image_message(_data_url(img)), "max_tokens": 3, "temperature": 0}
        r = api.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        with_image = r.json()["usage"]["prompt_tokens"]
        text_only = api.post("/v1/chat/completions", json={**body, "messages": [
            {"role": "user", "content": "What is it?"}]}).json()["usage"]["prompt_tokens"]
        from PIL import Image

        from nekotune.data.images import image_tokens

        width, height = Image.open(img).size
        expected = image_tokens(pool.get(name).renderer.image_processor, height, width)
        assert with_image - text_only == expected + 2  # the image's pads + vision start/end
        again = api.post("/v1/chat/completions", json=body).json()
        assert again["choices"][0]["message"]["content"] == r.json()["choices"][0]["message"]["content"]
        bad = {
            "data:image/png;base64,@@@@": "base64",
            str(img): "local file",
            "https://example.com/cat.png": "remote image URLs are off",
            "data:text/plain;base64," + base64.b64encode(b"hello").decode(): "not an image",
        }
        for url, needle in bad.items():
            r = api.post("/v1/chat/completions", json={**body, "messages": _image_message(url)})
            assert r.status_code == 400 and needle in r.json()["error"]["message"], (url, r.text)
        many = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(img)}}] * 9}]
        assert api.post("/v1/chat/completions", json={**body, "messages": many}).status_code == 400
        sys_image = [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": _data_url(img)}}]},
                     {"role": "user", "content": "hi"}]
        assert api.post("/v1/chat/completions", json={**body, "messages": sys_image}).status_code == 400
    text_pool = load_pool(cfg, str(tiny_llama), [])
    with _client(text_pool) as api:
        r = api.post("/v1/chat/completions", json={"model": text_pool.names[0], "max_tokens": 2,
                                                   "messages": _image_message(_data_url(img))})
        assert r.status_code == 400 and "text model" in r.json()["error"]["message"]


def test_ui_image_chat(vlm_run, monkeypatch):
    """The Chat tab's handler with an uploaded image: the model gets its pixels, the chat shows it,
    and the next message keeps it in the history; a path outside Gradio's uploads is never read."""
    import shutil
    from types import SimpleNamespace

    from gradio.utils import get_upload_folder

    import nekotune.generate as gen
    from nekotune.ui.tabs import chat_reply
    from nekotune.ui.workspace import Workspace

    arch, run, data, _, _ = vlm_run
    upload = Path(get_upload_folder()) / f"nekotune-test-{arch}"
    upload.mkdir(parents=True, exist_ok=True)
    img = Path(shutil.copy(data / "img" / "0.png", upload / "0.png"))
    seen = []
    real_stream = gen.stream

    def recording(model, renderer, conv, settings, stop=None, inputs=None):
        seen.append((len(conv.images), inputs is not None and "pixel_values" in inputs))
        yield from real_stream(model, renderer, conv, settings, stop=stop, inputs=inputs)

    monkeypatch.setattr(gen, "stream", recording)
    ws = Workspace(load_config(None, ["generate.temperature=0"], default_to_demo=False), str(run))
    request = SimpleNamespace(session_hash=f"s-{arch}")
    try:
        updates = list(chat_reply(ws, "What is it?", [], str(run), "", 0, 3, 1, 0, 1.0, request, image=str(img)))
        shown = updates[-1][0]
        assert shown[0]["role"] == "user" and shown[0]["content"][0] == {"path": str(img.resolve())}
        assert seen == [(1, True)]
        # Gradio hands the history back in its own part format: the image stays with its turn.
        history = [{"role": "user", "content": [{"type": "file", "file": {"path": str(img)}},
                                                {"type": "text", "text": "What is it?"}]},
                   {"role": "assistant", "content": [{"type": "text", "text": shown[1]["content"]}]}]
        list(chat_reply(ws, "And now?", history, str(run), "", 0, 3, 1, 0, 1.0, request))
        assert seen[-1] == (1, True)
        outside = data / "img" / "1.png"  # not an upload: ignored, never read
        list(chat_reply(ws, "And this?", [], str(run), "", 0, 3, 1, 0, 1.0, request, image=str(outside)))
        assert seen[-1] == (0, False)
    finally:
        shutil.rmtree(upload, ignore_errors=True)


def test_merge_then_ask_and_gguf_refusal(vlm_run, tmp_path, capsys):
    from safetensors import safe_open

    arch, run, data, _, base = vlm_run
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(run), "--out", str(out)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert (out / "preprocessor_config.json").is_file()
    names = lambda d: {k for f in d.glob("*.safetensors") for k in safe_open(str(f), "pt").keys()}  # noqa: E731
    assert names(out) == names(base)  # the base's own tensor names, vision tower included
    assert main(["ask", "What is it?", "--model", str(out), "--image", str(data / "img" / "0.png"),
                 "generate.max_new_tokens=2"]) == 0
    capsys.readouterr()
    for argv in (["export", "gguf", "--model", str(run), "--out", str(tmp_path / "m.gguf")],
                 ["merge", "--model", str(run), "--out", str(tmp_path / "m2"), "--low-memory"]):
        rc = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "vision-language" in err[0], err


def test_predict_and_eval_on_image_rows(vlm_run, tmp_path, capsys):
    from nekotune.api import evaluate, load
    from nekotune.evaluation import masked_loss
    from nekotune.data import load_conversations

    arch, run, data, _, _ = vlm_run
    out = tmp_path / "preds.jsonl"
    assert main(["predict", str(data), "--model", str(run), "--out", str(out), "generate.max_new_tokens=2"]) == 0
    assert len(out.read_text().splitlines()) == 4
    done = evaluate(str(run), str(data), load_config(None, ["generate.max_new_tokens=2"], default_to_demo=False),
                    out=str(tmp_path / "eval"))
    assert done.json_path.is_file()
    # The loss sees the images: another image in the same rows gives another loss.
    cfg = load_config(None, [], default_to_demo=False)
    model = load(str(run), cfg).loaded
    convs, _ = load_conversations(str(data), cfg.data)
    first = masked_loss(model.model, model.renderer, convs)["eval_loss"]
    for conv in convs:
        for turn in conv.turns:
            turn.images = [type(ref)(str(data / "img" / "3.png")) for ref in turn.images]
    assert masked_loss(model.model, model.renderer, convs)["eval_loss"] != pytest.approx(first, abs=1e-6)
