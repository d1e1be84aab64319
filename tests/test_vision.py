"""Vision-language LoRA (nekotune.vision) on tiny random Qwen3-VL and Qwen2-VL models.

The checks that matter are exact: ids identical to the processor's, labels on assistant text only
(never an image token), the multimodal loss equal to the model's own and different for different
images, packing equal to padding.
"""

from __future__ import annotations

import base64
import functools
import http.server
import io
import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
from vision_fixtures import build_tiny_vlm, noise_image, save_image, tiny_vl_config, vl_tokenizer

from nekotune.data.render import IGNORE
from nekotune.data.sources import Row
from nekotune.errors import UserError
from nekotune.data.vision_collate import VisionCollator, VisionDataset
from nekotune.vision.families import checkpoint_name, family_of, gguf_refusal, is_vlm, lora_targets
from nekotune.data.formats import IMAGE, Conversation, Turn
from nekotune.data.image_rows import (
    to_vision_conversation,
    turn_from_content,
    user_turn,
)
from nekotune.data.images import REQUEST_POLICY, ImagePolicy, ImageRef, image_size, load_image
from nekotune.training.vision_loss import install_vlm_fast_loss, rope_index_of, vlm_fast_forward
from nekotune.vision.plan import vision_plan
from nekotune.data.images import image_tokens
from nekotune.model.processor import copy_processor_files, load_processor, processor_source
from nekotune.data.vision_render import VisionRenderer, image_stats

ARCHS = ["qwen3_vl", "qwen2_vl"]


@pytest.fixture(scope="session")
def vl_dirs(smol_dir, tmp_path_factory):
    return {a: build_tiny_vlm(a, smol_dir, tmp_path_factory.mktemp(a)) for a in ARCHS}


@pytest.fixture(scope="session")
def processors(vl_dirs):
    return {a: load_processor(str(d)) for a, d in vl_dirs.items()}


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


def _model(path, lora=None):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    if lora is None:
        return model
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=lora, lora_dropout=0.0,
                                            task_type="CAUSAL_LM"))


