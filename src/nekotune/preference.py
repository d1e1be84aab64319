"""Held-out reward accuracy and margin of a preference-tuned run: `nekotune eval PAIRS --model RUN`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from nekotune.errors import UserError


# -- held-out evaluation: `nekotune eval PAIRS --model RUN` ----------------------------------------
def sequence_logps(model: Any, sequences: list[tuple[list[int], list[int]]], pad_id: int,
                   batch_size: int = 8) -> list[float]:
    """Summed log-probability of each answer after its prompt, for (prompt_ids, answer_ids) pairs: one
    right-padded forward per batch (padding after a row cannot change its causal attention), then
    nekotune's chunked cross-entropy on the answer positions only (no [rows, length, vocab] logits)."""
    import torch

    from nekotune.training.loss import _ce_sum, causal_lm, loss_chunk

    lm = causal_lm(model)
    device = next(lm.parameters()).device
    weight = lm.get_output_embeddings().weight
    chunk = loss_chunk(weight.shape[0])
    out = [0.0] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]) + len(sequences[i][1]))
    for start in range(0, len(order), batch_size):
        rows = [sequences[i] for i in order[start:start + batch_size]]
        width = max(len(p) + len(a) for p, a in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for j, (p, a) in enumerate(rows):
            ids[j, :len(p) + len(a)] = torch.tensor(p + a, device=device)
            mask[j, :len(p) + len(a)] = 1
        hidden = lm.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        for j, (p, a) in enumerate(rows):
            h = hidden[j, len(p) - 1:len(p) + len(a) - 1]
            out[order[start + j]] = -_ce_sum(h, weight, ids[j, len(p):len(p) + len(a)], chunk, grads=False)[0].item()
    return out


def _side_logps(model: Any, rows: list, pad_id: int) -> list[tuple[float, float]]:
    seqs = [(r.prompt_ids, side) for r in rows for side in (r.chosen_ids, r.rejected_ids)]
    logps = sequence_logps(model, seqs, pad_id)
    return list(zip(logps[0::2], logps[1::2], strict=True))


def preference_eval(model: Any, renderer: Any, pairs: list, beta: float = 0.1,
                    ref_adapter: Optional[str] = None) -> dict:
    """Held-out reward accuracy and mean margin of a LoRA policy against its reference: DPO's implicit
    reward beta * (log pi(answer) - log ref(answer)), the reference being the model with the adapter
    disabled, or `ref_adapter` (the SFT adapter loaded under that name) for runs that started from SFT.
    Used for every stage, so figures compare across stages (ORPO's and SimPO's logged rewards are
    policy-only). `pairs`: PreferencePairs (encoded here) or EncodedPairs; a tie counts as wrong."""
    import torch

    from nekotune.data.preference import PreferencePair
    from nekotune.data.preference_tokens import PreferenceEncoder
    from nekotune.generate import autocast_for

    encoder = PreferenceEncoder(renderer)
    rows = [encoder.encode_pair(p) if isinstance(p, PreferencePair) else p for p in pairs]
    kept = [r for r in rows if r is not None and r.chosen_ids != r.rejected_ids]
    if not kept:
        raise UserError("no pair left to evaluate (each is identical or longer than data.max_seq_len)")
    tok = renderer.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast_for(model):
            policy = _side_logps(model, kept, pad_id)
            if ref_adapter is None:
                with model.disable_adapter():
                    reference = _side_logps(model, kept, pad_id)
            else:
                active = model.active_adapter
                model.set_adapter(ref_adapter)
                try:
                    reference = _side_logps(model, kept, pad_id)
                finally:
                    model.set_adapter(active)
    finally:
        model.train(was_training)
    rewards = [(beta * (p[0] - r[0]), beta * (p[1] - r[1])) for p, r in zip(policy, reference, strict=True)]
    n = len(kept)
    return {"reward_accuracy": sum(c > r for c, r in rewards) / n, "mean_margin": sum(c - r for c, r in rewards) / n,
            "reward_chosen": sum(c for c, _ in rewards) / n, "reward_rejected": sum(r for _, r in rewards) / n,
            # how often the policy itself gives the chosen answer the higher log-probability (no reference)
            "policy_prefers_chosen": sum(p[0] > p[1] for p in policy) / n,
            "n": n, "skipped": len(pairs) - n, "beta": beta, "reference": ref_adapter or "base"}


def _reference_of(source: Any) -> tuple[float, Optional[str]]:
    """(beta, SFT adapter or None) of the run behind --model: run.json of a preference run names its beta
    and reference; any other adapter (an SFT run) is measured against its base with DPO's beta 0.1."""
    from nekotune.registry import TRAINING_STAGES

    metrics = source.run.metrics if source.run is not None else {}
    stage = TRAINING_STAGES.get(str(metrics.get("stage")))
    # the stages without a reference (orpo, simpo) have another beta scale: report DPO's for comparison
    beta = float(metrics.get("pref_beta") or 0.1) if stage is not None and stage.reference else 0.1
    if metrics.get("reference") != "sft":
        return beta, None
    adapter = str(metrics.get("reference_adapter") or "")
    if not (Path(adapter) / "adapter_config.json").is_file():
        raise UserError(f"{source.run_dir} was tuned against the SFT adapter {adapter or '(unnamed)'}, which is "
                        f"gone; restore it to measure rewards against it")
    return beta, adapter


def evaluate_pairs(cfg: Any, model_arg: Optional[str], file: str, out_dir: Optional[str] = None) -> Any:
    """`nekotune eval PAIRS --model RUN`: held-out reward accuracy and margin against the run's reference,
    written to `out_dir` (default <run>/eval) as pair_eval.json and pair_eval.md."""
    from nekotune.data.preference import load_examples
    from nekotune.evaluation import EvalResult
    from nekotune.io import atomic_write_json, atomic_write_text
    from nekotune.model import load_for_inference, require_safetensors_adapter

    loaded = load_for_inference(cfg, model_arg)
    if not loaded.spec.adapter:
        raise UserError("eval on preference pairs measures an adapter against its reference; give --model a run "
                        "or an adapter directory")
    beta, sft_adapter = _reference_of(loaded.spec)
    pairs, fmt = load_examples(file, loaded.cfg.data, "pairs")
    if sft_adapter is not None:
        require_safetensors_adapter(sft_adapter)
        loaded.model.load_adapter(sft_adapter, adapter_name="ref")
    metrics = preference_eval(loaded.model, loaded.renderer, pairs, beta=beta,
                              ref_adapter="ref" if sft_adapter else None)
    if sft_adapter:
        metrics["reference"] = sft_adapter
    results = {"model": loaded.spec.label, "file": file, "format": fmt, **metrics}
    out = Path(out_dir) if out_dir else Path(loaded.spec.run_dir or ".") / "eval"
    summary = pairs_markdown(results)
    atomic_write_json(out / "pair_eval.json", results)
    atomic_write_text(out / "pair_eval.md", summary)
    return EvalResult(results, out / "pair_eval.json", out / "pair_eval.md", summary)


def pairs_markdown(r: dict) -> str:
    rows = [("reward accuracy (chosen > rejected)", f"{r['reward_accuracy']:.3f}"),
            ("mean margin", f"{r['mean_margin']:.4f}"), ("mean reward chosen", f"{r['reward_chosen']:.4f}"),
            ("mean reward rejected", f"{r['reward_rejected']:.4f}"),
            ("policy prefers chosen (no reference)", f"{r['policy_prefers_chosen']:.3f}"),
            ("pairs (skipped)", f"{r['n']} ({r['skipped']})"), ("reference", str(r["reference"])),
            ("beta", str(r["beta"]))]
    return "\n".join([f"{r['model']} on {r['file']}", "", "| metric | value |", "|---|---|",
                      *(f"| {k} | {v} |" for k, v in rows)])
