"""Issue 19 end to end through the config and the command line: generate.engine / --engine, the
llama.cpp engine under ask, predict and serve, `export gguf-lora`, Ollama's ADAPTER and
`serve --engine vllm` (by the arguments it starts vLLM with; vLLM is not installed here).

The llama.cpp parts skip when llama-cpp-python is absent. The base model's weights are rounded
to fp16 and saved in fp32, so transformers (fp32) and the f16 GGUF hold the same numbers and
greedy answers must be equal token for token.
"""

from __future__ import annotations

import json
import os
import stat
import sys

import pytest
from engine_fixtures import QUESTIONS, make_adapter, needs_llama_cpp

from nekotune.cli import main

pytest_plugins = ["engine_fixtures"]
GREEDY = ["generate.temperature=0", "generate.max_new_tokens=16", "generate.gguf_type=f16"]


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """GGUF conversions and vLLM templates in a temporary cache, never the user's."""
    monkeypatch.setenv("NEKOTUNE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def f16_base(engine_bases, tmp_path_factory):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = engine_bases["llama"]
    out = tmp_path_factory.mktemp("f16-base") / "tiny-llama"
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.half().float())
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapter(f16_base, tmp_path_factory):
    return make_adapter(f16_base, tmp_path_factory.mktemp("wiring") / "neko", seed=3, std=0.1)


def _ask(capsys, model, engine, question, *extra):
    capsys.readouterr()
    rc = main(["ask", question, "--model", str(model), "--json", "--engine", engine, *GREEDY, *extra])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return json.loads(captured.out)["answer"], captured.err


# -- the config key and the flag ---------------------------------------------------------------
def test_engine_key_and_flag():
    from nekotune.cli import build_parser
    from nekotune.config import load_config
    from nekotune.errors import UserError

    assert load_config(None, [], default_to_demo=False).generate.engine == "auto"
    assert load_config(None, ["generate.engine=llama.cpp"], default_to_demo=False).generate.engine == "llama.cpp"
    with pytest.raises(UserError, match="generate.engine"):
        load_config(None, ["generate.engine=tensorrt"], default_to_demo=False)
    parser = build_parser()
    for argv in (["chat"], ["ask", "q"], ["predict", "f.json", "--out", "o"], ["eval", "f.json"],
                 ["compare", "--models", "a", "--prompts", "p", "--out", "o"], ["serve"]):
        assert parser.parse_args([*argv, "--engine", "vllm"]).engine == "vllm"
    with pytest.raises(SystemExit):
        parser.parse_args(["ask", "q", "--engine", "tensorrt"])


def test_vllm_is_refused_outside_serve(f16_base, capsys):
    assert main(["ask", "hi", "--model", str(f16_base), "--engine", "vllm"]) == 2
    assert "serves only" in capsys.readouterr().err


def test_run_config_does_not_choose_the_engine(f16_base, tmp_path):
    """generate.engine is this machine's choice: a run's config.yaml never passes it on."""
    from nekotune.config import load_config
    from nekotune.model import ModelSource, effective_config

    source = ModelSource(base=str(f16_base), run_config={"generate": {"engine": "vllm", "temperature": 0.3}})
    effective = effective_config(load_config(None, [], default_to_demo=False), source)
    assert effective.generate.engine == "auto" and effective.generate.temperature == 0.3


# -- llama.cpp under ask and predict -----------------------------------------------------------
@needs_llama_cpp
def test_auto_says_which_engine_it_picked(f16_base, capsys):
    _, err = _ask(capsys, f16_base, "auto", "hi")
    assert "engine: llama.cpp (auto: CPU, llama-cpp-python installed)" in err


@needs_llama_cpp
def test_same_prompt_ids_on_both_engines(f16_base, adapter):
    from nekotune.config import load_config
    from nekotune.data.formats import Conversation, Turn
    from nekotune.engines.session import open_session

    conv = Conversation(turns=[Turn("user", "What is 12 times 7?")], system="You are a cat.")
    ids = {}
    for engine in ("transformers", "llama.cpp"):
        cfg = load_config(None, [f"generate.engine={engine}", *GREEDY], default_to_demo=False)
        with open_session(cfg, str(adapter)) as session:
            assert session.choice.name == engine
            ids[engine] = session.prompt_ids(conv)
            session.generate(conv, session.settings())
            if engine == "llama.cpp":  # what llama.cpp evaluated is those ids, not text it templated again
                assert list(session.engine.llm.input_ids[:len(ids[engine])]) == ids[engine]
    assert ids["transformers"] == ids["llama.cpp"]


