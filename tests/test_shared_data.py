"""`nekotune data check` and `nekotune train` on every real dataset in ../shared/data (skipped when absent)."""

import json

import pytest

from conftest import shared
from nekotune.cli import main
from test_data import SHARED_CASES


@pytest.mark.parametrize("name,overrides", SHARED_CASES)
def test_check_and_train_on_shared_dataset(name, overrides, tiny_llama, tmp_path, capsys):
    path = shared(name)
    rc = main(["data", "check", str(path), "--model", str(tiny_llama), *overrides])
    out = capsys.readouterr().out
    assert rc == 0, out[-2000:]
    assert "ready to train" in out
    rc = main(["train", "--no-progress", f"data.path={path}", f"model.name_or_path={tiny_llama}",
               f"output.dir={tmp_path / 'run'}", "data.max_rows=16", "train.max_steps=1", "data.max_seq_len=256",
               "lora.r=4", "output.tensorboard=false", *overrides])
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


def test_predict_on_prompt_only_nekobench(tiny_llama, tmp_path, capsys):
    path = shared("NekoBench/NekoBench.json")
    out = tmp_path / "pred.jsonl"
    rc = main(["predict", str(path), "--model", str(tiny_llama), "--out", str(out), "--limit", "3",
               "data.columns.instruction=question", "generate.max_new_tokens=4"])
    assert rc == 0, capsys.readouterr().err
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 3 and rows[0]["prompt"] == json.loads(path.read_text())[0]["question"]
    assert "reference" not in rows[0]
