"""Read rows from local files, directories or a Hugging Face dataset id.

Every row keeps where it came from ("data.jsonl line 7") so that later errors can name it.
Readers are plain Python (json, csv) so a broken file is reported by line, not by a
stack of pyarrow frames; parquet and hub datasets go through pyarrow/datasets.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nekotune.errors import UserError

SUPPORTED = (".json", ".jsonl", ".csv", ".parquet")
MAX_DEPTH = 64  # nesting deeper than this is hostile input, not a dataset


@dataclass
class Row:
    data: dict[str, Any]
    where: str  # "path row N" / "path line N"
    source: Path | None = None  # the file it came from: relative image paths resolve against its folder


def read_rows(path: str, split: str = "train", max_rows: int | None = None, hub: str | None = None) -> list[Row]:
    """`hub`: data.hub for a dataset id (None: NEKOTUNE_HUB, else huggingface)."""
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in SUPPORTED and f.is_file())
        if not files:
            raise UserError(f"{p}: directory holds no {', '.join(SUPPORTED)} files; point data.path at a data file")
        rows = [r for f in files for r in _from_file(f)]
    elif p.is_file():
        rows = _from_file(p)
    elif _looks_like_hub_id(path):
        rows = _read_hub(path, split, hub)
    else:
        raise UserError(f"data file {path} not found; give a .json/.jsonl/.csv/.parquet file, a directory "
                        f"or a Hugging Face dataset id (owner/name)")
    if max_rows:
        rows = rows[:max_rows]
    return rows


def _from_file(p: Path) -> list[Row]:
    rows = _read_file(p)
    for r in rows:
        r.source = p
    return rows


def _looks_like_hub_id(path: str) -> bool:
    parts = path.split("/")
    return len(parts) == 2 and all(parts) and not path.startswith((".", "~")) and Path(path).suffix == ""


def _decode(p: Path) -> str:
    raw = p.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise UserError(f"{p}: line {line}: not valid UTF-8 (byte {exc.start}); re-save the file as UTF-8") from None


def _read_file(p: Path) -> list[Row]:
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(p)
    text = _decode(p)
    if suffix == ".csv":
        return _read_csv(p, text)
    if suffix == ".jsonl":
        return _read_jsonl(p, text)
    if suffix == ".json":
        return _read_json(p, text)
    raise UserError(f"{p}: unsupported file type {suffix!r}; use one of {', '.join(SUPPORTED)}")


def _check_row(p: Path, obj: Any, where: str) -> dict:
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object with fields, got {type(obj).__name__}; "
                        f"each row must look like {{\"instruction\": ..., \"output\": ...}}")
    if _depth(obj) > MAX_DEPTH:
        raise UserError(f"{where}: nested more than {MAX_DEPTH} levels deep; this is not a dataset row")
    return obj


def _depth(obj: Any, level: int = 0) -> int:
    stack = [(obj, level)]
    deepest = level
    while stack:
        node, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > MAX_DEPTH:
            return deepest
        if isinstance(node, dict):
            stack.extend((v, d + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, d + 1) for v in node)
    return deepest


def _loads(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno}); fix or delete that line") from None
    except RecursionError:
        raise UserError(f"{where}: JSON nested too deeply; this is not a dataset row") from None


def _read_jsonl(p: Path, text: str) -> list[Row]:
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{p} line {n}"
        rows.append(Row(_check_row(p, _loads(line, where), where), where))
    return rows


def _read_json(p: Path, text: str) -> list[Row]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        # A .json file that is really JSON lines is common; accept it.
        if exc.msg.startswith("Extra data") and text.lstrip().startswith("{"):
            return _read_jsonl(p, text)
        raise UserError(f"{p} line {exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno}); "
                        f"fix the file (a JSON array of objects, or one object per line as .jsonl)") from None
    except RecursionError:
        raise UserError(f"{p}: JSON nested too deeply; this is not a dataset") from None
    if isinstance(obj, dict):
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) == 1 and not _is_single_record(obj):
            obj = lists[0]  # {"data": [...]} style wrappers
        else:
            obj = [obj]
    if not isinstance(obj, list):
        raise UserError(f"{p}: expected a JSON array of rows, got {type(obj).__name__}")
    return [Row(_check_row(p, item, f"{p} row {i}"), f"{p} row {i}") for i, item in enumerate(obj, start=1)]


def _is_single_record(obj: dict) -> bool:
    return any(k in obj for k in ("messages", "conversations", "instruction", "text", "output"))


def _read_csv(p: Path, text: str) -> list[Row]:
    try:
        reader = csv.DictReader(io.StringIO(text))
        rows = []
        for i, rec in enumerate(reader, start=1):
            if None in rec:
                raise UserError(f"{p} row {i} (line {reader.line_num}): more values than header columns; "
                                f"quote fields that contain commas")
            rows.append(Row(dict(rec), f"{p} row {i} (line {reader.line_num})"))
        return rows
    except csv.Error as exc:
        raise UserError(f"{p}: invalid CSV ({exc}); fix the quoting") from None


def _read_parquet(p: Path) -> list[Row]:
    try:
        import pyarrow.parquet as pq

        table = pq.read_table(p)
    except Exception as exc:  # pyarrow raises many types for a broken file
        raise UserError(f"{p}: cannot read parquet ({str(exc).splitlines()[0]})") from None
    return [Row(rec, f"{p} row {i}") for i, rec in enumerate(table.to_pylist(), start=1)]


def _read_hub(name: str, split: str, hub: str | None) -> list[Row]:
    """A hub dataset's data files for `split` (never a loading script), read like local files;
    hub.py fails fast with one line when the hub cannot be reached."""
    from nekotune.hub import download_dataset, hub_name

    files = download_dataset(name, hub_name(hub, "data.hub"), split)
    return [r for f in files for r in _read_file(f)]
