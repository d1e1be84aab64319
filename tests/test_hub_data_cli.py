"""Issue 16 through the command line on a tiny Llama: a ModelScope model and dataset (the
package's download functions replaced by local stubs), an unreachable hub failing with one line,
role/content `conversations`, prompt-only `messages` in predict, compare --names and
generate.no_repeat_ngram_size."""

from __future__ import annotations

import json
import shutil
import sys
import types

import pytest

from conftest import tiny_overrides
from nekotune.cli import main


@pytest.fixture
def online(monkeypatch):
    """Undo conftest's HF_HUB_OFFLINE=1 (huggingface_hub froze it at import) for this test."""
    import huggingface_hub.constants as constants

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "NEKOTUNE_HUB", "USE_MODELSCOPE_HUB"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for var in ("MODELSCOPE_REPO_TREE_PAGE_TIMEOUT_SECONDS", "MODELSCOPE_REPO_TREE_PAGE_MAX_ATTEMPTS",
                "MODELSCOPE_API_CONNECT_TIMEOUT"):
        monkeypatch.setenv(var, "x")  # recorded, so what hub.py sets is undone after the test
        monkeypatch.delenv(var)


def _stub_modelscope(monkeypatch, tmp_path, model_dir, dataset_rows, calls, fail=None):
    """`modelscope` with its two download functions replaced: they copy local files into a cache."""
    def snapshot_download(model_id, revision=None, allow_patterns=None, ignore_patterns=None, **kw):
        calls.append(("model", model_id, allow_patterns, ignore_patterns))
        if fail is not None:
            raise fail
        target = tmp_path / "ms-cache" / model_id
        if not target.exists():
            shutil.copytree(model_dir, target)
        return str(target)

    def dataset_snapshot_download(dataset_id, revision=None, allow_patterns=None, ignore_patterns=None, **kw):
        calls.append(("dataset", dataset_id, allow_patterns, ignore_patterns))
        target = tmp_path / "ms-data" / dataset_id
        target.mkdir(parents=True, exist_ok=True)
        (target / "train.jsonl").write_text("\n".join(json.dumps(r) for r in dataset_rows) + "\n")
        return str(target)

    monkeypatch.setitem(sys.modules, "modelscope", types.SimpleNamespace(
        snapshot_download=snapshot_download, dataset_snapshot_download=dataset_snapshot_download))


def test_train_from_modelscope_model_and_role_content_conversations(online, monkeypatch, tiny_llama, tmp_path,
                                                                    capsys):
    rows = [{"conversations": [{"role": "system", "content": "You are Neko."},
                               {"role": "user", "content": f"Question {i}?"},
                               {"role": "assistant", "content": f"Answer {i}, nya~"}]} for i in range(8)]
    calls: list = []
    _stub_modelscope(monkeypatch, tmp_path, tiny_llama, rows, calls)
    out = tmp_path / "run"
    overrides = tiny_overrides("nekotune-tests/tiny-llama", "nekotune-tests/neko-chat", out,
                               **{"model.hub": "modelscope", "data.hub": "modelscope", "train.max_steps": 2})
    assert main(["train", "--no-progress", "--no-samples", *overrides]) == 0
    assert sorted(c[:2] for c in calls) == [("dataset", "nekotune-tests/neko-chat"), ("model", "nekotune-tests/tiny-llama")]
    _, _, allow, ignore = next(c for c in calls if c[0] == "model")
    assert "*.safetensors" in allow and "*.py" in ignore and "*.bin" in ignore  # safetensors only, no code
    info = json.loads((out / "run.json").read_text())
    # a role/content `conversations` column is chat messages, not ShareGPT's from/value
    assert info["data"]["format"] == "messages" and info["data"]["train_rows"] == 8
    assert info["base_model"] == str(tmp_path / "ms-cache" / "nekotune-tests/tiny-llama")
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_unreachable_hugging_face_fails_with_one_line(online, monkeypatch, capsys):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    monkeypatch.setenv("NEKOTUNE_HUB_TIMEOUT", "3")
    assert main(["ask", "hi", "--model", "nekotune-tests/never-there"]) == 2
    err = _one_error_line(capsys)
    assert "cannot reach Hugging Face (http://127.0.0.1:9) model nekotune-tests/never-there" in err
    assert "HF_ENDPOINT" in err and "model.hub=modelscope" in err