@needs_llama_cpp
def test_f16_llamacpp_greedy_answers_equal_transformers_through_the_cli(f16_base, capsys, tmp_path):
    for question in QUESTIONS[:3]:
        hf, _ = _ask(capsys, f16_base, "transformers", question)
        lc, err = _ask(capsys, f16_base, "llama.cpp", question)
        assert lc == hf and len(hf) > 10, (question, hf, lc)  # real answers, not empty ones that agree
        assert "engine: llama.cpp (requested)" in err
    data = tmp_path / "rows.json"
    data.write_text(json.dumps([{"instruction": q, "output": "x"} for q in QUESTIONS]), encoding="utf-8")
    rows = {}
    for engine in ("transformers", "llama.cpp"):
        out = tmp_path / f"{engine}.jsonl"
        assert main(["predict", str(data), "--out", str(out), "--model", str(f16_base), "--engine", engine,
                     *GREEDY]) == 0
        rows[engine] = [json.loads(line)["prediction"] for line in out.read_text().splitlines()]
    assert rows["llama.cpp"] == rows["transformers"] and len(rows["llama.cpp"]) == len(QUESTIONS)


# -- serve: one base GGUF, adapters per request ------------------------------------------------
@needs_llama_cpp
def test_one_llamacpp_server_answers_as_base_and_as_adapter(f16_base, adapter):
    from fastapi.testclient import TestClient

    from nekotune.config import load_config
    from nekotune.engines.serve_pool import load_llamacpp_pool
    from nekotune.serve.api import create_app

    cfg = load_config(None, GREEDY, default_to_demo=False)
    pool = load_llamacpp_pool(cfg, str(f16_base), [("neko", str(adapter))])
    assert pool.names == ["base-tiny-llama", "neko"] and pool.engine.adapters == ["neko"]

    def answer(c, model, question):
        body = {"model": model, "messages": [{"role": "user", "content": question}], "temperature": 0}
        resp = c.post("/v1/chat/completions", json=body)
        assert resp.status_code == 200, resp.text
        return resp.json()["choices"][0]["message"]["content"]

    try:
        with TestClient(create_app(pool, max_concurrency=2), base_url="http://127.0.0.1:8000") as c:
            for question in QUESTIONS[:2]:
                base, neko = answer(c, "base", question), answer(c, "neko", question)
                assert base and neko and base != neko
                assert answer(c, "base", question) == base  # switching back empties the adapter's cache
    finally:
        pool.engine.close()


@needs_llama_cpp
def test_serve_unknown_adapter_name_is_refused(f16_base, adapter):
    from nekotune.config import load_config
    from nekotune.engines.serve_pool import load_llamacpp_pool
    from nekotune.errors import UserError

    with pytest.raises(UserError, match="not found"):
        load_llamacpp_pool(load_config(None, GREEDY, default_to_demo=False), str(f16_base),
                           [("neko", str(adapter) + "-missing")])


# -- serve --engine vllm -----------------------------------------------------------------------
@pytest.fixture
def fake_vllm(tmp_path, monkeypatch):
    """A `vllm` executable that records its arguments and environment instead of serving."""
    record = tmp_path / "vllm-call.json"
    script = tmp_path / "vllm"
    script.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                      f"json.dump({{'argv': sys.argv, 'key': os.environ.get('VLLM_API_KEY'),"
                      f" 'pythonpath': os.environ.get('PYTHONPATH')}}, open({str(record)!r}, 'w'))\n", encoding="utf-8")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("NEKOTUNE_VLLM", str(script))
    return script, record


