"""`nekotune serve`: the OpenAI-compatible API, driven by the official openai client.

The model is a tiny random Llama built with a wide initialisation, so that greedy answers are
varied words (the narrow default gives empty answers), with two LoRA adapters trained for two
steps each on different answers. Every answer the server gives is checked against the same
generation done in-process, so a request routed to the wrong adapter would show.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from conftest import build_tiny, tiny_overrides

KEY = "sk-nekotune-test"
QUESTIONS = [f"Question number {i}?" for i in range(5)]
ANSWER_TOKENS = 8


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen | None = None, log: Path | None = None, timeout: float = 180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text() if log else ''}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    pytest.fail(f"server at {url} did not come up in {timeout}s:\n{log.read_text() if log else ''}")


# -- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_wide(smol_tokenizer, tmp_path_factory) -> Path:
    return build_tiny("llama", smol_tokenizer, tmp_path_factory.mktemp("tiny-wide"), init_std=0.3)


@pytest.fixture(scope="module")
def runs(tiny_wide, tmp_path_factory) -> dict[str, Path]:
    """Two adapters on the same base, trained on different answers with different system prompts."""
    from nekotune.config import load_config
    from nekotune.training import train

    root = tmp_path_factory.mktemp("runs")
    runs = {}
    for name, word in (("neko", "nya"), ("inu", "woof")):
        data = root / f"{name}.json"
        data.write_text(json.dumps([{"instruction": q, "output": f"{word} {word} {i}"}
                                    for i, q in enumerate(QUESTIONS * 3)]), encoding="utf-8")
        overrides = tiny_overrides(tiny_wide, data, root / name, **{"train.max_steps": 2, "train.lr": 0.05,
                                                                    "data.system_prompt": f"You are {name}."})
        runs[name] = train(load_config(None, overrides, default_to_demo=False), show_progress=False)
    return runs


@pytest.fixture(scope="module")
def names(tiny_wide) -> dict[str, str]:
    """Model name as served -> what the reference loads."""
    return {"base": f"base-{tiny_wide.name}", "neko": "neko", "inu": "inu"}


@pytest.fixture(scope="module")
def references(runs, names) -> dict[tuple[str, str], str]:
    """Greedy answers computed in-process, per (served model name, question)."""
    from nekotune.config import load_config
    from nekotune.data.formats import Conversation, Turn
    from nekotune.generate import GenSettings, generate
    from nekotune.model import load_for_inference

    cfg = load_config(None, [], default_to_demo=False)
    refs = {}
    for key, run in (("neko", runs["neko"]), ("inu", runs["inu"])):
        loaded = load_for_inference(cfg, str(run))
        settings = GenSettings.from_config(loaded.cfg.generate, temperature=0.0, max_new_tokens=ANSWER_TOKENS)
        for q in QUESTIONS:
            conv = Conversation(turns=[Turn("user", q)])
            refs[(names[key], q)] = generate(loaded.model, loaded.renderer, conv, settings)
            if key == "neko":  # the server's base answers with the served run's prompt settings
                with loaded.model.disable_adapter():
                    refs[(names["base"], q)] = generate(loaded.model, loaded.renderer, conv, settings)
    return refs


@pytest.fixture(scope="module")
def server(runs, tmp_path_factory):
    """`nekotune serve neko-run --adapter inu=inu-run` in a subprocess (its RSS is measured)."""
    cwd = tmp_path_factory.mktemp("serve")
    port = free_port()
    log = cwd / "server.log"
    cmd = [sys.executable, "-m", "nekotune", "serve", str(runs["neko"]), "--adapter", f"inu={runs['inu']}",
           "--port", str(port), "--api-key", KEY, "--max-concurrency", "4", "--max-tokens-cap", "64",
           "--engine", "transformers"]  # answers are checked against transformers' (auto may pick llama.cpp)
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log)
        yield {"url": url, "proc": proc, "log": log}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def client(server, key: str = KEY) -> openai.OpenAI:
    # No retries: a failed request must fail the test, not be hidden by a second try.
    return openai.OpenAI(base_url=f"{server['url']}/v1", api_key=key, max_retries=0, timeout=120)


def ask(c: openai.OpenAI, model: str, question: str, **extra):
    return c.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                     temperature=0, max_tokens=ANSWER_TOKENS, **extra)


# -- the API ---------------------------------------------------------------------------------
def test_models_are_listed(server, names):
    c = client(server)
    assert [m.id for m in c.models.list().data] == [names["base"], "neko", "inu"]
    assert c.models.retrieve("base").id == names["base"]  # "base" is an alias of the base model


def test_chat_answers_match_in_process_generation(server, names, references):
    c = client(server)
    answers = {}
    for model in names.values():
        resp = ask(c, model, QUESTIONS[0])
        answers[model] = resp.choices[0].message.content
        assert answers[model].strip() == references[(model, QUESTIONS[0])]
        assert resp.choices[0].finish_reason in ("stop", "length")
        assert resp.usage.prompt_tokens > 0 and 0 < resp.usage.completion_tokens <= ANSWER_TOKENS
        assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    # The adapters change the answer, so picking one by name is observable.
    assert len(set(answers.values())) == 3, answers


def test_run_system_prompt_applies(server, names):
    """A served run renders prompts with its own config (here: its system prompt)."""
    c = client(server)
    neko = ask(c, "neko", QUESTIONS[1]).usage.prompt_tokens
    with_own_system = c.chat.completions.create(
        model="neko", temperature=0, max_tokens=2,
        messages=[{"role": "system", "content": "You are a very very very long system prompt today."},
                  {"role": "user", "content": QUESTIONS[1]}]).usage.prompt_tokens
    assert with_own_system > neko  # the client's system message replaces the run's shorter one


def test_streaming_matches_non_streaming(server, references):
    c = client(server)
    chunks = list(ask(c, "inu", QUESTIONS[2], stream=True, stream_options={"include_usage": True}))
    content = [ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content]
    assert len(content) > 1  # pieces arrived one by one
    assert "".join(content).strip() == references[("inu", QUESTIONS[2])]
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert chunks[0].choices[0].delta.role == "assistant"


def test_completions_endpoint(server, names, references):
    c = client(server)
    resp = c.completions.create(model="inu", prompt=QUESTIONS[3], temperature=0, max_tokens=ANSWER_TOKENS)
    assert resp.choices[0].text.strip() == references[("inu", QUESTIONS[3])]
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="inu", prompt=QUESTIONS[3], temperature=0, max_tokens=ANSWER_TOKENS, stream=True) if ch.choices)
    assert streamed.strip() == references[("inu", QUESTIONS[3])]


def test_stop_strings_cut_the_answer(server, references):
    full = references[("neko", QUESTIONS[0])]
    word = full.split()[1]
    resp = ask(client(server), "neko", QUESTIONS[0], stop=[word])
    assert resp.choices[0].message.content == full[:full.index(word)].lstrip()
    assert resp.choices[0].finish_reason == "stop"


# -- refusals --------------------------------------------------------------------------------
def test_api_key_is_required(server):
    with pytest.raises(openai.AuthenticationError) as err:
        client(server, key="wrong").models.list()
    assert err.value.status_code == 401
    plain = httpx.post(f"{server['url']}/v1/chat/completions", json={"model": "neko", "messages": []})
    assert plain.status_code == 401
    assert plain.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server['url']}/health").status_code == 200  # health probes need no key


def test_unknown_model_is_404(server):
    with pytest.raises(openai.NotFoundError) as err:
        ask(client(server), "no-such-model", "hi")
    body = err.value.response.json()["error"]
    assert body["code"] == "model_not_found" and body["param"] == "model" and body["type"] == "invalid_request_error"


BAD_BODIES = {
    "temperature": {"temperature": 5},
    "max_tokens": {"max_tokens": 0},
    "top_p": {"top_p": 0},
    "n": {"n": 2},
    "stop": {"stop": ["a", "b", "c", "d", "e"]},
    "messages.0.role": {"messages": [{"role": "tool", "content": "x"}]},
    "messages": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
    "model": {"model": None},
}


@pytest.mark.parametrize("param", list(BAD_BODIES))
def test_bad_parameters_are_400(server, param):
    body = {"model": "neko", "messages": [{"role": "user", "content": "hi"}], **BAD_BODIES[param]}
    body = {k: v for k, v in body.items() if v is not None}
    resp = httpx.post(f"{server['url']}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_broken_json_and_oversized_prompt_are_400(server):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    broken = httpx.post(f"{server['url']}/v1/chat/completions", content=b"{not json", headers=headers)
    assert broken.status_code == 400 and "JSON" in broken.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError) as err:
        ask(client(server), "neko", "word " * 1500)  # the tiny model's context is 1024 tokens
    assert err.value.response.json()["error"]["code"] == "context_length_exceeded"


# -- load ------------------------------------------------------------------------------------
def _round(c: openai.OpenAI, models: list[str], n: int = 50) -> list[tuple[str, str, str]]:
    jobs = [(models[i % len(models)], QUESTIONS[i % len(QUESTIONS)]) for i in range(n)]

    def one(job):
        model, q = job
        resp = ask(c, model, q)
        return model, q, resp.choices[0].message.content

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(one, jobs))


def test_fifty_concurrent_requests_and_flat_memory(server, names, references):
    """50 at once with 4 generation slots: all answered, each by the adapter it named, and the
    server's memory does not grow over a second round."""
    c = client(server)
    models = list(names.values())
    proc = psutil.Process(server["proc"].pid)
    t0 = time.time()
    first = _round(c, models)
    rss_first = proc.memory_info().rss
    second = _round(c, models)
    rss_second = proc.memory_info().rss
    elapsed = time.time() - t0
    for model, q, answer in first + second:
        assert answer.strip() == references[(model, q)], (model, q)
    grown = (rss_second - rss_first) / 2**20
    print(f"\n100 requests in {elapsed:.1f}s; server RSS {rss_first / 2**20:.0f} MiB -> "
          f"{rss_second / 2**20:.0f} MiB ({grown:+.0f} MiB)")
    assert grown < 64, f"server RSS grew {grown:.0f} MiB over the second round"
    health = httpx.get(f"{server['url']}/health").json()
    assert health["active"] == 0 and health["waiting"] == 0