def _perturb_lora(pm, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


IMAGES = [(48, 64), (120, 90), (300, 200)]


def _two_turn_row(images):
    return Row({"messages": [
        {"role": "user", "content": "<image>Who are they?"},
        {"role": "assistant", "content": "Kane and Gretzka."},
        {"role": "user", "content": [{"type": "text", "text": "And these?"}, {"type": "image"}, {"type": "image"}]},
        {"role": "assistant", "content": "Two more players."}], "images": images}, "data.json row 1")


def _data_url(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


# -- families, LoRA targets -------------------------------------------------------------------
def test_is_vlm_and_family():
    assert is_vlm({"model_type": "qwen3_vl"}) and is_vlm({"architectures": ["Qwen2VLForConditionalGeneration"]})
    assert not is_vlm({"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]})
    assert family_of({"model_type": "llama"}) is None
    assert family_of({"model_type": "qwen2_5_vl"}).processor_class == "Qwen2_5_VLProcessor"
    with pytest.raises(UserError, match="llava.*not supported yet"):
        family_of({"model_type": "llava", "vision_config": {"hidden_size": 8}})
    assert "mmproj" in str(gguf_refusal({"model_type": "qwen3_vl"}))


@pytest.mark.parametrize("name", ["qwen3_vl", "qwen2_vl", "qwen2_5_vl"])
def test_lora_targets_language_model_only_by_default(smol_dir, name):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    cfg = tiny_vl_config(name, vl_tokenizer(smol_dir, name))

    def adapted(targets):
        pm = get_peft_model(AutoModelForImageTextToText.from_config(cfg),
                            LoraConfig(r=4, target_modules=targets, task_type="CAUSAL_LM"))
        return {n.split(".lora_A")[0] for n, _ in pm.named_parameters() if ".lora_A" in n}

    default = adapted(lora_targets(cfg, "all-linear"))
    assert len(default) == 2 * 7 and all(".language_model.layers." in n for n in default)
    # Qwen2.5-VL's vision MLP shares the names: a plain suffix list would adapt it too
    suffixes = adapted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert any(".visual." in n for n in suffixes) == (name == "qwen2_5_vl")
    listed = adapted(lora_targets(cfg, ["q_proj", "v_proj"]))
    assert len(listed) == 4 and not any(".visual." in n for n in listed)
    vision = adapted(lora_targets(cfg, "all-linear", vision=True))
    visual = {n for n in vision if ".visual." in n}
    fam = family_of(cfg)
    assert visual and default < vision and not any("lm_head" in n for n in vision)
    assert {s for s in fam.vision_linear if any(n.endswith(s) for n in visual)} == set(fam.vision_linear)
    assert lora_targets({"model_type": "llama"}, "all-linear") == "all-linear"


# -- processor --------------------------------------------------------------------------------
def test_processor_without_torchvision_and_pixel_bounds(vl_dirs, processors, arch):
    proc = processors[arch]
    assert type(proc).__name__ == {"qwen3_vl": "Qwen3VLProcessor", "qwen2_vl": "Qwen2VLProcessor"}[arch]
    assert proc.tokenizer.chat_template == proc.chat_template and "<|image_pad|>" in proc.chat_template
    ip = proc.image_processor
    for h, w in [(48, 64), (600, 800), (31, 2000)]:
        got = ip(images=[noise_image(h, w)], return_tensors="pt")["image_grid_thw"][0]
        assert image_tokens(ip, h, w) == int(got.prod()) // 4 == ip.get_number_of_image_patches(h, w, {}) // 4
    factor = ip.patch_size * 2
    bounded = load_processor(str(vl_dirs[arch]), max_pixels=factor ** 2 * 16)
    assert bounded.image_processor.size["longest_edge"] == factor ** 2 * 16
    assert bounded.image_processor.size["shortest_edge"] == ip.size["shortest_edge"]  # the other bound kept
    big = noise_image(600, 800)
    # 16 tokens at most; smart_resize floors each side to the factor: 3 x 4 merged patches
    assert image_tokens(bounded.image_processor, 600, 800) == 12 \
        == int(bounded.image_processor(images=[big], return_tensors="pt")["image_grid_thw"][0].prod()) // 4
    with pytest.raises(UserError, match="image_min_pixels=.*above"):
        load_processor(str(vl_dirs[arch]), min_pixels=10**6, max_pixels=10**5)


def test_processor_from_hub_layout_and_copied_files(vl_dirs, tmp_path):
    src = vl_dirs["qwen2_vl"]
    hub = tmp_path / "hub"
    shutil.copytree(src, hub)
    template = (hub / "chat_template.jinja").read_text()
    (hub / "chat_template.jinja").unlink()
    (hub / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    pre = json.loads((hub / "preprocessor_config.json").read_text())
    size = pre.pop("size")
    pre.update(min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])  # legacy keys
    (hub / "preprocessor_config.json").write_text(json.dumps(pre))
    proc = load_processor(str(hub))
    assert proc.chat_template == template and proc.image_processor.size["longest_edge"] == size["longest_edge"]
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    assert copy_processor_files(str(hub), adapter) == ["preprocessor_config.json", "chat_template.json"]
    for name in ("tokenizer.json", "tokenizer_config.json"):  # what _save_adapter writes today; no config.json
        shutil.copy(hub / name, adapter / name)
    assert load_processor(str(adapter)).chat_template == template


# -- images -----------------------------------------------------------------------------------
def test_image_sources_and_one_line_errors(tmp_path):
    from PIL import Image

    data_dir, media = tmp_path / "data", tmp_path / "media"
    save_image(noise_image(30, 40), data_dir / "a.png")
    save_image(noise_image(20, 10), media / "sub" / "b.png")
    (data_dir / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    (data_dir / "notes.txt").write_text("hello")
    dirs = (data_dir, media)
    assert load_image(ImageRef("a.png", dirs), "r").size == (40, 30)
    assert image_size(ImageRef("sub/b.png", dirs), "r") == (20, 10)  # the second base dir (dataset_dir)
    inline = noise_image(5, 7)
    assert load_image(ImageRef(_data_url(inline)), "r").size == (7, 5)
    png = base64.b64decode(_data_url(inline).split(",")[1])
    assert load_image(ImageRef({"bytes": png, "path": "x.png"}), "r").size == (7, 5)
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent: white, as transformers composites
    assert load_image(ImageRef(rgba), "r").getpixel((0, 0)) == (255, 255, 255)
    rotated = noise_image(10, 30)
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotated 90 degrees: height and width swap when loaded
    rotated.save(data_dir / "rot.jpg", exif=exif)
    rot = ImageRef("rot.jpg", dirs)
    assert image_size(rot, "r") == (30, 10) == load_image(rot, "r").size[::-1]
    cases = {
        "missing.jpg": "data.json row 3: image missing.jpg was not found (",
        "broken.jpg": "data.json row 3: image broken.jpg cannot be read",
        "notes.txt": "data.json row 3: image notes.txt is not an image",
        "data:image/png;base64,@@@": "data.json row 3: image (inline image) is a data URL whose base64",
        "s3://bucket/x.png": "data.json row 3: image s3://bucket/x.png has a URL scheme",
    }
    for ref, message in cases.items():
        with pytest.raises(UserError) as err:
            load_image(ImageRef(ref, dirs), "data.json row 3")
        assert str(err.value).startswith(message) and "\n" not in str(err.value)
    with pytest.raises(UserError, match="a.png is too large .*30 pixels"):
        image_size(ImageRef("a.png", dirs), "r", ImagePolicy(max_pixels=100))
    with pytest.raises(UserError, match="local file path, which is not accepted"):
        load_image(ImageRef(str(data_dir / "a.png")), "request", REQUEST_POLICY)


def test_remote_images_only_when_allowed(tmp_path):
    save_image(noise_image(12, 16), tmp_path / "cat.png")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.RequestHandlerClass.log_message = lambda *a: None
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/cat.png"
        assert load_image(ImageRef(url), "r").size == (16, 12)
        with pytest.raises(UserError, match="HTTP Error 404"):
            load_image(ImageRef(url.replace("cat", "dog")), "data.json row 2")
        with pytest.raises(UserError, match="remote image URLs are off"):
            load_image(ImageRef(url), "request", REQUEST_POLICY)
        with pytest.raises(UserError, match="too large"):
            load_image(ImageRef(url), "r", ImagePolicy(max_bytes=10))
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


# -- data shapes ------------------------------------------------------------------------------
def test_llamafactory_sharegpt_and_parts_shapes(tmp_path):
    turns = [{"from": "human", "value": "<image>Describe"}, {"from": "gpt", "value": "A cat."}]
    sharegpt = Row({"conversations": turns, "system": "Be brief.", "images": ["a.jpg"]}, "d.json row 1")
    conv = to_vision_conversation(sharegpt, (tmp_path,))
    assert conv.system == "Be brief." and conv.turns[0].content == f"{IMAGE}Describe"
    assert conv.turns[0].images[0].source == "a.jpg" and conv.turns[0].images[0].base_dirs == (tmp_path,)
    assert conv.messages()[1]["content"] == [{"type": "image"}, {"type": "text", "text": "Describe"}]
    openai = Row({"messages": [
        {"role": "user", "content": [{"type": "text", "text": "What?"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A dog."}]}]}, "d.json row 2")
    conv = to_vision_conversation(openai)
    assert [t.content for t in conv.turns] == [f"What?{IMAGE}", "A dog."]
    assert conv.images[0].source == "data:image/png;base64,AAAA" and conv.reference == "A dog."
    trl = Row({"messages": [{"role": "user", "content": [{"type": "image", "text": None, "index": 0},
                                                         {"type": "text", "text": "Q", "index": None}]},
                            {"role": "assistant", "content": "A"}], "images": [{"bytes": b"x", "path": None}]}, "r")
    assert to_vision_conversation(trl).images[0].source == {"bytes": b"x", "path": None}
    prompt = to_vision_conversation(_two_turn_row(["1.jpg", "2.jpg", "3.jpg"])).prompt_part()
    assert isinstance(prompt, Conversation) and [r.source for r in prompt.images] == ["1.jpg", "2.jpg", "3.jpg"]
    assert user_turn("hi", ["x.png"]).parts() == [{"type": "image"}, {"type": "text", "text": "hi"}]


@pytest.mark.parametrize("row, message", [
    ({"messages": [{"role": "user", "content": "<image><image>x"}, {"role": "assistant", "content": "y"}],
      "images": ["a.jpg"]}, "d.json row 7: 2 image placeholder(s) but 1 image(s) in `images`"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "<image>y"}],
      "images": ["a.jpg"]}, "d.json row 7: messages[2] (role assistant) has an image"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "<image>x"}]},
                   {"role": "assistant", "content": "y"}]}, "holds the <image> placeholder"),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}, {"role": "assistant", "content": "y"}]},
     "content[0] has type 'audio'"),
    ({"messages": [{"role": "assistant", "content": "y"}]}, "a user turn was expected"),
])
def test_bad_rows_are_one_line_errors(row, message):
    with pytest.raises(UserError) as err:
        to_vision_conversation(Row(row, "d.json row 7"))
    assert message in str(err.value) and "\n" not in str(err.value)


