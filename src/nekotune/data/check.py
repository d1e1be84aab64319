"""`nekotune data check`: problems by row number before any training starts."""

from __future__ import annotations

import json
from collections import Counter

from nekotune.data import percentile
from nekotune.data.formats import FORMATS, detect_format
from nekotune.data.render import Renderer
from nekotune.data.sources import read_rows
from nekotune.errors import UserError

MAX_LISTED = 10


def _listed(rows: list[str]) -> str:
    more = f" and {len(rows) - MAX_LISTED} more" if len(rows) > MAX_LISTED else ""
    return ", ".join(rows[:MAX_LISTED]) + more


def check_file(path: str, cfg, model: str | None = None) -> int:
    from rich.console import Console
    from rich.text import Text

    from nekotune import model as M
    from nekotune.data.formats import apply_mapping

    console = Console(highlight=False, soft_wrap=True)
    rows = read_rows(path, split=cfg.data.split, max_rows=cfg.data.max_rows)
    if not rows:
        raise UserError(f"{path}: no rows; the file is empty")
    mapped = [apply_mapping(r, cfg.data.columns) for r in rows]
    fmt = cfg.data.format if cfg.data.format != "auto" else detect_format(mapped[0].data)
    if not fmt:
        raise UserError(f"{rows[0].where}: cannot tell the format from fields {', '.join(map(str, rows[0].data))}; "
                        f"set data.format (one of {', '.join(FORMATS)}) and map columns with data.columns")
    spec = M.resolve(model or cfg.model.name_or_path)
    tokenizer = M.load_tokenizer(spec, cfg.model)
    renderer = Renderer.from_config(tokenizer, cfg.data)
    convert = FORMATS[fmt]
    problems: dict[str, list[str]] = {}
    seen: Counter = Counter()
    first_row: dict[str, str] = {}
    lengths, over, example = [], [], None
    for raw, row in zip(rows, mapped):
        try:
            conv = convert(row)
        except UserError as exc:
            reason = str(exc).split(": ", 1)[-1].split(";")[0]
            problems.setdefault(reason, []).append(_short(raw.where))
            continue
        key = json.dumps(row.data, sort_keys=True, ensure_ascii=False, default=str)
        seen[key] += 1
        if seen[key] == 2:
            problems.setdefault("duplicate of an earlier row", []).append(_short(raw.where))
        first_row.setdefault(key, raw.where)
        full = Renderer(tokenizer, renderer.system_prompt, renderer.enable_thinking, max_seq_len=10**9,
                        train_on_prompt=renderer.train_on_prompt, chat_template=renderer.template)
        enc = full.encode(conv)
        n = len(enc.input_ids) if enc else 0
        lengths.append(n)
        if n > cfg.data.max_seq_len:
            over.append(_short(raw.where))
        if example is None and enc is not None:
            example = full.trained_text(enc)
    usable = len(lengths)
    console.print(f"[bold]{path}[/]: {len(rows)} rows, format [bold]{fmt}[/], tokenizer {spec.base}")
    if lengths:
        console.print(f"tokens per row: p50 {percentile(lengths, 50)}, p95 {percentile(lengths, 95)}, "
                      f"max {max(lengths)}; over data.max_seq_len={cfg.data.max_seq_len}: {len(over)}"
                      + (f" ({_listed(over)}; policy: {cfg.data.truncation})" if over else ""))
    for reason, where in problems.items():
        console.print(f"[yellow]{len(where)} rows[/]: {reason}: {_listed(where)}")
    if example:
        console.print("\nexample as the model sees it ([green]green[/] = trained tokens):")
        text = Text()
        for piece, trained in example:
            text.append(piece, style="green" if trained else "dim")
        console.print(text)
    bad = sum(len(v) for k, v in problems.items() if not k.startswith("duplicate"))
    if usable == 0:
        console.print("[red]no row can be trained on[/]")
        return 2
    if bad:
        console.print(f"[red]{bad} rows cannot be trained on[/]; fix them (or delete them) before training")
        return 2
    console.print("[green]ok[/]: ready to train")
    return 0


def _short(where: str) -> str:
    parts = where.split(" ")
    return " ".join(parts[1:]) if len(parts) > 1 else where
