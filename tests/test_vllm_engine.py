"""`nekotune serve --engine vllm` (issue 19), checked by what it builds: vLLM is not installed here.

The command line and its environment, the adapter refusals, the chat template with the run's
system prompt baked in (rendered by transformers as vLLM renders it), and the middleware that
puts nekotune serve's Host, Origin and key rules in front of every vLLM path.
"""

from __future__ import annotations

import json
import shlex

import pytest
from engine_fixtures import make_adapter

from nekotune.errors import UserError

pytest_plugins = ["engine_fixtures"]


@pytest.fixture(scope="module")
def adapters(engine_bases, tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-adapters")
    base = engine_bases["llama"]
    return {"neko": make_adapter(base, root / "neko, v=2"), "big": make_adapter(base, root / "big", r=20)}


def test_vllm_command_line(engine_bases, adapters, tmp_path):
    from nekotune.engines.vllm import vllm_command

    base = engine_bases["llama"]
    launch = vllm_command(str(base), "base-tiny", [("neko", adapters["neko"]), ("big", adapters["big"])],
                          tmp_path / "template.jinja", port=8123, dtype="bf16", max_model_len=2048,
                          api_key="s3cret", enable_thinking=False, max_num_seqs=4, executable="/opt/vllm/bin/vllm",
                          guard_path=tmp_path / "pp")
    argv = launch.argv
    assert argv[:3] == ["/opt/vllm/bin/vllm", "serve", str(base)]

    def value(flag, n=1):
        i = argv.index(flag)
        return argv[i + 1] if n == 1 else argv[i + 1:i + 1 + n]

    assert value("--served-model-name", 2) == ["base-tiny", "base"]
    assert value("--host") == "127.0.0.1" and value("--port") == "8123"
    assert value("--dtype") == "bfloat16" and value("--max-model-len") == "2048"
    assert value("--chat-template") == str(tmp_path / "template.jinja")
    assert value("--generation-config") == "vllm" and value("--max-num-seqs") == "4"
    assert json.loads(value("--default-chat-template-kwargs")) == {"enable_thinking": False}
    assert json.loads(value("--allowed-origins")) == []  # no CORS unless --cors, as nekotune serve
    assert "--enable-lora" in argv and value("--max-loras") == "2"
    assert value("--max-lora-rank") == "32"  # r=20 rounds up to the next rank vLLM accepts
    modules = [json.loads(m) for m in value("--lora-modules", 2)]
    assert modules == [{"name": "neko", "path": str(adapters["neko"].resolve()), "base_model_name": "base-tiny"},
                       {"name": "big", "path": str(adapters["big"].resolve()), "base_model_name": "base-tiny"}]
    assert value("--middleware") == "nekotune.engines.vllm_guard.Guard" and "--disable-fastapi-docs" in argv
    assert not any("s3cret" in a for a in argv)  # the key never reaches argv, where ps shows it
    assert launch.env["VLLM_API_KEY"] == "s3cret" and launch.env["NEKOTUNE_GUARD_BIND"] == "127.0.0.1"
    assert launch.env["PYTHONPATH"].split(":")[0] == str(tmp_path / "pp")
    shown = launch.shell()
    assert "s3cret" not in shown and "VLLM_API_KEY=$NEKOTUNE_API_KEY" in shown
    assert shlex.split(shown)[len(launch.env):] == argv  # a path with ", =" survives the shell


def test_without_adapters_or_key_no_lora_flags(engine_bases, tmp_path):
    from nekotune.engines.vllm import vllm_command

    launch = vllm_command("HuggingFaceTB/SmolLM2-135M-Instruct", "base-smol", [], tmp_path / "t.jinja",
                          host="10.0.0.5", allow_hosts=["box.lan"], cors=["https://app.example"])
    assert "--enable-lora" not in launch.argv and "--lora-modules" not in launch.argv
    assert "VLLM_API_KEY" not in launch.env and "--disable-fastapi-docs" not in launch.argv
    assert launch.argv[launch.argv.index("--host") + 1] == "10.0.0.5"
    assert json.loads(launch.argv[launch.argv.index("--allowed-origins") + 1]) == ["https://app.example"]
    assert launch.env["NEKOTUNE_GUARD_ALLOW_HOSTS"] == "box.lan"
    with pytest.raises(UserError, match="--allow-host"):
        vllm_command("m", "base-m", [], tmp_path / "t.jinja", allow_hosts=["http://x:1"])
    with pytest.raises(UserError, match="model.dtype"):
        vllm_command("m", "base-m", [], tmp_path / "t.jinja", dtype="int4")


def test_max_lora_rank_rounding():
    from nekotune.engines.vllm import max_lora_rank

    assert [max_lora_rank([{"r": r}]) for r in (1, 2, 8, 9, 300, 512)] == [1, 8, 8, 16, 320, 512]
    assert max_lora_rank([{"r": 8, "rank_pattern": {"down_proj": 64}}, {"r": 16}]) == 64
    with pytest.raises(UserError, match="largest --max-lora-rank"):
        max_lora_rank([{"r": 1024}])


@pytest.mark.parametrize("lora,needle", [({"use_dora": True}, "DoRA"), ({"modules_to_save": ["lm_head"]},
                                         "modules_to_save"), ({"rank_pattern": {"q_proj": 2}}, "rank_pattern"),
                                         ({"alpha_pattern": {"q_proj": 2}}, "alpha_pattern")])
def test_refuses_adapters_vllm_would_serve_differently(engine_bases, tmp_path, lora, needle):
    from nekotune.engines.vllm import vllm_command

    adapter = make_adapter(engine_bases["llama"], tmp_path / "ad", **lora)
    with pytest.raises(UserError) as err:
        vllm_command("m", "base-m", [("neko", adapter)], tmp_path / "t.jinja")
    assert needle in str(err.value) and "merge" in str(err.value) and "\n" not in str(err.value)


def test_refuses_pickled_adapters(engine_bases, tmp_path):
    from nekotune.engines.vllm import vllm_command

    adapter = make_adapter(engine_bases["llama"], tmp_path / "ad")
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    with pytest.raises(UserError, match="safetensors only"):
        vllm_command("m", "base-m", [("neko", adapter)], tmp_path / "t.jinja")


@pytest.mark.parametrize("system", [None, 'You are Neko, a "cat" girl.\nAnswer with nya~ ü'])
def test_baked_template_renders_as_the_renderer(smol_tokenizer, tmp_path, system):
    from nekotune.data.formats import Conversation, Turn
    from nekotune.data.render import Renderer
    from nekotune.engines.vllm import write_chat_template

    renderer = Renderer(smol_tokenizer, system_prompt=system)
    path = write_chat_template(renderer.template, system, tmp_path / "t.jinja")
    template = path.read_text(encoding="utf-8")
    for conv in (Conversation(turns=[Turn("user", "hi")]),
                 Conversation(turns=[Turn("user", "hi"), Turn("assistant", "nya"), Turn("user", "more")]),
                 Conversation(system="Be brief.", turns=[Turn("user", "hi")])):
        # what vLLM does with a request: the client's messages, the server's template
        sent = conv.messages(None)
        rendered = smol_tokenizer.apply_chat_template(sent, tokenize=False, chat_template=template,
                                                      add_generation_prompt=True)
        assert rendered == renderer.prompt_text(conv)


def _app(env):
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from nekotune.engines.vllm_guard import Guard

    async def ok(request):
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/health", ok), Route("/v1/models", ok), Route("/invocations", ok, methods=["POST"])])
    return Guard(app, environ=env)


def test_guard_applies_host_origin_and_key_rules_on_every_path():
    from fastapi.testclient import TestClient

    client = TestClient(_app({"NEKOTUNE_GUARD_BIND": "127.0.0.1", "VLLM_API_KEY": "k"}),
                        base_url="http://127.0.0.1:8000")
    key = {"Authorization": "Bearer k"}
    assert client.get("/health").status_code == 200  # open, as nekotune serve's /health
    assert client.get("/v1/models").status_code == 401
    assert client.post("/invocations", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.post("/invocations", headers=key).status_code == 200
    assert client.get("/v1/models", headers=key).status_code == 200
    evil = client.get("/v1/models", headers={**key, "Host": "evil.example"})
    assert evil.status_code == 403 and "Host" in evil.json()["error"]["message"]
    assert client.get("/v1/models", headers={**key, "Origin": "https://evil.example"}).status_code == 403
    assert client.get("/health", headers={"Host": "evil.example"}).status_code == 403


def test_guard_without_key_and_with_allowed_names():
    from fastapi.testclient import TestClient

    env = {"NEKOTUNE_GUARD_BIND": "0.0.0.0", "NEKOTUNE_GUARD_ALLOW_HOSTS": "box.lan",
           "NEKOTUNE_GUARD_CORS": "https://app.example"}
    client = TestClient(_app(env), base_url="http://box.lan:8000")
    assert client.get("/v1/models").status_code == 200
    assert client.get("/v1/models", headers={"Host": "10.1.2.3:8000"}).status_code == 200  # IP literal on 0.0.0.0
    assert client.get("/v1/models", headers={"Origin": "https://app.example"}).status_code == 200
    assert client.get("/v1/models", headers={"Host": "other.lan"}).status_code == 403


def test_guard_pythonpath_exposes_only_nekotune(tmp_path, monkeypatch):
    import subprocess
    import sys

    from nekotune.engines.vllm import guard_pythonpath

    monkeypatch.setenv("NEKOTUNE_CACHE", str(tmp_path))
    root = guard_pythonpath()
    assert [p.name for p in root.iterdir()] == ["nekotune"]
    assert guard_pythonpath() == root  # idempotent
    # a bare interpreter (no site-packages) imports the guard from there alone
    code = "import nekotune.engines.vllm_guard as g; print(g.Guard.__name__)"
    out = subprocess.run([sys.executable, "-S", "-c", code], env={"PYTHONPATH": str(root)}, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "Guard", out.stderr[-1000:]
