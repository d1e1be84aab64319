"""Data stage: sources -> formats (Conversation) -> render (tokens) -> collate.

`prepare` runs before training starts, so tokenization never sits in the training loop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nekotune.data.formats import Conversation, Turn, to_conversations
from nekotune.data.habits import repeat_rows, split_rows
from nekotune.data.render import Encoded, Renderer
from nekotune.data.sources import read_rows
from nekotune.errors import UserError

log = logging.getLogger(__name__)

DEMO_DATA = Path(__file__).resolve().parent.parent / "demo" / "neko_demo.json"
DEMO_HELDOUT = Path(__file__).resolve().parent.parent / "demo" / "heldout.json"

__all__ = ["Conversation", "Turn", "Encoded", "Renderer", "load_conversations", "named_datasets", "prepare",
           "PreparedData",
           "DEMO_DATA", "DEMO_HELDOUT", "percentile"]


def load_conversations(path: str | None, data_cfg: Any, max_rows: int | None = None,
                       prompts_only: bool = False) -> tuple[list[Conversation], str]:
    path = path or str(DEMO_DATA)
    rows = read_rows(path, split=data_cfg.split, max_rows=max_rows or data_cfg.max_rows,
                     hub=getattr(data_cfg, "hub", None))
    return to_conversations(rows, data_cfg.format, data_cfg.columns, source=path, prompts_only=prompts_only)


def percentile(values: list[int], q: float) -> int:
    if not values:
        return 0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


@dataclass
class PreparedData:
    train: list[Encoded]
    eval: list[Encoded]
    format: str
    stats: dict = field(default_factory=dict)


def _encode_all(convs: list[Conversation], renderer: Renderer) -> tuple[list[Encoded], int, int]:
    out, truncated, dropped = [], 0, 0
    for conv in convs:
        enc = renderer.encode(conv)
        if enc is None:
            dropped += 1
            continue
        truncated += enc.truncated
        out.append(enc)
    return out, truncated, dropped


def named_datasets(names: list[str], data_cfg: Any, seed: int = 42,
                   max_rows: int | None = None) -> tuple[list[Conversation], str]:
    """issue 15: LLaMA-Factory's `dataset: a,b` -> the conversations of each dataset in
    dataset_dir/dataset_info.json, in order; `max_rows` (its max_samples) counts per dataset,
    as LLaMA-Factory counts it."""
    from nekotune import llamafactory as lf
    from nekotune.data.llamafactory import read_dataset

    stage = "pt" if data_cfg.format == "text" else "sft"
    convs: list[Conversation] = []
    fmt = "text" if stage == "pt" else "messages"
    for ds in lf.resolve_datasets(names, data_cfg.dataset_dir or "data", stage):
        rows = read_dataset(ds, max_samples=max_rows, seed=seed)
        part, fmt = to_conversations(rows, ds.format, source=f"dataset `{ds.name}`")
        convs += part
    return convs, fmt


def _train_conversations(cfg: Any) -> tuple[list[Conversation], str, str]:
    """(conversations, format, what they came from) of data.path or data.dataset."""
    if cfg.data.dataset:
        if cfg.data.path:
            raise UserError(f"data.path={cfg.data.path} and data.dataset={','.join(cfg.data.dataset)} are both set; "
                            f"keep one (data.dataset names datasets in data.dataset_dir/dataset_info.json)")
        convs, fmt = named_datasets(cfg.data.dataset, cfg.data, cfg.train.seed, cfg.data.max_rows)
        return convs, fmt, f"{cfg.data.dataset_dir or 'data'}: {','.join(cfg.data.dataset)}"
    path = cfg.data.path or str(DEMO_DATA)
    convs, fmt = load_conversations(path, cfg.data)
    return convs, fmt, path


def prepare(cfg: Any, renderer: Renderer) -> PreparedData:
    convs, fmt, path = _train_conversations(cfg)
    if cfg.data.val_path:
        train_convs = convs
        eval_convs, _ = load_conversations(cfg.data.val_path, cfg.data, max_rows=None)
    elif cfg.data.eval_dataset:
        train_convs = convs
        eval_convs, _ = named_datasets(cfg.data.eval_dataset, cfg.data, cfg.train.seed, cfg.data.max_rows)
    else:
        train_convs, eval_convs, note = split_rows(convs, cfg.data.val_size, cfg.train.seed)
        if note:  # a one-row dataset trains on its row instead of failing (issue 16)
            log.warning("note: %s", note)
    train, truncated, dropped = _encode_all(train_convs, renderer)
    repeat = getattr(cfg.data, "repeat", 1) or 1
    if repeat > 1:  # after the split, so no validation row is trained on; the Trainer shuffles per epoch
        train = repeat_rows(train, repeat)
    evals, _, _ = _encode_all(eval_convs, renderer)
    if not train:
        raise UserError(f"{path}: no trainable rows left ({dropped} dropped as longer than data.max_seq_len="
                        f"{cfg.data.max_seq_len} or without an answer); raise data.max_seq_len or use "
                        f"data.truncation=truncate")
    lengths = [len(e.input_ids) for e in train]
    stats = {
        "path": path, "format": fmt, "rows": len(convs), "train_rows": len(train), "eval_rows": len(evals),
        "repeat": repeat,
        "truncated_rows": truncated, "dropped_rows": dropped, "tokens": sum(lengths),
        "trained_tokens": sum(e.n_trained for e in train),
        "length_p50": percentile(lengths, 50), "length_p95": percentile(lengths, 95), "length_max": max(lengths),
    }
    stats.update(_image_stats(train, renderer))
    return PreparedData(train=train, eval=evals, format=fmt, stats=stats)


def _image_stats(train: list[Encoded], renderer: Renderer) -> dict:
    """Images, their tokens and the rows dropped because truncation would cut an image (issue 17)."""
    cut = getattr(renderer, "cut_image_rows", None)
    if cut is None:
        return {}
    from nekotune.data.vision_render import image_stats

    found = image_stats(train)  # type: ignore[arg-type]
    return {"images": found["images"], "image_tokens": found["image_tokens"],
            "image_tokens_max": found["image_tokens_max"], "dropped_image_cut": len(cut),
            "dropped_image_cut_rows": cut[:10]}
