"""Bad input of every kind: one line on stderr, exit code 2, no traceback."""

import json

import pytest

from nekotune.cli import main


def run_cli(capsys, *argv):
    rc = main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_one_line_error(rc, err, *needles):
    assert rc == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("nekotune: error:"), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_invalid_json_line(capsys, tmp_path, tiny_llama):
    f = tmp_path / "d.jsonl"
    f.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a" "output": "b"}\n')
    rc, _, err = run_cli(capsys, "train", f"data.path={f}", f"model.name_or_path={tiny_llama}",
                         f"output.dir={tmp_path / 'out'}")
    assert_one_line_error(rc, err, "d.jsonl line 2", "invalid JSON")
    assert not (tmp_path / "out").exists()


def test_missing_field_lists_found_fields(capsys, tmp_path, tiny_llama):
    f = tmp_path / "d.json"
    f.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "a", "reply": "b"}]))
    rc, _, err = run_cli(capsys, "train", f"data.path={f}", f"model.name_or_path={tiny_llama}")
    assert_one_line_error(rc, err, "row 2", "`output` is missing", "instruction, reply")


def test_empty_dataset(capsys, tmp_path, tiny_llama):
    f = tmp_path / "d.json"
    f.write_text("[]")
    rc, _, err = run_cli(capsys, "train", f"data.path={f}", f"model.name_or_path={tiny_llama}")
    assert_one_line_error(rc, err, "no rows")


def test_unknown_format(capsys, tmp_path, tiny_llama):
    f = tmp_path / "d.json"
    f.write_text(json.dumps([{"q": "a", "a": "b"}]))
    rc, _, err = run_cli(capsys, "train", f"data.path={f}", f"model.name_or_path={tiny_llama}")
    assert_one_line_error(rc, err, "cannot tell the format", "data.columns")
    rc, _, err = run_cli(capsys, "train", f"data.path={f}", "data.format=yaml")
    assert_one_line_error(rc, err, "data.format")


def test_missing_model_and_data_paths(capsys, tmp_path, qa_file):
    rc, _, err = run_cli(capsys, "train", f"data.path={qa_file}", "model.name_or_path=./no/such/model")
    assert_one_line_error(rc, err, "no/such/model", "not found")
    rc, _, err = run_cli(capsys, "train", f"data.path={tmp_path / 'nope.json'}")
    assert_one_line_error(rc, err, "nope.json", "not found")


def test_config_wrong_type(capsys):
    rc, _, err = run_cli(capsys, "train", "train.epochs=many")
    assert_one_line_error(rc, err, "train.epochs")
    rc, _, err = run_cli(capsys, "config", "show", "lora.alpah=3")
    assert_one_line_error(rc, err, "lora.alpha")


def test_config_show_prints_effective_config(capsys):
    rc, out, _ = run_cli(capsys, "config", "show", "lora.r=7")
    assert rc == 0 and "r: 7" in out and "name_or_path: smollm2" in out
    rc, out, _ = run_cli(capsys, "config", "show")
    assert rc == 0 and "neko_demo.json" in out


def test_data_check_reports_rows(capsys, tmp_path, tiny_llama):
    f = tmp_path / "d.json"
    rows = [{"instruction": "q1", "output": "a"}, {"instruction": "q2", "output": ""},
            {"instruction": "q1", "output": "a"}, {"instruction": "long " * 300, "output": "a"}]
    f.write_text(json.dumps(rows))
    rc, out, _ = run_cli(capsys, "data", "check", str(f), "--model", str(tiny_llama), "data.max_seq_len=64")
    assert rc == 2
    assert "4 rows, format qa" in out
    assert "field `output` is empty: row 2" in out
    assert "duplicate of an earlier row: row 3" in out
    assert "over data.max_seq_len=64: 1 (row 4" in out
    assert "green" in out or "trained tokens" in out


def test_data_check_ok(capsys, qa_file, tiny_llama):
    rc, out, _ = run_cli(capsys, "data", "check", str(qa_file), "--model", str(tiny_llama))
    assert rc == 0 and "ready to train" in out and "p95" in out
