"""The speed paths change nothing but speed: same loss, same gradients, same generations."""

import pytest
import torch

from conftest import tiny_overrides
from nekotune.config import load_config
from nekotune.data import Renderer
from nekotune.data.collate import flatten_batch, pad_batch
from nekotune.data.formats import to_conversations
from nekotune.data.sources import Row
from nekotune.training.speed import fuse_lora_adds, use_packed_attention
from nekotune.training import build_peft_model, trained_positions_loss


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

    from nekotune.training import train

    run = train(load_config(None, tiny_overrides(tiny_llama, qa_file, tmp_path / "run", **{"train.max_steps": 2}),
                            default_to_demo=False), show_progress=False)
    info = json.loads((run / "run.json").read_text())
    assert info["fused_lora_layers"] == 14 and info["packed_attention"] and info["fast_loss"]


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
def test_grouped_matmul_attention_matches_sdpa(heads, kv_heads):
    import torch.nn.functional as F

    from nekotune.training.speed import grouped_matmul_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, h, 37, 8, requires_grad=True) for h in (heads, kv_heads, kv_heads))
    ours = grouped_matmul_attention(q, k, v, scaling=0.3)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=heads != kv_heads)
    assert torch.allclose(ours, ref, atol=1e-6)
    weights = torch.randn_like(ref)
    grads = [torch.autograd.grad((out * weights).sum(), (q, k, v)) for out in (ours, ref)]
    for g_ours, g_ref in zip(*grads):
        assert torch.allclose(g_ours, g_ref, atol=1e-5)


def test_bf16_packed_rows_match_padded_batch(tiny_llama, smol_tokenizer):
    """The CPU bf16 path (grouped-matmul attention per example, fused LoRA under autocast) gives
    the loss and LoRA gradients of the padded batch that transformers' own attention computes."""
    cfg = load_config(None, ["lora.r=4", "lora.alpha=8"], default_to_demo=False)
    model = _model(tiny_llama, cfg).to(torch.bfloat16)
    assert fuse_lora_adds(model) > 0 and use_packed_attention(model)
    feats = _feats(smol_tokenizer)
    results = []
    for batch in (flatten_batch(feats), pad_batch(feats, smol_tokenizer.pad_token_id)):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = trained_positions_loss(model, batch)
        loss.backward()
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.item(), grads))
    (packed_loss, packed), (padded_loss, padded) = results
    assert abs(packed_loss - padded_loss) < 0.02 * abs(padded_loss)
    assert len(packed) == len(padded) > 0
    for name, grad in padded.items():
        scale = grad.abs().max().item() + 1e-6
        assert (packed[name] - grad).abs().max().item() < 0.1 * scale, name


def test_chunked_loss_equals_full_cross_entropy_with_gradients():
    import torch.nn.functional as F

    from nekotune.training import chunked_trained_loss

    torch.manual_seed(0)
    hidden = torch.randn(2, 30, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)  # a trainable head (modules_to_save) gets its gradient too
    labels = torch.randint(0, 50, (2, 30))
    labels[0, :7] = -100
    full = F.cross_entropy((hidden[:, :-1] @ weight.t()).reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=-100)
    ours = chunked_trained_loss(hidden, weight, labels, chunk=6)  # several chunks and a short last one
    assert torch.allclose(ours, full, atol=1e-6)
    for g_ours, g_full in zip(torch.autograd.grad(3 * ours, (hidden, weight)), torch.autograd.grad(3 * full, (hidden, weight))):
        assert torch.allclose(g_ours, g_full, atol=1e-6)
