"""LLaMA-Factory datasets by name (dataset_info.json), templates, and a LLaMA-Factory YAML that
trains on its own datasets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from alias_fixtures import QWEN3_LORA_SFT

from nekotune import llamafactory as lf
from nekotune.data.formats import to_conversations
from nekotune.data.llamafactory import read_dataset
from nekotune.errors import UserError

LF_DEMO = Path(__file__).resolve().parents[2] / "shared" / "data" / "llamafactory_alpaca_demo"


def _write(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A dataset_dir in LLaMA-Factory's shapes: alpaca with history and system, sharegpt with
    default and custom tags, optional columns, a pt text file, and entries to refuse."""
    d = tmp_path / "lf data"
    d.mkdir()
    _write(d / "alpaca.json", [{"instruction": "Add", "input": "1 and 2", "output": "3", "sys": "be exact",
                                "hist": [["hi", "hello"]]},
                               {"instruction": "Name a cat", "input": "", "output": "Tama", "sys": "", "hist": []}])
    _write(d / "sg.json", [{"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "hi"},
                                              {"from": "gpt", "value": "yo"}]}])
    _write(d / "mm.json", [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                            "sys": "system from a column"}])
    (d / "qa.jsonl").write_text('{"question": "2+2?", "answer": 4}\n{"question": "3+3?", "answer": "6"}\n',
                                encoding="utf-8")
    (d / "corpus.txt").write_text("first line of text\n\nsecond line\n", encoding="utf-8")
    (d / "parts").mkdir()
    _write(d / "parts" / "a.json", [{"instruction": "a", "output": "A"}])
    _write(d / "parts" / "b.json", [{"instruction": "b", "output": "B"}])
    _write(d / "dataset_info.json", {
        "alpaca": {"file_name": "alpaca.json", "columns": {"prompt": "instruction", "query": "input",
                                                           "response": "output", "system": "sys", "history": "hist"}},
        "sg": {"file_name": "sg.json", "formatting": "sharegpt"},
        "mm": {"file_name": "mm.json", "formatting": "sharegpt", "columns": {"messages": "messages", "system": "sys"},
               "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                        "assistant_tag": "assistant"}},
        "qa": {"file_name": "qa.jsonl", "columns": {"prompt": "question", "response": "answer"}},
        "c4": {"file_name": "corpus.txt", "columns": {"prompt": "text"}},
        "parts": {"file_name": "parts", "num_samples": 5},
        "dpo": {"file_name": "sg.json", "ranking": True, "formatting": "sharegpt"},
        "mllm": {"file_name": "mm.json", "formatting": "sharegpt", "columns": {"messages": "messages",
                                                                               "images": "images"}},
        "tools": {"file_name": "sg.json", "formatting": "sharegpt", "columns": {"messages": "conversations",
                                                                                "tools": "tools"}},
        "hub": {"hf_hub_url": "llamafactory/alpaca_en", "ms_hub_url": "llamafactory/alpaca_en"},
        "ms_only": {"ms_hub_url": "AI-ModelScope/some"},
        "script": {"script_url": "my_loader"},
        "missing": {"file_name": "nope.json"},
    })
    return d


def _messages(rows) -> list[list[dict]]:
    return [r.data["messages"] for r in rows]


def test_alpaca_columns_system_and_history(data_dir: Path):
    [ds] = lf.resolve_datasets("alpaca", data_dir)
    rows = read_dataset(ds)
    assert _messages(rows)[0] == [{"role": "system", "content": "be exact"}, {"role": "user", "content": "hi"},
                                  {"role": "assistant", "content": "hello"},
                                  {"role": "user", "content": "Add\n1 and 2"},  # one newline, as LLaMA-Factory joins
                                  {"role": "assistant", "content": "3"}]
    assert _messages(rows)[1] == [{"role": "user", "content": "Name a cat"}, {"role": "assistant", "content": "Tama"}]
    assert rows[0].where.endswith("alpaca.json row 1")
    convs, fmt = to_conversations(rows, ds.format)  # nekotune's own reader takes over
    assert fmt == "messages" and convs[0].system == "be exact" and len(convs[0].turns) == 4


def test_given_columns_replace_the_defaults(data_dir: Path):
    """LLaMA-Factory: when `columns` is given, the columns it leaves out are None (no `input`)."""
    [ds] = lf.resolve_datasets(["qa"], data_dir)
    assert ds.columns["query"] is None and ds.columns["prompt"] == "question"
    assert _messages(read_dataset(ds))[0] == [{"role": "user", "content": "2+2?"},
                                                 {"role": "assistant", "content": "4"}]  # numbers become text


def test_sharegpt_default_and_custom_tags(data_dir: Path):
    sg, mm = lf.resolve_datasets("sg,mm", data_dir)
    assert _messages(read_dataset(sg)) == [[{"role": "system", "content": "be brief"},
                                               {"role": "user", "content": "hi"},
                                               {"role": "assistant", "content": "yo"}]]
    assert mm.tags["system_tag"] is None and mm.tags["role_tag"] == "role"  # given tags replace all defaults
    assert _messages(read_dataset(mm))[0][0] == {"role": "system", "content": "system from a column"}


def test_num_samples_max_samples_and_folders(data_dir: Path):
    [parts] = lf.resolve_datasets("parts", data_dir)
    assert [p.name for p in parts.files] == ["a.json", "b.json"]
    rows = read_dataset(parts, seed=1)
    assert len(rows) == 5  # 2 rows resampled to num_samples=5: each one at least once
    assert {r.data["messages"][0]["content"] for r in rows} == {"a", "b"}
    assert read_dataset(parts, max_samples=3, seed=1) == rows[:3]
    assert lf.sample_rows([1, 2, 3, 4], 2, 0) == lf.sample_rows([1, 2, 3, 4], 2, 0)
    assert sorted(lf.sample_rows([1, 2, 3, 4], 4, 0)) == [1, 2, 3, 4]


def test_pretraining_text(data_dir: Path):
    c4, alpaca = lf.resolve_datasets("c4,alpaca", data_dir, stage="pt")
    assert c4.format == "text"
    assert [r.data for r in read_dataset(c4)] == [{"text": "first line of text"}, {"text": "second line"}]
    assert read_dataset(alpaca)[0].data == {"text": "hi"}  # the first prompt's text, as LLaMA-Factory pre-trains
    convs, fmt = to_conversations(read_dataset(c4), "text")
    assert fmt == "text" and convs[1].text == "second line"


@pytest.mark.parametrize("name, words", [
    ("dpo", ["preference"]), ("mllm", ["images", "text models"]), ("tools", ["tool"]),
    ("script", ["never runs code"]), ("missing", ["nope.json", "not found"]),
    ("nope", ["not defined", "alpaca, c4, dpo"]),
])
def test_refused_entries(data_dir: Path, name: str, words: list[str]):
    with pytest.raises(UserError) as err:
        lf.resolve_datasets(name, data_dir)
    for word in words:
        assert word in str(err.value)


def test_hub_entries_and_modelscope(data_dir: Path, monkeypatch):
    hub, ms = lf.resolve_datasets("hub,ms_only", data_dir)
    assert (hub.hub, hub.hub_id, ms.hub) == ("huggingface", "llamafactory/alpaca_en", "modelscope")
    monkeypatch.setenv("USE_MODELSCOPE_HUB", "1")
    [hub] = lf.resolve_datasets("hub", data_dir)
    assert hub.hub == "modelscope"
    with pytest.raises(UserError, match="ModelScope"):
        read_dataset(hub)
    online = lf.resolve_datasets("org/set", "ONLINE")
    assert online[0].hub == "modelscope" and online[0].hub_id == "org/set"


def test_bad_dataset_dirs(tmp_path: Path):
    with pytest.raises(UserError, match="dataset_info.json not found"):
        lf.resolve_datasets("x", tmp_path)
    (tmp_path / "dataset_info.json").write_text('{"a": {"file_name": "a.json"},\n oops}', encoding="utf-8")
    with pytest.raises(UserError, match="line 2: invalid JSON"):
        lf.resolve_datasets("a", tmp_path)
    with pytest.raises(UserError, match="REMOTE"):
        lf.resolve_datasets("a", "REMOTE:org/repo")


def test_rows_that_do_not_fit_are_named(data_dir: Path):
    [sg] = lf.resolve_datasets("sg", data_dir)
    with pytest.raises(UserError, match=r"here row 1: conversations\[2\] is a tool call"):
        lf.convert_row(sg, {"conversations": [{"from": "human", "value": "q"}, {"from": "observation", "value": "x"}]},
                       "here row 1")
    with pytest.raises(UserError, match="'bot', none of the dataset's tags"):
        lf.convert_row(sg, {"conversations": [{"from": "bot", "value": "q"}]}, "here row 2")
    [alpaca] = lf.resolve_datasets("alpaca", data_dir)
    with pytest.raises(UserError, match="no answer text in column `output`"):
        lf.convert_row(alpaca, {"instruction": "q"}, "here row 3")


@pytest.mark.parametrize("template, model, settings, kind, words", [
    ("qwen3_nothink", "Qwen/Qwen3-4B-Instruct-2507", {"data.enable_thinking": False}, "alias", ["(Qwen3)"]),
    ("qwen3", "Qwen/Qwen3-1.7B", {}, "alias", ["(Qwen3)"]),
    ("qwen", "Qwen/Qwen2.5-7B-Instruct", {}, "alias", ["Qwen2.5"]),
    ("llama3", "Qwen/Qwen3-1.7B", {}, "warning", ["Llama 3", "looks like Qwen3"]),
    ("qwen3", "Qwen/Qwen3.5-9B", {}, "warning", ["looks like Qwen3.5"]),
    ("alpaca", "meta-llama/Llama-2-7b-hf", {}, "warning", ["plain-text", "model.chat_template"]),
    ("chatml", "anything", {}, "alias", ["ChatML"]),
    ("qwen3", "/models/my-finetune", {}, "warning", ["cannot be told"]),
    ("no_such_template", "Qwen/Qwen3-1.7B", {}, "warning", ["not a template nekotune knows"]),
])
def test_template_settings(template, model, settings, kind, words):
    got, notes = lf.template_settings(template, model)
    assert got == settings
    assert notes[-1][1] == kind
    for word in words:
        assert word in notes[-1][0], notes


def test_detection():
    assert lf.is_llamafactory({"stage": "sft"}) and lf.is_llamafactory({"dataset": "a", "template": "qwen3"})
    assert not lf.is_llamafactory({"learning_rate": 1e-4, "dataset": "my/data"})


def test_the_demo_datasets_from_shared_data(tmp_path: Path):
    if not LF_DEMO.is_dir():
        pytest.skip(f"{LF_DEMO} not available (../shared is absent)")
    info = {n: {"file_name": str(LF_DEMO / f"{n}.json")} for n in ("identity", "alpaca_en_demo", "alpaca_zh_demo")}
    _write(tmp_path / "dataset_info.json", info)
    counts = {ds.name: len(read_dataset(ds)) for ds in lf.resolve_datasets(list(info), tmp_path)}
    assert counts == {"identity": 91, "alpaca_en_demo": 999, "alpaca_zh_demo": 1000}
    [zh] = lf.resolve_datasets("alpaca_zh_demo", tmp_path)
    convs, _ = to_conversations(read_dataset(zh, max_samples=10), "messages")
    assert len(convs) == 10 and convs[0].turns[0].content.startswith("识别并解释")


def test_llamafactory_yaml_trains_on_its_own_datasets(tiny_qwen3: Path, tmp_path: Path, monkeypatch, capsys):
    """qwen3_lora_sft.yaml as LLaMA-Factory ships it (only the model swapped for a tiny one), run
    from a folder whose data/dataset_info.json names its datasets, as `llamafactory-cli train`
    runs it; the command line shortens it in LLaMA-Factory's own words and nekotune's."""
    from nekotune.cli import main

    if not LF_DEMO.is_dir():
        pytest.skip(f"{LF_DEMO} not available (../shared is absent)")
    (tmp_path / "data").mkdir()
    _write(tmp_path / "data" / "dataset_info.json", {n: {"file_name": str(LF_DEMO / f"{n}.json")}
                                                     for n in ("identity", "alpaca_en_demo")})
    yaml_file = tmp_path / "qwen3_lora_sft.yaml"
    yaml_file.write_text(QWEN3_LORA_SFT.replace("Qwen/Qwen3-4B-Instruct-2507", str(tiny_qwen3)), encoding="utf-8")
    monkeypatch.chdir(tmp_path)  # dataset_dir defaults to data/, relative to where it runs
    run = tmp_path / "run"
    code = main(["train", str(yaml_file), "--max_samples", "40", "--cutoff_len=96", "--max_steps", "2",
                 "--per_device_train_batch_size", "2", "gradient_accumulation_steps=1", f"output_dir={run}",
                 "output.tensorboard=false", "--no-samples", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    info = json.loads((run / "run.json").read_text(encoding="utf-8"))
    assert info["data"]["train_rows"] == 80  # max_samples applies to each dataset
    assert info["data"]["path"] == "data: identity,alpaca_en_demo"
    saved = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    assert (saved["lora"]["r"], saved["lora"]["alpha"], saved["data"]["enable_thinking"]) == (8, 16, False)
    assert (saved["model"]["dtype"], saved["train"]["max_steps"], saved["data"]["max_seq_len"]) == ("bf16", 2, 96)
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