# -- rendering --------------------------------------------------------------------------------
def _expected_labels(tok, ids, answers):
    labels, start = [IGNORE] * len(ids), 0
    for answer in answers:
        seq = tok(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
        pos = next(i for i in range(start, len(ids)) if ids[i:i + len(seq)] == seq)
        labels[pos:pos + len(seq)] = seq
        start = pos + len(seq)
    return labels


def test_render_is_the_processors_and_trains_no_image_token(processors, arch, tmp_path):
    proc = processors[arch]
    imgs = [noise_image(h, w, i) for i, (h, w) in enumerate(IMAGES)]
    names = [save_image(img, tmp_path / f"{i}.png").name for i, img in enumerate(imgs)]
    renderer = VisionRenderer(proc, max_seq_len=4096)
    enc = renderer.encode(to_vision_conversation(_two_turn_row(names), (tmp_path,)))
    full = renderer.render(to_vision_conversation(_two_turn_row(names)).messages(), add_generation_prompt=False)
    ref = proc(text=[full], images=imgs, return_tensors="pt")
    assert enc.input_ids == ref["input_ids"][0].tolist()
    assert enc.labels == _expected_labels(proc.tokenizer, enc.input_ids, ["Kane and Gretzka.", "Two more players."])
    cfg = json.loads((Path(proc.tokenizer.name_or_path) / "config.json").read_text())
    vision_ids = {cfg[k] for k in ("image_token_id", "vision_start_token_id", "vision_end_token_id")}
    assert sum(i in vision_ids for i in enc.input_ids) == 3 * 2 + sum(enc.image_token_counts)
    assert all(lab == IGNORE for i, lab in zip(enc.input_ids, enc.labels, strict=True) if i in vision_ids)
    assert enc.image_token_counts == [4, 12, 54] and enc.sizes == IMAGES
    pixels = renderer.pixel_inputs(enc.images, enc.grids, enc.where)
    assert torch.equal(pixels["pixel_values"], ref["pixel_values"])
    assert torch.equal(pixels["image_grid_thw"], ref["image_grid_thw"])
    stats = image_stats([enc])
    assert stats["images"] == 3 and stats["image_tokens"] == 70 and stats["largest"] == (300, 200)


def test_prompt_inputs_equal_processor_chat_template(processors, arch):
    proc = processors[arch]
    img = noise_image(90, 120, 3)
    renderer = VisionRenderer(proc, max_seq_len=4096)
    conv = Conversation(turns=[user_turn("What is this?", [img])], where="request")
    mine = renderer.prompt_inputs(conv)
    theirs = proc.apply_chat_template([{"role": "user", "content": [{"type": "image", "image": img},
                                                                    {"type": "text", "text": "What is this?"}]}],
                                      add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"):
        assert torch.equal(mine[key], theirs[key]), key
    assert renderer.prompt_ids(conv) == mine["input_ids"][0].tolist()


def test_openai_request_messages_with_image_url(processors):
    proc = processors["qwen3_vl"]
    img = noise_image(64, 48, 5)
    content = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": _data_url(img)}}]
    conv = Conversation(turns=[turn_from_content("user", content, "messages[0].content")], where="request")
    served = VisionRenderer(proc, REQUEST_POLICY).prompt_inputs(conv)
    direct = VisionRenderer(proc).prompt_inputs(
        Conversation(turns=[Turn("user", f"What is this?{IMAGE}", [ImageRef(img)])], where="x"))
    assert all(torch.equal(served[k], direct[k]) for k in direct)
    local = [{"type": "image_url", "image_url": {"url": "/etc/hostname"}}]
    conv = Conversation(turns=[turn_from_content("user", local, "messages[0].content")], where="request")
    with pytest.raises(UserError, match="request: image /etc/hostname is a local file path, which is not accepted"):
        VisionRenderer(proc, REQUEST_POLICY).prompt_inputs(conv)
    with pytest.raises(UserError, match="messages\\[1\\].content: the assistant message has an image"):
        turn_from_content("assistant", content, "messages[1].content")
    with pytest.raises(UserError, match="an image part without an image"):
        turn_from_content("user", [{"type": "image"}], "messages[0].content")


def test_truncation_never_cuts_an_image(processors, tmp_path):
    proc = processors["qwen3_vl"]
    save_image(noise_image(120, 90), tmp_path / "a.png")
    row = Row({"messages": [{"role": "user", "content": "<image>Describe it"},
                            {"role": "assistant", "content": "A long answer " * 20}], "images": ["a.png"]},
              "d.json row 4")
    full = VisionRenderer(proc, max_seq_len=4096).encode(to_vision_conversation(row, (tmp_path,)))
    last_image = max(i for i, t in enumerate(full.input_ids) if t == proc.image_token_id)
    cut = VisionRenderer(proc, max_seq_len=last_image)
    assert cut.encode(to_vision_conversation(row, (tmp_path,))) is None and cut.cut_image_rows == ["d.json row 4"]
    keep = len(full.input_ids) - 10  # the cut falls in the answer, after the image: truncated as for text
    kept = VisionRenderer(proc, max_seq_len=keep).encode(to_vision_conversation(row, (tmp_path,)))
    assert kept.truncated and kept.input_ids == full.input_ids[:keep] and 0 < kept.n_trained < full.n_trained


def test_missing_image_names_row_and_image(processors, tmp_path):
    row = Row({"messages": [{"role": "user", "content": "<image>Hi"}, {"role": "assistant", "content": "Yo"}],
               "images": ["photos/missing.jpg"]}, "train.json row 2")
    with pytest.raises(UserError) as err:
        VisionRenderer(processors["qwen2_vl"]).encode(to_vision_conversation(row, (tmp_path,)))
    assert str(err.value) == (f"train.json row 2: image photos/missing.jpg was not found "
                              f"({tmp_path / 'photos' / 'missing.jpg'})")


# -- loss, packing, training, merge, generation ----------------------------------------------
def _batch(proc, renderer, rows, packing=False, model=None):
    encs = [renderer.encode(to_vision_conversation(r)) for r in rows]
    feats = [VisionDataset(encs, renderer)[i] for i in range(len(encs))]
    collator = VisionCollator(proc.tokenizer.pad_token_id, proc.image_token_id, packing=packing,
                              rope_index=rope_index_of(model) if packing else None)
    return collator(feats)


def _rows(images, text_only=True):
    rows = [Row({"messages": [{"role": "user", "content": "<image>What is this?"},
                              {"role": "assistant", "content": f"Picture {i}."}], "images": [img]}, f"r{i}")
            for i, img in enumerate(images)]
    if text_only:
        rows.append(Row({"messages": [{"role": "user", "content": "No image."},
                                      {"role": "assistant", "content": "Fine."}]}, "text"))
    return rows


def test_vlm_fast_loss_is_the_models_loss_and_sees_the_image(vl_dirs, processors, arch):
    from transformers import AutoModelForImageTextToText

    proc = processors[arch]
    renderer = VisionRenderer(proc, max_seq_len=4096)
    pm = _model(vl_dirs[arch], lora_targets(AutoModelForImageTextToText.from_pretrained(vl_dirs[arch]).config))
    _perturb_lora(pm)
    batch = _batch(proc, renderer, _rows([noise_image(48, 64, 1), _data_url(noise_image(120, 90, 2))]))
    base = pm.get_base_model()
    with torch.no_grad():
        own = type(base).forward(base, **batch).loss
        assert install_vlm_fast_loss(pm)
        fast = pm(**batch).loss
        other = _batch(proc, renderer, _rows([noise_image(48, 64, 7), noise_image(120, 90, 8)]))
        fast_other = pm(**other).loss
    assert fast.item() == pytest.approx(own.item(), abs=1e-5)
    assert abs(fast.item() - fast_other.item()) > 1e-4  # the images reach the loss
    loss = pm(**batch).loss
    loss.backward()
    grads = [n for n, p in pm.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert grads and all("lora_" in n and ".language_model." in n for n in grads)
    out = vlm_fast_forward(base, input_ids=batch["input_ids"][:1], attention_mask=batch["attention_mask"][:1])
    assert out.logits.shape[:2] == batch["input_ids"][:1].shape  # without labels: the model's own forward


def test_packing_image_rows_equals_padding(vl_dirs, processors, arch):
    proc = processors[arch]
    renderer = VisionRenderer(proc, max_seq_len=4096)
    model = _model(vl_dirs[arch]).eval()
    install_vlm_fast_loss(model)
    rows = _rows([noise_image(48, 64, 1), noise_image(120, 90, 2)])
    with torch.no_grad():
        padded = model(**_batch(proc, renderer, rows)).loss
        packed_batch = _batch(proc, renderer, rows, packing=True, model=model)
        packed = model(**packed_batch).loss
    assert packed_batch["position_ids"].shape[:2] == (4, 1) and packed_batch["input_ids"].shape[0] == 1
    assert packed.item() == pytest.approx(padded.item(), abs=1e-5)


def test_lora_training_both_shapes_then_merge(vl_dirs, processors, arch, tmp_path):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText, TrainingArguments

    from nekotune.training.trainer import make_trainer_class

    proc = processors[arch]
    for i in range(4):
        save_image(noise_image(40 + 16 * i, 64, i), tmp_path / "img" / f"{i}.png")
    rows = [Row({"conversations": [{"from": "human", "value": f"<image>Picture {i}?"},  # LLaMA-Factory ShareGPT
                                   {"from": "gpt", "value": f"It shows noise number {i}."}],
                 "images": [f"img/{i}.png"]}, f"lf row {i}") for i in range(2)]
    rows += [Row({"messages": [{"role": "user", "content": [{"type": "image", "image": f"img/{i}.png"},  # TRL parts
                                                            {"type": "text", "text": "And this?"}]},
                               {"role": "assistant", "content": f"Noise {i} again."}]}, f"parts row {i}")
             for i in range(2, 4)]
    renderer = VisionRenderer(proc, max_seq_len=4096)
    encs = [renderer.encode(to_vision_conversation(r, (tmp_path,))) for r in rows]
    config = AutoModelForImageTextToText.from_pretrained(vl_dirs[arch]).config
    pm = _model(vl_dirs[arch], lora_targets(config))
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    install_vlm_fast_loss(pm)
    args = TrainingArguments(output_dir=str(tmp_path / "ckpt"), per_device_train_batch_size=2, max_steps=3,
                             learning_rate=1e-2, logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                             remove_unused_columns=False, disable_tqdm=True, dataloader_num_workers=0)
    trainer = make_trainer_class()(model=pm, args=args, train_dataset=VisionDataset(encs, renderer),
                                   data_collator=VisionCollator(proc.tokenizer.pad_token_id, proc.image_token_id,
                                                                packing=True, rope_index=rope_index_of(pm)))
    trainer.model_accepts_loss_kwargs = False
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    changed = {n for n, p in pm.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all("lora_" in n and ".language_model." in n for n in changed)

    pm.save_pretrained(tmp_path / "adapter")
    proc.tokenizer.save_pretrained(tmp_path / "adapter")  # as train's _save_adapter does, plus:
    copy_processor_files(str(vl_dirs[arch]), tmp_path / "adapter")
    assert processor_source(str(vl_dirs[arch]), str(tmp_path / "adapter")) == str(tmp_path / "adapter")
    assert load_processor(str(tmp_path / "adapter")).image_processor.size == proc.image_processor.size
    eval_batch = VisionCollator(proc.tokenizer.pad_token_id, proc.image_token_id)([VisionDataset(encs, renderer)[0]])
    eval_batch.pop("labels")
    pm.eval()
    with torch.no_grad():
        expected = pm(**eval_batch).logits
    fresh = AutoModelForImageTextToText.from_pretrained(vl_dirs[arch], dtype=torch.float32)
    merged = PeftModel.from_pretrained(fresh, tmp_path / "adapter").merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (reloaded(**eval_batch).logits - expected).abs().max().item() < 1e-4
    names = {}
    for which in ("base", "merged", "adapter"):
        path = {"base": vl_dirs[arch] / "model.safetensors", "merged": tmp_path / "merged" / "model.safetensors",
                "adapter": tmp_path / "adapter" / "adapter_model.safetensors"}[which]
        with safe_open(str(path), "pt") as f:
            names[which] = set(f.keys())
    assert names["merged"] == names["base"]
    # the low-memory merge's name mapping: every adapted weight found in the base checkpoint file
    modules = {k.removeprefix("base_model.model.").split(".lora_")[0] + ".weight" for k in names["adapter"]}
    mapped = {m: checkpoint_name(config, m, names["base"]) for m in modules}
    assert all(mapped.values()) and (arch == "qwen2_vl") == any(v != k for k, v in mapped.items())


def test_generate_with_an_image(vl_dirs, processors, arch):
    proc = processors[arch]
    renderer = VisionRenderer(proc, max_seq_len=4096)
    pm = _model(vl_dirs[arch], lora_targets({"model_type": arch})).eval()
    install_vlm_fast_loss(pm)
    convs = [Conversation(turns=[user_turn(q, [noise_image(h, 64, s)])], where="chat")
             for q, h, s in [("Describe.", 48, 1), ("And this longer question?", 96, 2)]]
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=proc.tokenizer.pad_token_id,
                  eos_token_id=renderer.stop_token_ids)
    with torch.no_grad():
        singles = []
        for conv in convs:
            inputs = renderer.prompt_inputs(conv)
            out = pm.generate(**inputs, **kwargs)
            assert out.shape[0] == 1 and inputs["input_ids"].shape[1] < out.shape[1] <= inputs["input_ids"].shape[1] + 5
            assert torch.equal(out, pm.generate(**inputs, **kwargs))  # deterministic
            singles.append(out[0, inputs["input_ids"].shape[1]:].tolist())
        feats = [{"input_ids": renderer.prompt_ids(c), "labels": renderer.prompt_ids(c),
                  **renderer.pixel_inputs(c.images, [renderer.measure(r, "chat")[1] for r in c.images], "chat")}
                 for c in convs]
        batch = VisionCollator(proc.tokenizer.pad_token_id, proc.image_token_id, side="left")(feats)
        batch.pop("labels")
        width = batch["input_ids"].shape[1]
        both = pm.generate(**batch, **kwargs)
        for row, single in enumerate(singles):
            assert both[row, width:width + len(single)].tolist() == single
        a = renderer.prompt_inputs(convs[0])
        other = ImageRef(noise_image(48, 64, 9))  # same size, so the same ids: only the pixels differ
        b = {**a, **renderer.pixel_inputs([other], [renderer.measure(other, "chat")[1]], "chat")}
        assert (pm(**a).logits[0, -1] - pm(**b).logits[0, -1]).abs().max() > 1e-4  # the image matters


# -- estimate ---------------------------------------------------------------------------------
def test_vision_plan_counts_tokens_and_the_tower(vl_dirs, processors, arch):
    from transformers import AutoModelForImageTextToText

    config = json.loads((vl_dirs[arch] / "config.json").read_text())
    pre = json.loads((vl_dirs[arch] / "preprocessor_config.json").read_text())
    plan = vision_plan(config, pre)
    model = AutoModelForImageTextToText.from_pretrained(vl_dirs[arch])
    assert plan.vision_params == sum(p.numel() for p in model.model.visual.parameters())
    ip = processors[arch].image_processor
    for h, w in [(48, 64), (600, 800), (100, 3000)]:
        assert plan.tokens(h, w) == image_tokens(ip, h, w)
    assert plan.max_tokens_per_image == 64
    capped = vision_plan(config, pre, max_pixels=(plan.factor ** 2) * 16)
    assert capped.tokens(600, 800) == 12
    assert capped.activation_elems(2, trained=True) > capped.activation_elems(2, trained=False) > 0
    assert vision_plan({"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}) is None


# -- docs and example ---------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]
def test_example_config_and_llamafactory_pixel_names(tmp_path):
    from nekotune.config import load_config

    cfg = load_config(ROOT / "examples" / "qwen3-vl-2b-images.yaml")
    assert cfg.model.name_or_path == "Qwen/Qwen3-VL-2B-Instruct" and cfg.data.image_max_pixels == 768 * 768
    assert cfg.lora.vision is False and cfg.data.packing
    yml = tmp_path / "lf.yaml"
    yml.write_text("image_max_pixels: 262144\nimage_min_pixels: 1024\nlora: {vision: true}\n")
    cfg = load_config(yml, ["image_max_pixels=200000"])
    assert (cfg.data.image_min_pixels, cfg.data.image_max_pixels, cfg.lora.vision) == (1024, 200000, True)
    with pytest.raises(UserError, match="image_min_pixels=9000 is above data.image_max_pixels=4000"):
        load_config(None, ["data.image_min_pixels=9000", "data.image_max_pixels=4000"])


def test_docs_dataset_examples_convert():
    text = (ROOT / "docs" / "vision.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```json\n")[1:]]
    rows = [row for b in blocks for row in (json.loads(b) if b.lstrip().startswith("[") else [json.loads(b)])]
    convs = [to_vision_conversation(Row(r, f"docs row {i}")) for i, r in enumerate(rows)]
    assert [len(c.images) for c in convs] == [1, 2, 1, 1]
    assert convs[1].images[1].source == "shots/b.png" and convs[3].images[0].source.startswith("https://")