def test_serve_engine_vllm_starts_vllm_with_the_runs_adapters(f16_base, adapter, fake_vllm, monkeypatch, capsys):
    script, record = fake_vllm
    monkeypatch.setenv("NEKOTUNE_API_KEY", "s3cret")
    rc = main(["serve", str(adapter), "--engine", "vllm", "--adapter", f"cat={adapter}", "--port", "8765",
               "--max-concurrency", "3"])
    out = capsys.readouterr().out
    assert rc == 0
    call = json.loads(record.read_text())
    argv = call["argv"]
    assert argv[0] == str(script) and argv[1:3] == ["serve", str(f16_base)]
    assert argv[argv.index("--served-model-name") + 1:argv.index("--served-model-name") + 3] == \
        ["base-tiny-llama", "base"]
    assert argv[argv.index("--port") + 1] == "8765" and argv[argv.index("--max-num-seqs") + 1] == "3"
    modules = [json.loads(m) for m in argv[argv.index("--lora-modules") + 1:argv.index("--lora-modules") + 3]]
    assert [m["name"] for m in modules] == ["neko", "cat"] and modules[0]["path"] == str(adapter.resolve())
    assert "--enable-lora" in argv and "s3cret" not in " ".join(argv) and call["key"] == "s3cret"
    template = argv[argv.index("--chat-template") + 1]
    assert os.path.isfile(template) and str(os.environ["NEKOTUNE_CACHE"]) in template
    assert call["pythonpath"].split(os.pathsep)[0].startswith(os.environ["NEKOTUNE_CACHE"])
    assert "starting vLLM's server" in out and "VLLM_API_KEY=$NEKOTUNE_API_KEY" in out


def test_serve_without_vllm_is_one_line(f16_base, monkeypatch, capsys):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("NEKOTUNE_VLLM", raising=False)
    assert main(["serve", str(f16_base), "--engine", "vllm", "--port", "8766"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no `vllm` executable" in err[0]


def test_serve_prints_the_equivalent_vllm_command(f16_base, adapter, monkeypatch, capsys):
    import uvicorn

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(kw))
    assert main(["serve", str(adapter), "--engine", "transformers", "--port", "8767"]) == 0
    out = capsys.readouterr().out
    assert served["port"] == 8767
    line = next(x for x in out.splitlines() if "vLLM serves the same" in x)
    assert f"vllm serve {f16_base}" in line and "--enable-lora" in line and "--port 8767" in line


# -- export gguf-lora and Ollama's ADAPTER -----------------------------------------------------
def test_export_gguf_lora_command(adapter, tmp_path, capsys):
    import gguf

    out = tmp_path / "neko-lora.gguf"
    assert main(["export", "gguf-lora", "--model", str(adapter), "--out", str(out)]) == 0
    reader = gguf.GGUFReader(out)
    assert bytes(reader.fields["general.type"].parts[-1]).decode() == "adapter"
    assert any(t.name.endswith(".lora_a") for t in reader.tensors)
    assert "LoRA pairs" in capsys.readouterr().err
    assert main(["export", "gguf-lora", "--model", str(adapter), "--out", str(tmp_path / "x.bin")]) == 2


def test_ollama_adapter_option(adapter, engine_bases, tmp_path, capsys):
    out = tmp_path / "ollama"
    assert main(["export", "ollama", "--model", str(adapter), "--out", str(out), "--type", "f16", "--adapter"]) == 0
    modelfile = (out / "Modelfile").read_text().splitlines()
    assert modelfile[0].startswith("FROM ./") and "-base-" in modelfile[0]
    assert modelfile[1] == "ADAPTER ./neko-lora.gguf" and (out / "neko-lora.gguf").is_file()
    qwen3 = make_adapter(engine_bases["qwen3"], tmp_path / "qwen3-neko")
    capsys.readouterr()
    assert main(["export", "ollama", "--model", str(qwen3), "--out", str(tmp_path / "o3"), "--adapter"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "qwen3" in err[0] and "does not apply LoRA" in err[0]
    assert not (tmp_path / "o3").exists()


@needs_llama_cpp
def test_llamacpp_refuses_an_adapter_of_another_base_in_one_line(adapter, f16_base, tmp_path, capsys):
    import shutil

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(f16_base)
    other = tmp_path / "narrower-base"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(other)
    tokenizer.save_pretrained(other)
    wrong = tmp_path / "wrong"
    shutil.copytree(adapter, wrong)
    config = json.loads((wrong / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(other)
    (wrong / "adapter_config.json").write_text(json.dumps(config))
    capsys.readouterr()  # save_pretrained's progress bar
    assert main(["ask", "hi", "--model", str(wrong), "--engine", "llama.cpp"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not fit base model" in err[0] and str(other) in err[0]
