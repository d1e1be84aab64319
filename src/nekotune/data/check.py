"""`nekotune data check`: problems by row number before any training starts (a CheckReport)."""

from __future__ import annotations

import copy
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from nekotune.data import percentile
from nekotune.data.formats import FORMATS, apply_mapping, detect_format, with_images
from nekotune.data.render import Renderer
from nekotune.data.sources import Row, read_rows
from nekotune.errors import UserError

MAX_LISTED = 10


def listed(rows: list[str]) -> str:
    """At most MAX_LISTED row names, and how many more."""
    more = f" and {len(rows) - MAX_LISTED} more" if len(rows) > MAX_LISTED else ""
    return ", ".join(rows[:MAX_LISTED]) + more


@dataclass
class CheckReport:
    path: str
    rows: int
    format: str
    tokenizer: str  # where the tokenizer that measured the lengths came from
    max_seq_len: int
    truncation: str
    lengths: list[int] = field(default_factory=list)  # tokens per usable row, whole (never truncated)
    over: list[str] = field(default_factory=list)  # rows longer than max_seq_len
    problems: dict[str, list[str]] = field(default_factory=dict)  # reason -> rows
    example: list[tuple[str, bool]] | None = None  # (text, trained) pieces of the first usable row
    images: dict | None = None  # a vision-language model's rows: images, sizes, image tokens (issue 17)

    @property
    def usable(self) -> int:
        return len(self.lengths)

    @property
    def bad(self) -> int:
        """Rows that cannot be trained on (duplicates can)."""
        return sum(len(v) for k, v in self.problems.items() if not k.startswith("duplicate"))

    @property
    def ok(self) -> bool:
        return self.usable > 0 and not self.bad


def check_file(path: str, data_cfg: Any, tokenizer: Callable[[], tuple[Any, str]]) -> CheckReport:
    """Every row of `path` converted, rendered and measured as training would. `tokenizer()` gives
    (tokenizer, where it came from); it is called once the file itself has been read."""
    rows = read_rows(path, split=data_cfg.split, max_rows=data_cfg.max_rows)
    if not rows:
        raise UserError(f"{path}: no rows; the file is empty")
    mapped = [apply_mapping(r, data_cfg.columns) for r in rows]
    fmt = data_cfg.format if data_cfg.format != "auto" else detect_format(mapped[0].data)
    if not fmt:
        raise UserError(f"{rows[0].where}: cannot tell the format from fields {', '.join(map(str, rows[0].data))}; "
                        f"set data.format (one of {', '.join(FORMATS)}) and map columns with data.columns")
    tok, source = tokenizer()  # a tokenizer, or the model's renderer (a VisionRenderer for a VLM)
    renderer = tok if isinstance(tok, Renderer) else Renderer.from_config(tok, data_cfg)
    # whole rows: the report says how long each is before data.max_seq_len cuts it
    full = copy.copy(renderer)
    full.max_seq_len, full.truncation = 10**9, "truncate"
    report = CheckReport(path, len(rows), fmt, source, data_cfg.max_seq_len, data_cfg.truncation)
    encoded = _scan(report, rows, mapped, with_images(fmt, FORMATS[fmt]), full)
    if renderer.takes_images:
        from nekotune.data.vision_render import image_stats

        report.images = {**image_stats(encoded), "bounds": dict(renderer.image_processor.size)}  # type: ignore
    return report


def _scan(report: CheckReport, rows: list[Row], mapped: list[Row], convert: Callable, full: Renderer) -> list:
    seen: Counter = Counter()
    encoded = []
    for raw, row in zip(rows, mapped):
        try:
            conv = convert(row)
            enc = full.encode(conv)  # a missing or unreadable image is this row's problem
        except UserError as exc:
            reason = str(exc).split(": ", 1)[-1].split(";")[0]
            report.problems.setdefault(reason, []).append(_short(raw.where))
            continue
        key = json.dumps(row.data, sort_keys=True, ensure_ascii=False, default=str)
        seen[key] += 1
        if seen[key] == 2:
            report.problems.setdefault("duplicate of an earlier row", []).append(_short(raw.where))
        n = len(enc.input_ids) if enc else 0
        if report.max_seq_len < getattr(enc, "image_end", 0):  # a VisionEncoded whose cut would split an image
            reason = "dropped: data.max_seq_len would cut an image (raise it or lower data.image_max_pixels)"
            report.problems.setdefault(reason, []).append(_short(raw.where))
            continue
        report.lengths.append(n)
        if n > report.max_seq_len:
            report.over.append(_short(raw.where))
        if enc is not None:
            encoded.append(enc)
        if report.example is None and enc is not None:
            report.example = full.trained_text(enc)
    return encoded


def length_summary(report: CheckReport) -> str:
    lengths = report.lengths
    return (f"tokens per row: p50 {percentile(lengths, 50)}, p95 {percentile(lengths, 95)}, max {max(lengths)}; "
            f"over data.max_seq_len={report.max_seq_len}: {len(report.over)}"
            + (f" ({listed(report.over)}; policy: {report.truncation})" if report.over else ""))


def image_summary(images: dict) -> str:
    def size(hw: Any) -> str:
        return f"{hw[1]}x{hw[0]}" if hw else "-"

    bounds = images.get("bounds") or {}
    return (f"images: {images['images']} in {images['rows_with_images']} rows (at most {images['images_per_row_max']} "
            f"per row), sizes {size(images['smallest'])} to {size(images['largest'])}; image tokens: "
            f"{images['image_tokens']:,} (mean {images['image_tokens_mean']}, max {images['image_tokens_max']} per "
            f"image) at {bounds.get('shortest_edge')}..{bounds.get('longest_edge')} pixels "
            f"(data.image_min_pixels/image_max_pixels); never trained")


def _short(where: str) -> str:
    parts = where.split(" ")
    return " ".join(parts[1:]) if len(parts) > 1 else where
