"""The training loss: cross-entropy over trained tokens only, projected to the vocabulary in chunks.

A plain causal-LM loss materialises fp32 logits for every token, the largest tensor of a step
at vocabularies of 49k-152k. Here only the trained positions are projected, a chunk at a time,
and the gradient is computed in the same pass. Evaluation (nekotune.evaluation) and the memory
estimate (nekotune.memory) import this module alone: it imports torch only when called.
"""

from __future__ import annotations

import types
from typing import Any

LOSS_CHUNK_BYTES = 2**25  # fp32 logits per chunk: 32 MB, whatever the vocabulary size (bench: faster than 128)
IGNORE = -100  # the label of a position that is not trained (data.render.IGNORE)


def loss_chunk(vocab_size: int) -> int:
    """Trained positions per vocabulary-projection chunk (170 at 49k vocab, 128 at 152k)."""
    return max(128, min(4096, LOSS_CHUNK_BYTES // (4 * vocab_size)))


def causal_lm(model: Any) -> Any:
    """The transformers *ForCausalLM inside DDP/FSDP and peft wrappers."""
    m = model
    while hasattr(m, "module") and not hasattr(m, "get_decoder"):
        m = m.module
    return m.get_base_model() if hasattr(m, "get_base_model") else m


def supports_fast_loss(model: Any) -> bool:
    import torch

    base = causal_lm(model)
    cfg = base.config
    head = base.get_output_embeddings()
    return (type(head) is torch.nn.Linear and head.bias is None and hasattr(base, "get_decoder")
            and not getattr(cfg, "final_logit_softcapping", None) and not getattr(cfg, "logit_scale", None))


def _ce_sum(h, weight, targets, chunk: int, grads: bool):
    """Summed cross-entropy of h projected to the vocabulary, chunk by chunk; with grads, also the
    gradients of that sum for h and (when it requires one) the weight, computed in the same pass:
    softmax minus one-hot, times the weight."""
    import torch

    grad_h = torch.empty_like(h) if grads else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
        if grads and weight.requires_grad else None
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for s in range(0, targets.numel(), chunk):
        hs, y = h[s: s + chunk], targets[s: s + chunk]
        logits = (hs @ weight.t()).float()
        lse = torch.logsumexp(logits, dim=-1)
        total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
        if grad_h is None:
            continue
        grad = logits.sub_(lse[:, None]).exp_()  # the softmax, in place of the logits
        grad[torch.arange(y.numel(), device=y.device), y] -= 1
        grad = grad.to(hs.dtype)
        grad_h[s: s + chunk] = grad @ weight
        if grad_w is not None:
            grad_w += (grad.t() @ hs).float()
    return total, grad_h, grad_w


def _trained_tokens_ce():
    """A torch.autograd.Function, built on first use so that importing this module stays light."""
    import torch

    class TrainedTokensCE(torch.autograd.Function):
        """The loss with its gradient computed in the forward pass and kept: only [tokens, hidden]
        survives to the backward pass. Checkpointing each chunk instead would project every chunk
        twice and run log_softmax's backward as well (about 2x slower in bench)."""

        @staticmethod
        def forward(ctx, h, weight, targets, chunk):
            total, grad_h, grad_w = _ce_sum(h, weight, targets, chunk, grads=True)
            ctx.save_for_backward(grad_h, grad_w)
            ctx.weight_dtype = weight.dtype
            return total

        @staticmethod
        def backward(ctx, grad_total):
            grad_h, grad_w = ctx.saved_tensors
            if grad_w is not None:
                grad_w = (grad_w * grad_total).to(ctx.weight_dtype)
            return grad_h * grad_total.to(grad_h.dtype), grad_w, None, None

    return TrainedTokensCE


_CE: Any = None


def chunked_trained_loss(hidden: Any, weight: Any, labels: Any, chunk: int | None = None) -> Any:
    """Mean cross-entropy over trained tokens, projecting only those hidden states to the
    vocabulary, chunk by chunk, so no full logits tensor ever exists."""
    import torch

    global _CE
    chunk = chunk or loss_chunk(weight.shape[0])
    targets = labels[:, 1:]
    keep = targets != IGNORE
    h = hidden[:, :-1][keep]
    y = targets[keep]
    n = y.numel()
    if n == 0:
        return hidden.sum() * 0.0
    if not (torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)):
        return _ce_sum(h, weight, y, chunk, grads=False)[0] / n  # evaluation: no gradients to prepare
    if _CE is None:
        _CE = _trained_tokens_ce()
    return _CE.apply(h, weight, y, chunk) / n


def _fast_forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, inputs_embeds=None,
                  **kwargs):
    if labels is None:  # generation and plain calls keep the model's own forward
        return type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask,
                                  position_ids=position_ids, inputs_embeds=inputs_embeds, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    hidden = self.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                inputs_embeds=inputs_embeds, use_cache=False).last_hidden_state
    loss = chunked_trained_loss(hidden, self.get_output_embeddings().weight, labels)
    return CausalLMOutputWithPast(loss=loss, logits=None)


def install_fast_loss(model: Any) -> bool:
    """Route `model(..., labels=...)` through the trained-positions loss. It is installed on the
    inner causal LM so that DDP/FSDP wrappers still see a normal forward call."""
    if not supports_fast_loss(model):
        return False
    base = causal_lm(model)
    if hasattr(getattr(base, "model", None), "get_rope_index"):
        # A Qwen-VL model: get_decoder() is its text model, which would never see the images
        # (issue 17); the multimodal backbone's loss goes in instead.
        from nekotune.training.vision_loss import install_vlm_fast_loss

        return install_vlm_fast_loss(model)
    if not getattr(base, "_nekotune_fast_loss", False):
        base.forward = types.MethodType(_fast_forward, base)
        base._nekotune_fast_loss = True
    return True


def trained_positions_loss(model: Any, inputs: dict) -> tuple[Any, int]:
    """(mean loss over trained tokens, their count) for a batch from the collator."""
    install_fast_loss(model)
    n = int((inputs["labels"][:, 1:] != IGNORE).sum())
    out = model(**inputs, use_cache=False)
    return out.loss, n