def test_unreachable_modelscope_fails_with_one_line(online, monkeypatch, tiny_llama, tmp_path, capsys):
    calls: list = []
    _stub_modelscope(monkeypatch, tmp_path, tiny_llama, [], calls, fail=ConnectionError("[E1020] Connection failed"))
    assert main(["ask", "hi", "--model", "nekotune-tests/tiny-llama", "model.hub=modelscope"]) == 2
    err = _one_error_line(capsys)
    assert "cannot reach ModelScope" in err and "nekotune-tests/tiny-llama" in err and "model.hub=huggingface" in err


def test_predict_with_prompt_only_messages(tiny_llama, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "Who are you?"}]},
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Meow."}, {"role": "user", "content": "And now?"}]},
            {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A reference"}]}]
    data, out = tmp_path / "openai.jsonl", tmp_path / "pred.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(["predict", str(data), "--out", str(out), "--model", str(tiny_llama),
                 "generate.max_new_tokens=4", "generate.temperature=0"]) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["prompt"] for g in got] == ["Who are you?", "And now?", "Q"]
    assert all(isinstance(g["prediction"], str) for g in got)
    assert "reference" not in got[0] and got[2]["reference"] == "A reference"


def test_compare_names_its_columns(tiny_llama, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "Who are you?"}]}) + "\n")
    out = tmp_path / "cmp"
    args = ["compare", "--models", f"base,{tiny_llama}", "--prompts", str(prompts), "--out", str(out),
            "generate.max_new_tokens=3"]
    assert main([*args, "--names", "before,after"]) == 0
    report = json.loads((out / "compare.json").read_text())
    assert report["names"] == ["before", "after"] and set(report["stats"]) == {"before", "after"}
    assert set(report["answers"][0]) == {"prompt", "before", "after"}
    assert "| before |" in (out / "report.md").read_text() and "<th>after</th>" in (out / "report.html").read_text()
    capsys.readouterr()
    assert main([*args, "--names", "only-one"]) == 2
    assert "--names gives 1 name(s) for 2 model(s)" in _one_error_line(capsys)


def test_no_repeat_ngram_size_reaches_generation(tiny_llama):
    import torch

    import nekotune
    from nekotune.generate import _generate_kwargs

    model = nekotune.load(tiny_llama, nekotune.Config.load(None, ["generate.no_repeat_ngram_size=2"]))
    assert model.settings().no_repeat_ngram_size == 2
    renderer = model.loaded.renderer
    from nekotune.data.formats import Conversation, Turn

    ids = renderer.prompt_ids(Conversation(turns=[Turn("user", "Say something long.")]))

    def repeated_bigrams(n: int) -> int:
        kwargs = _generate_kwargs(model.settings(temperature=0.0, max_new_tokens=24, no_repeat_ngram_size=n), renderer)
        assert kwargs.get("no_repeat_ngram_size", 0) == n
        kwargs["eos_token_id"] = None  # generate all 24 tokens
        with torch.no_grad():
            out = model.model.generate(input_ids=torch.tensor([ids]), **kwargs)[0, len(ids):].tolist()
        assert len(out) == 24
        bigrams = list(zip(out, out[1:]))
        return len(bigrams) - len(set(bigrams))

    assert repeated_bigrams(0) > 0  # a random tiny model loops greedily ...
    assert repeated_bigrams(2) == 0  # ... and never repeats a pair of tokens with the setting
