"""Side-by-side answers: base vs fine-tuned after training, and multi-model reports."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nekotune.config import Config
from nekotune.data.formats import Conversation, Turn
from nekotune.errors import UserError


def load_prompts(source: Any, data_cfg: Any, limit: int | None = None) -> list[Conversation]:
    """Prompts from a list of strings, a .txt file (one per line) or any supported dataset."""
    if isinstance(source, list):
        convs = [Conversation(turns=[Turn("user", str(p))], where=f"prompt {i}") for i, p in enumerate(source, 1)]
    else:
        path = Path(str(source))
        if not path.exists():
            raise UserError(f"prompts file {path} not found")
        if path.suffix.lower() == ".txt":
            lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
            convs = [Conversation(turns=[Turn("user", ln)], where=f"{path} line {i}") for i, ln in enumerate(lines, 1)]
        else:
            from nekotune.data import load_conversations

            full, _ = load_conversations(str(path), data_cfg.model_copy(update={"max_rows": None}),
                                         prompts_only=True)
            convs = full
    convs = convs[:limit] if limit else convs
    if not convs:
        raise UserError(f"no prompts in {source}; give at least one")
    return convs


def before_after(model: Any, renderer: Any, cfg: Config) -> list[tuple[str, str, str]]:
    """(prompt, base answer, fine-tuned answer) for the config's sample prompts: the base is the
    same model with its adapter disabled."""
    from nekotune.generate import GenSettings, generate_batch

    convs = load_prompts(cfg.output.sample_prompts, cfg.data, limit=6)
    prompts = [c.prompt_part() for c in convs]
    settings = GenSettings.from_config(cfg.generate)
    model.eval()
    with model.disable_adapter():
        before = generate_batch(model, renderer, prompts, settings, batch_size=cfg.generate.batch_size)
    after = generate_batch(model, renderer, prompts, settings, batch_size=cfg.generate.batch_size)
    return [(conv.turns[-1].content, a, b) for conv, a, b in zip(prompts, before, after)]


# -- multi-model report ----------------------------------------------------------------------
def _checkpoint_curve(paths: list[str]) -> list[tuple[int, float]]:
    """Eval-loss points logged by the Trainer, read from the newest checkpoint's state."""
    from nekotune.io import read_json

    best: list[tuple[int, float]] = []
    for p in paths:
        state = Path(p) / "trainer_state.json"
        if state.is_file():
            hist = read_json(state).get("log_history", [])
            points = [(h["step"], h["eval_loss"]) for h in hist if "eval_loss" in h]
            if len(points) > len(best):
                best = points
    return best


