"""The speed paths change nothing but speed: same loss, same gradients, same generations."""

import pytest
import torch

from conftest import tiny_overrides
from nekotune.config import load_config
from nekotune.data import Renderer
from nekotune.data.collate import flatten_batch, pad_batch
from nekotune.data.formats import to_conversations
from nekotune.data.sources import Row
from nekotune.speed import fuse_lora_adds, use_packed_attention
from nekotune.train import build_peft_model, trained_positions_loss


def _model(path, cfg):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    model = build_peft_model(model, cfg, grad_ckpt=False)
    with torch.no_grad():  # non-zero B so the LoRA path matters
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def _feats(tokenizer):
    r = Renderer(tokenizer)
    texts = [("Hi?", "Hello there, nya~"), ("What is 2+2?", "Four."), ("A long question " * 4, "Short answer.")]
    convs, _ = to_conversations([Row({"instruction": q, "output": a}, f"r{i}") for i, (q, a) in enumerate(texts)])
    return [{"input_ids": e.input_ids, "labels": e.labels} for e in map(r.encode, convs)]


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_qwen3"])
def test_fused_lora_and_packed_attention_match_reference(arch, request, smol_tokenizer, qwen3_tokenizer):
    path = request.getfixturevalue(arch)
    tok = qwen3_tokenizer if arch == "tiny_qwen3" else smol_tokenizer
    cfg = load_config(None, ["lora.r=4", "lora.alpha=8"], default_to_demo=False)
    ref, fast = _model(path, cfg), _model(path, cfg)
    assert fuse_lora_adds(fast) > 0 and use_packed_attention(fast)
    feats = _feats(tok)
    for batch in (flatten_batch(feats), pad_batch(feats, tok.pad_token_id)):
        losses = []
        for model in (ref, fast):
            model.zero_grad()
            loss, _ = trained_positions_loss(model, batch)
            loss.backward()
            losses.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        assert torch.allclose(losses[0][0], losses[1][0], atol=1e-6)
        for name, grad in losses[0][1].items():
            assert torch.allclose(grad, losses[1][1][name], atol=1e-5), name
    # generation (KV cache, padding masks) is untouched by the switch
    ids = torch.tensor([feats[0]["input_ids"][:10]])
    with torch.no_grad():
        a = ref.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
        b = fast.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(a, b)
    with ref.disable_adapter(), fast.disable_adapter(), torch.no_grad():
        assert torch.allclose(ref(ids).logits, fast(ids).logits, atol=1e-5)


def test_training_records_speed_paths(tiny_llama, qa_file, tmp_path):
    import json

    from nekotune.train import train

    run = train(load_config(None, tiny_overrides(tiny_llama, qa_file, tmp_path / "run", **{"train.max_steps": 2}),
                            default_to_demo=False), show_progress=False)
    info = json.loads((run / "run.json").read_text())
    assert info["fused_lora_layers"] == 14 and info["packed_attention"] and info["fast_loss"]
