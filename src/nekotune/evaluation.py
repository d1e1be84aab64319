"""Evaluation and prediction: masked loss and perplexity (as in training), BLEU-4, ROUGE-1/2/L and chrF.

Chinese is segmented with jieba for BLEU/ROUGE (sacrebleu's "zh" tokenizer for BLEU), and chrF
works on characters, so scores on Chinese answers are meaningful rather than near zero.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from nekotune.config import Config
from nekotune.data import load_conversations
from nekotune.data.formats import Conversation
from nekotune.errors import UserError
from nekotune.generate import GenSettings
from nekotune.io import atomic_write_json, atomic_write_text

CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


# -- loss ------------------------------------------------------------------------------------
def masked_loss(model: Any, renderer: Any, convs: list[Conversation], batch_size: int = 8) -> dict:
    """Token-weighted mean cross-entropy over trained (assistant) tokens, exactly as in training."""
    import torch

    from nekotune.data.collate import flatten_batch
    from nekotune.generate import autocast_for
    from nekotune.training.loss import trained_positions_loss
    from nekotune.training.speed import use_packed_attention

    encoded = [e for e in (renderer.encode(c) for c in convs) if e is not None]
    if not encoded:
        raise UserError("no row has an answer to score; eval needs rows with reference answers")
    total, count = 0.0, 0
    use_packed_attention(model)  # per-example attention on the packed rows, as in training
    model.eval()
    features: Any = lambda j: {"input_ids": encoded[j].input_ids, "labels": encoded[j].labels}  # noqa: E731
    collate: Any = flatten_batch
    if renderer.takes_images:  # issue 17: pixels, mm_token_type_ids and M-RoPE positions, as in training
        from nekotune.data.vision_collate import VisionCollator, VisionDataset
        from nekotune.training.vision_loss import rope_index_of

        features = VisionDataset(encoded, renderer).__getitem__  # pixels decoded batch by batch
        collate = VisionCollator(renderer.tokenizer.pad_token_id, renderer.image_token_id, packing=True,
                                 rope_index=rope_index_of(model))
    with torch.no_grad(), autocast_for(model):
        for i in range(0, len(encoded), batch_size):
            batch = collate([features(j) for j in range(i, min(i + batch_size, len(encoded)))])
            batch = {k: v.to(next(model.parameters()).device) for k, v in batch.items()}
            loss, n = trained_positions_loss(model, batch)
            total += float(loss) * n
            count += n
    mean = total / count
    return {"eval_loss": mean, "perplexity": math.exp(min(mean, 50)), "tokens": count, "rows": len(encoded)}


# -- generation metrics ----------------------------------------------------------------------
def tokenize_words(text: str) -> list[str]:
    if CJK.search(text):
        import jieba

        jieba.setLogLevel(60)
        return [w for w in jieba.lcut(text.lower()) if w.strip()]
    return re.findall(r"\w+|[^\w\s]", text.lower())


class _RougeTokenizer:
    def tokenize(self, text: str) -> list[str]:
        return tokenize_words(text)


def text_metrics(predictions: list[str], references: list[str]) -> dict:
    import sacrebleu
    from rouge_score import rouge_scorer

    if not references:
        return {}
    chinese = any(CJK.search(r) for r in references)
    bleu = sacrebleu.corpus_bleu(predictions, [references], tokenize="zh" if chinese else "13a")
    chrf = sacrebleu.corpus_chrf(predictions, [references])
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=_RougeTokenizer())
    sums = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for p, r in zip(predictions, references):
        scores = scorer.score(r, p)
        for k in sums:
            sums[k] += scores[k].fmeasure
    n = len(references)
    return {"bleu4": round(bleu.score, 3), "chrf": round(chrf.score, 3),
            **{k: round(100 * v / n, 3) for k, v in sums.items()}}


# -- the stages ----------------------------------------------------------------------------------
def _rows_with_references(convs: list[Conversation]) -> list[Conversation]:
    return [c for c in convs if c.reference is not None]


def evaluate_model(model: Any, renderer: Any, convs: list[Conversation], settings: GenSettings, limit: int | None,
                   generate: bool, batch_size: int, session: Any = None, base: bool = False) -> dict:
    """Loss on transformers' `model`; the answers from `session`'s engine (issue 19) when given."""
    from nekotune.generate import generate_batch

    result = masked_loss(model, renderer, convs, batch_size=batch_size)
    if generate:
        sample = convs[:limit] if limit else convs
        if session is not None:
            preds = session.generate_batch([c.prompt_part() for c in sample], settings, base=base)
        else:
            preds = generate_batch(model, renderer, [c.prompt_part() for c in sample], settings, batch_size=batch_size)
        result.update(text_metrics(preds, [c.reference or "" for c in sample]))
        result["generated_rows"] = len(sample)
        result["samples"] = [{"prompt": c.prompt_part().turns[-1].content, "reference": c.reference,
                              "prediction": p} for c, p in zip(sample[:20], preds[:20])]
    return result


@dataclass
class EvalResult:
    results: dict  # {"model", "file", "tuned": {...}, "base": {...} with a baseline}
    json_path: Path  # eval_results.json
    summary_path: Path  # summary.md
    summary: str  # its Markdown table


def evaluate(cfg: Config, model_arg: str | None, file: str, out_dir: str | None = None, baseline: bool = False,
             limit: int | None = None, generate: bool = True) -> EvalResult:
    """Loss and perplexity on every row with an answer, and the text metrics on the first `limit`
    (default 50) rows' greedy answers; written to `out_dir` (default <run>/eval)."""
    from nekotune.engines.session import open_session
    from nekotune.model import load_for_inference, resolve_source

    if not Path(file).exists() and "/" not in file:
        raise UserError(f"eval file {file} not found")
    _, effective = resolve_source(cfg, model_arg)
    convs = _rows_with_references(load_conversations(file, effective.data)[0])  # a bad file fails first
    session = open_session(cfg, model_arg, merge=not baseline) if generate else None
    try:
        loaded = session.loaded if session is not None and session.loaded is not None else \
            load_for_inference(cfg, model_arg)
        results = _evaluate_loaded(loaded, session, convs, file, baseline, limit, generate)
    finally:
        if session is not None:
            session.close()
    run_dir = results.pop("run_dir")
    out = Path(out_dir) if out_dir else Path(run_dir) / "eval"
    atomic_write_json(out / "eval_results.json", results)
    summary = summary_markdown(results)
    atomic_write_text(out / "summary.md", summary)
    return EvalResult(results, out / "eval_results.json", out / "summary.md", summary)