# -- disconnects, with the app factory in-process --------------------------------------------
@pytest.fixture
def single_slot_server(runs):
    """create_app with one generation slot, served by uvicorn in a thread."""
    import uvicorn

    from nekotune.config import load_config
    from nekotune.serve.api import create_app
    from nekotune.serve.pool import load_pool

    pool = load_pool(load_config(None, [], default_to_demo=False), str(runs["neko"]), [])
    app = create_app(pool, max_concurrency=1, max_tokens_cap=4096)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, timeout=30)
    yield url
    uv.should_exit = True
    thread.join(timeout=20)


def _wait_for(url: str, check, timeout: float) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        health = httpx.get(f"{url}/health").json()
        if check(health):
            return health
        time.sleep(0.05)
    pytest.fail(f"/health never satisfied the check: {health}")


def test_client_disconnect_frees_the_slot(single_slot_server):
    url = single_slot_server
    body = {"model": "neko", "stream": True, "temperature": 0, "max_tokens": 1000,
            "messages": [{"role": "user", "content": QUESTIONS[0]}]}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            received = [line for line in (next(lines) for _ in range(4)) if line.startswith("data:")]
            assert received
            _wait_for(url, lambda h: h["active"] == 1, timeout=10)
        # Leaving the block closed the connection mid-answer (1000 tokens take many seconds).
        t0 = time.time()
        health = _wait_for(url, lambda h: h["active"] == 0, timeout=5)
        freed_after = time.time() - t0
        assert health["cancelled"] == 1 and health["completed"] == 0
        # The single slot is free again: the next request is answered.
        resp = http.post(f"{url}/v1/chat/completions", json={**body, "stream": False, "max_tokens": 4})
        assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"]
    print(f"\nslot freed {freed_after:.2f}s after the client left")


