"""Hostile input: readers, format detection and config parsing give clean one-line errors only.

The budget is small for `make test`; `make fuzz` raises it (NEKOTUNE_FUZZ_EXAMPLES).
"""

import json
import os

from hypothesis import HealthCheck, given, settings, strategies as st

from nekotune.config import load_config
from nekotune.data.formats import to_conversations
from nekotune.data.sources import read_rows
from nekotune.errors import UserError

EXAMPLES = int(os.environ.get("NEKOTUNE_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))

text = st.text(alphabet=st.characters(codec="utf-8"), max_size=50) | st.sampled_from(
    ["", " ", "\x00", "\u202e", "x" * 100_000, "user", "assistant", "human", "gpt", "instruction"])
scalar = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | text
json_value = st.recursive(scalar, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
                          max_leaves=20)
keys = st.sampled_from(["instruction", "input", "output", "text", "target", "messages", "conversations", "history",
                        "system", "role", "content", "from", "value", "question", "answer"]) | text
row = st.dictionaries(keys, json_value | st.lists(st.dictionaries(keys, json_value, max_size=3), max_size=4),
                      max_size=5)


def _convert(path):
    try:
        rows = read_rows(str(path))
        to_conversations(rows, "auto")
    except UserError as exc:
        message = str(exc)
        assert message and "\n" not in message and "Traceback" not in message, message


@FUZZ
@given(rows=st.lists(row | json_value, max_size=5), jsonl=st.booleans())
def test_random_json_structures(tmp_path_factory, rows, jsonl):
    path = tmp_path_factory.mktemp("fz") / ("d.jsonl" if jsonl else "d.json")
    if jsonl:
        path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    else:
        path.write_text(json.dumps(rows), encoding="utf-8")
    _convert(path)


@FUZZ
@given(raw=st.binary(max_size=300), suffix=st.sampled_from([".json", ".jsonl", ".csv", ".parquet"]))
def test_random_bytes(tmp_path_factory, raw, suffix):
    path = tmp_path_factory.mktemp("fz") / f"d{suffix}"
    path.write_bytes(raw)
    _convert(path)


def test_deep_nesting_and_huge_strings(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 200_000 + "]" * 200_000)
    _convert(deep)
    nested = tmp_path / "nested.jsonl"
    nested.write_text('{"instruction": ' + "[" * 5000 + "]" * 5000 + ', "output": "x"}\n')
    _convert(nested)
    huge = tmp_path / "huge.json"
    huge.write_text(json.dumps([{"instruction": "q" * 2_000_000, "output": "\x00\x1b[31m" * 1000}]))
    rows = read_rows(str(huge))
    to_conversations(rows)  # valid, just big: no error


@FUZZ
@given(items=st.lists(st.tuples(st.sampled_from(["lora.r", "train.lr", "data.format", "model.dtype", "x.y",
                                                 "train.resume", "data.columns", "preset", "lora", ""]) | text,
                                text), max_size=4))
def test_config_overrides(items):
    overrides = [f"{k}={v}" for k, v in items]
    try:
        load_config(None, overrides)
    except UserError as exc:
        assert "\n" not in str(exc)


@FUZZ
@given(body=st.text(max_size=200))
def test_config_yaml_files(tmp_path_factory, body):
    path = tmp_path_factory.mktemp("fz") / "c.yaml"
    path.write_text(body, encoding="utf-8")
    try:
        load_config(path)
    except UserError as exc:
        assert "\n" not in str(exc)
