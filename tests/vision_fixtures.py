"""Tiny random Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoints built from a config (no downloads, no
torchvision), laid out like the hub's: weights, tokenizer with the vision special tokens, the PIL
image processor's preprocessor_config.json with its processor_class, and chat_template.jinja.

The pixel bounds are small (4..64 image tokens per image) so the tests stay fast; the code path
is the one real checkpoints take.
"""

from __future__ import annotations

import json
from pathlib import Path

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
PROCESSORS = {"qwen3_vl": "Qwen3VLProcessor", "qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}
QWEN2_SYSTEM = "You are a helpful assistant."


def vl_template(default_system: str | None) -> str:
    """Qwen's pattern: content is text or parts; an image part becomes
    <|vision_start|><|image_pad|><|vision_end|>. Qwen2-VL inserts a default system prompt, the
    Qwen3-VL Instruct template none."""
    default = ("{%- if messages[0].role != 'system' %}{{- '<|im_start|>system\\n" + default_system
               + "<|im_end|>\\n' }}{%- endif %}") if default_system else ""
    return (
        default
        + "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' }}"
        "{%- if message.content is string %}{{- message.content }}"
        "{%- else %}{%- for content in message.content %}"
        "{%- if content.type == 'image' or 'image' in content or 'image_url' in content %}"
        "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
        "{%- elif 'text' in content %}{{- content.text }}{%- endif %}"
        "{%- endfor %}{%- endif %}{{- '<|im_end|>\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )


def vl_tokenizer(smol_dir: Path, arch: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_dir)
    tok.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
    tok.chat_template = vl_template(None if arch == "qwen3_vl" else QWEN2_SYSTEM)
    return tok


def tiny_vl_config(arch: str, tok, deepstack: tuple[int, ...] = (0, 1)):
    ids = {t: tok.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    special = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                   vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    if arch == "qwen3_vl":
        from transformers import Qwen3VLConfig

        text["head_dim"] = 16
        text["rope_parameters"]["mrope_interleaved"] = True
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16,
                      spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64,
                      num_position_embeddings=64, deepstack_visual_indexes=list(deepstack))
        return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **special)
    if arch == "qwen2_vl":
        from transformers import Qwen2VLConfig

        # Qwen2-VL's vision `hidden_size` is the merger's output: it must equal the text width
        vision = dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **special)
    if arch == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig

        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, out_hidden_size=64,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **special)
    raise ValueError(arch)


def build_tiny_vlm(arch: str, smol_dir: Path, path: Path, seed: int = 0, deepstack: tuple[int, ...] = (0, 1)) -> Path:
    import torch
    from transformers import AutoModelForImageTextToText
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = vl_tokenizer(smol_dir, arch)
    cfg = tiny_vl_config(arch, tok, deepstack)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(cfg)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    patch = cfg.vision_config.patch_size
    qwen3 = arch == "qwen3_vl"
    ip = Qwen2VLImageProcessorPil(
        patch_size=patch, merge_size=2, temporal_patch_size=2,
        image_mean=[0.5] * 3 if qwen3 else [0.48145466, 0.4578275, 0.40821073],
        image_std=[0.5] * 3 if qwen3 else [0.26862954, 0.26130258, 0.27577711],
        min_pixels=(patch * 2) ** 2 * 4, max_pixels=(patch * 2) ** 2 * 64)
    ip.save_pretrained(path)
    pre = json.loads((path / "preprocessor_config.json").read_text())
    pre["processor_class"] = PROCESSORS[arch]  # as real checkpoints carry it
    (path / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    (path / "chat_template.jinja").write_text(tok.chat_template)
    return path


def noise_image(height: int, width: int, seed: int = 0):
    import numpy as np
    from PIL import Image

    rs = np.random.RandomState(seed)
    return Image.fromarray((rs.rand(height, width, 3) * 255).astype("uint8"))


def save_image(img, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