# -- names -----------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["../x", "a/b", "/abs/path", "..", "base", "", "-x", "a b"])
def test_adapter_names_that_are_paths_are_refused(bad, tmp_path):
    from nekotune.cli import main
    from nekotune.errors import UserError
    from nekotune.serve.pool import parse_adapter_args

    with pytest.raises(UserError):
        parse_adapter_args([f"{bad}={tmp_path}"])
    assert main(["serve", str(tmp_path), f"--adapter={bad}={tmp_path}", "--port", str(free_port())]) == 2


def test_adapter_switch_never_mixes_adapters():
    """Generations share an adapter; a switch waits for them; a waiting name is not starved."""
    from nekotune.serve.pool import AdapterSwitch

    class FakePeft:
        peft_config = {}

        def __init__(self):
            self.adapter = "a"

        def set_adapter(self, name, inference_mode=False):
            self.adapter = name

    model = FakePeft()
    switch = AdapterSwitch(model, active="a")
    seen, lock = [], threading.Lock()
    in_use: dict[str, int] = {}

    def work(name):
        with switch.use(name):
            with lock:
                in_use[name] = in_use.get(name, 0) + 1
                seen.append(set(k for k, v in in_use.items() if v))
                assert model.adapter == name
            time.sleep(0.01)
            with lock:
                in_use[name] -= 1

    with ThreadPoolExecutor(max_workers=12) as pool:
        list(pool.map(work, ["a", "b", "c"] * 20))
    assert all(len(active) == 1 for active in seen)  # never two adapters at once
    assert len(seen) == 60