def _svg_curve(points: list[tuple[int, float]], width: int = 480, height: int = 200) -> str:
    if len(points) < 1:
        return ""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    pad = 30
    coords = [(pad + (x - x0) / (x1 - x0) * (width - 2 * pad), height - pad - (y - y0) / (y1 - y0) * (height - 2 * pad))
              for x, y in points]
    poly = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
    dots = "".join(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3"/>' for x, y in coords)
    labels = "".join(f'<text x="{x:.1f}" y="{height - 8}" font-size="10" text-anchor="middle">{s}</text>'
                     for (x, _), s in zip(coords, xs))
    return (f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">'
            f'<polyline fill="none" stroke="#c05" stroke-width="2" points="{poly}"/>{dots}{labels}'
            f'<text x="4" y="14" font-size="11">eval loss {y1:.3f}</text>'
            f'<text x="4" y="{height - pad}" font-size="11">{y0:.3f}</text></svg>')


@dataclass
class CompareResult:
    html: Path
    markdown: Path
    json: Path


SCORES = ("eval_loss", "perplexity", "bleu4", "rougeL", "chrf")


def compare(cfg: Config, models: list[str], prompts_file: str, out_dir: str, limit: int | None = None,
            eval_file: str | None = None, names: list[str] | None = None) -> CompareResult:
    """Every prompt answered by every model (greedy), per-model loss/metrics, one HTML + Markdown;
    `names` titles the models' columns (default: what --models gave)."""
    from nekotune.io import atomic_write_json

    if not models:
        raise UserError("--models is empty; give a comma-separated list like "
                        "base,outputs/run,outputs/run/checkpoints/checkpoint-50")
    for m in models:
        if m != "base" and not Path(m).exists() and m.startswith((".", "/", "outputs")):
            raise UserError(f"model {m} not found")
    labels = column_names(models, names)
    convs = load_prompts(prompts_file, cfg.data, limit=limit)
    prompts = [c.prompt_part() for c in convs]
    scored = [c for c in (load_prompts(eval_file, cfg.data) if eval_file else convs) if c.reference is not None]
    by_model, by_model_stats = _answers(cfg, models, prompts, scored, all_scored=len(scored) == len(convs))
    rows = {label: by_model[m] for label, m in zip(labels, models)}
    stats = {label: by_model_stats[m] for label, m in zip(labels, models)}
    curve = _checkpoint_curve([m for m in models if m != "base"])
    out = Path(out_dir)
    answers = [{"prompt": p.turns[-1].content, **{c: rows[c][i] for c in labels}} for i, p in enumerate(prompts)]
    atomic_write_json(out / "compare.json", {"models": models, "names": labels, "stats": stats, "answers": answers,
                                             "eval_curve": curve})
    _write_reports(out, labels, prompts, rows, stats, curve)
    return CompareResult(out / "report.html", out / "report.md", out / "compare.json")


def column_names(models: list[str], names: list[str] | None) -> list[str]:
    """compare --names: one title per model, none empty or repeated (default: the model arguments)."""
    if names is None:
        return list(models)
    if len(names) != len(models) or not all(names) or len(set(names)) != len(names):
        raise UserError(f"--names gives {len(names)} name(s) for {len(models)} model(s) in --models; give one "
                        f"distinct, non-empty name per model, comma-separated (e.g. --names base,tuned)")
    return list(names)


def _answers(cfg: Config, models: list[str], prompts: list[Conversation], scored: list[Conversation],
             all_scored: bool) -> tuple[dict[str, list[str]], dict[str, dict]]:
    """Each model loaded in turn (one in memory at a time): its answers and its scores."""
    import gc

    from nekotune.engines.session import open_session
    from nekotune.evaluation import masked_loss, text_metrics
    from nekotune.model import HubChoice, load_for_inference, resolve

    rows: dict[str, list[str]] = {}
    stats: dict[str, dict] = {}
    first = next((x for x in models if x != "base"), None)
    hub = HubChoice.of(cfg.model)
    for m in models:
        # "base": the base model of the first other model (or of the config)
        target = m if m != "base" else (resolve(first, hub=hub).base if first else cfg.model.name_or_path)
        with open_session(cfg, target) as session:  # generate.engine answers; the loss needs transformers
            rows[m] = session.generate_batch(prompts, session.settings(temperature=0.0))
            loaded = session.loaded if session.loaded is not None or not scored else load_for_inference(cfg, target)
        st = masked_loss(loaded.model, loaded.renderer, scored) if scored else {}
        if scored and all_scored:
            st.update(text_metrics(rows[m], [c.reference or "" for c in scored]))
        stats[m] = st
        del loaded
        gc.collect()
    return rows, stats


def _write_reports(out: Path, models: list[str], prompts: list[Conversation], rows: dict, stats: dict,
                   curve: list) -> None:
    import html

    from nekotune.io import atomic_write_text

    md = ["# nekotune compare", "", "| model | " + " | ".join(SCORES) + " |", "|---|---|---|---|---|---|"]
    for m in models:
        md.append(f"| {m} | " + " | ".join(_fmt(stats[m].get(k)) for k in SCORES) + " |")
    for i, p in enumerate(prompts):
        md += ["", f"## {i + 1}. {p.turns[-1].content}", ""]
        md += [f"- **{m}**: {rows[m][i]}" for m in models]
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")
    esc = html.escape  # the HTML report: self-contained
    head = "".join(f"<th>{esc(m)}</th>" for m in models)
    stat_rows = "".join(f"<tr><td>{esc(m)}</td>" + "".join(f"<td>{_fmt(stats[m].get(k))}</td>" for k in SCORES)
                        + "</tr>" for m in models)
    body = "".join(f"<tr><td class=p>{esc(p.turns[-1].content)}</td>"
                   + "".join(f"<td>{esc(rows[m][i])}</td>" for m in models) + "</tr>" for i, p in enumerate(prompts))
    svg = _svg_curve(curve)
    page = (
        '<!doctype html><html><head><meta charset="utf-8"><title>nekotune compare</title>\n'
        f"<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin-bottom:2em}}\n"
        f"td,th{{border:1px solid #ccc;padding:6px;vertical-align:top;max-width:28em;white-space:pre-wrap}}"
        f"td.p{{font-weight:bold}}</style>\n"
        "</head><body><h1>nekotune compare</h1>\n"
        f"<h2>Scores</h2><table><tr><th>model</th><th>eval loss</th><th>perplexity</th><th>BLEU-4</th><th>ROUGE-L</th>"
        f"<th>chrF</th></tr>{stat_rows}</table>\n"
        f"{('<h2>Eval loss over checkpoints</h2>' + svg) if svg else ''}\n"
        f"<h2>Answers (greedy)</h2><table><tr><th>prompt</th>{head}</tr>{body}</table></body></html>")
    atomic_write_text(out / "report.html", page)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)