def _evaluate_loaded(loaded: Any, session: Any, convs: list[Conversation], file: str, baseline: bool,
                     limit: int | None, generate: bool) -> dict:
    """The results of evaluate(): the tuned model, and with `baseline` its base (the adapter off)."""
    settings = GenSettings.from_config(loaded.cfg.generate, temperature=0.0)
    limit = limit if limit is not None else 50
    bs = loaded.cfg.generate.batch_size
    if session is not None and session.loaded is not None:
        session = None  # transformers: generate on the loaded model itself, as before
    results = {"model": loaded.spec.label, "file": file,
               "tuned": evaluate_model(loaded.model, loaded.renderer, convs, settings, limit, generate, bs, session)}
    if baseline:
        if not loaded.spec.adapter:
            raise UserError("--baseline compares an adapter with its base; --model is not an adapter or run")
        with loaded.model.disable_adapter():
            results["base"] = evaluate_model(loaded.model, loaded.renderer, convs, settings, limit, generate, bs,
                                             session, base=True)
    results["run_dir"] = loaded.spec.run_dir or "."
    return results


METRICS = ["eval_loss", "perplexity", "bleu4", "rouge1", "rouge2", "rougeL", "chrf"]


def summary_markdown(results: dict) -> str:
    cols = [k for k in ("base", "tuned") if k in results]
    names = {"base": "base model", "tuned": results["model"]}
    lines = [f"# Evaluation on {results['file']}", "", "| metric | " + " | ".join(names[c] for c in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for m in METRICS:
        if any(m in results[c] for c in cols):
            lines.append(f"| {m} | " + " | ".join(_fmt(results[c].get(m)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


@dataclass
class PredictResult:
    out: Path
    rows: list[dict]  # {"prompt", "prediction", "reference" when the row has one}


def predict(cfg: Config, model_arg: str | None, file: str, out: str, limit: int | None = None,
            progress: Callable[[int, int], None] | None = None) -> PredictResult:
    """One answer per row of `file`, written as JSON lines to `out`; `progress(done, total)` counts rows."""
    from nekotune.engines.session import open_session
    from nekotune.model import resolve_source

    _, effective = resolve_source(cfg, model_arg)
    convs, _ = load_conversations(file, effective.data, prompts_only=True)  # a bad file fails before loading
    session = open_session(cfg, model_arg)
    try:
        return _predict_rows(session, convs[:limit] if limit else convs, out, progress)
    finally:
        session.close()


def _predict_rows(session: Any, convs: list[Conversation], out: str,
                  progress: Callable[[int, int], None] | None) -> PredictResult:
    settings = session.settings()
    prompts = [c.prompt_part() for c in convs]
    done = 0

    def one_batch(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, len(prompts))

    preds = session.generate_batch(prompts, settings, on_batch=one_batch)
    rows = []
    for conv, prompt, pred in zip(convs, prompts, preds):
        row = {"prompt": prompt.turns[-1].content if prompt.turns else "", "prediction": pred}
        if conv.reference is not None:
            row["reference"] = conv.reference
        rows.append(row)
    atomic_write_text(out, "\n".join(json.dumps(row, ensure_ascii=False) for row in rows) + "\n")
    return PredictResult(Path(out), rows)
