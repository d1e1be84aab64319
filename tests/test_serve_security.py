"""`nekotune serve` as a web page, a careless client or an attacker would use it (issue 13).

The app runs in-process on a tiny random Llama: Host and Origin checks (DNS rebinding), body,
prompt, stop-string and number limits, no internal text in errors, seeded sampling that does
not touch torch's global RNG, the bounded wait line, and the docs hidden behind a key. Nothing
here depends on how fast the machine is: a busy server is made by holding generations at a gate.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

MSG = [{"role": "user", "content": "hi"}]
LOCAL = "http://127.0.0.1:8000"


@pytest.fixture(scope="module")
def pool(tiny_llama):
    from nekotune.config import load_config
    from nekotune.serve.pool import load_pool

    return load_pool(load_config(None, [], default_to_demo=False), str(tiny_llama), [])


def client(pool, base_url: str = LOCAL, **options):
    from fastapi.testclient import TestClient

    from nekotune.serve.api import create_app

    options.setdefault("max_tokens_cap", 4)
    return TestClient(create_app(pool, **options), base_url=base_url, raise_server_exceptions=False)


@pytest.fixture(scope="module")
def api(pool):
    with client(pool) as c:
        yield c


def chat(c, raw=None, headers=None, **body):
    payload = raw if raw is not None else json.dumps({"model": "base", "messages": MSG, "max_tokens": 2, **body})
    headers = {"content-type": "application/json", **(headers or {})}
    return c.post("/v1/chat/completions", content=payload, headers=headers)


def error_of(resp, status: int) -> dict:
    assert resp.status_code == status, resp.text[:300]
    err = resp.json()["error"]
    assert isinstance(err["message"], str) and err["message"]
    return err


# -- #3: Host and Origin ---------------------------------------------------------------------
@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.nip.io",
                                  "localhost.evil.example", "0.0.0.0", "", "[::1", "a:b:c", "127.0.0.1:80x"])
def test_foreign_host_names_are_403(api, host):
    for resp in (api.get("/health", headers={"Host": host}), chat(api, headers={"Host": host})):
        assert error_of(resp, 403)["code"] == "host_not_allowed"
        assert "evil" not in resp.text  # the refused name is not echoed


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.1:8000", "localhost:1", "LOCALHOST", "localhost.", "[::1]:8000",
                                  "[::1]"])
def test_loopback_names_with_any_port_are_served(api, host):
    assert api.get("/health", headers={"Host": host}).status_code == 200


@pytest.mark.parametrize("origin", ["http://evil.example", "https://evil.example:8000", "null", "file://",
                                    "http://[::1", "chrome-extension://abc"])
def test_cross_site_origins_are_403(api, origin):
    assert error_of(chat(api, headers={"Origin": origin}), 403)["code"] == "host_not_allowed"


def test_same_machine_origins_are_served(api):
    for origin in ("http://127.0.0.1:8000", "http://localhost:3000", "https://[::1]:1"):
        assert chat(api, headers={"Origin": origin}).status_code == 200


def test_allow_host_and_cors_extend_the_sets(pool):
    with client(pool, allow_hosts=["MyBox.lan"], cors_origins=["http://app.example:3000"]) as c:
        assert c.get("/health", headers={"Host": "mybox.lan:8000"}).status_code == 200
        assert c.get("/health", headers={"Host": "otherbox.lan"}).status_code == 403
        ok = chat(c, headers={"Origin": "http://app.example:3000"})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://app.example:3000"
        assert chat(c, headers={"Origin": "http://app.example:4000"}).status_code == 403


def test_bound_address_is_what_is_served(pool):
    with client(pool, base_url="http://192.168.7.7:8000", host="192.168.7.7") as c:
        assert c.get("/health").status_code == 200
        assert c.get("/health", headers={"Host": "localhost"}).status_code == 403
    with client(pool, host="0.0.0.0") as c:  # every interface: loopback names and IP literals, no other names
        assert c.get("/health", headers={"Host": "10.1.2.3:8000"}).status_code == 200
        assert c.get("/health", headers={"Host": "[fe80::1]:8000"}).status_code == 200
        assert c.get("/health", headers={"Host": "rebind.evil.example"}).status_code == 403


def test_bad_allow_host_is_a_user_error(tmp_path):
    from nekotune.cli import main
    from nekotune.errors import UserError
    from nekotune.serve.guard import host_policy

    for bad in ("http://mybox", "mybox:8000", "my box", "a/b"):
        with pytest.raises(UserError, match="--allow-host"):
            host_policy("127.0.0.1", [bad])
    assert main(["serve", str(tmp_path), "--allow-host", "http://mybox"]) == 2


# -- #4: stop strings ------------------------------------------------------------------------
def test_huge_stop_strings_are_refused_and_health_answers(api):
    """4 x 300k-character stops once stalled the event loop for minutes."""
    resp = chat(api, stop=["ab" * 150_000] * 4)
    assert error_of(resp, 400)["param"] == "stop"
    assert error_of(chat(api, stop=["a" * 257]), 400)["param"] == "stop"
    assert error_of(chat(api, stop=["a", "b", "c", "d", "e"]), 400)["param"] == "stop"
    assert chat(api, stop=["x" * 256] * 4).status_code == 200
    assert api.get("/health").json()["status"] == "ok"


def _reference_cut(text: str, stops: list[str]) -> tuple[str, bool]:
    """Brute force: the first position where some stop ends; of those, the earliest start."""
    for end in range(1, len(text) + 1):
        starts = [end - len(s) for s in stops if s and end >= len(s) and text[end - len(s):end] == s]
        if starts:
            return text[:min(starts)], True
    return text, False


def test_stop_scanner_matches_brute_force_across_pieces():
    import random

    from nekotune.serve.limits import StopScanner

    rng = random.Random(13)
    for _ in range(400):
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 40)))
        stops = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 4))]
        scanner, out, hit = StopScanner(stops), "", False
        i = 0
        while i < len(text) and not hit:
            step = rng.randint(1, 6)
            shown, hit = scanner.feed(text[i:i + step])
            out += shown
            i += step
        if not hit:
            out += scanner.flush()
        assert (out, hit) == _reference_cut(text, stops), (text, stops)


def test_stop_scan_is_linear():
    """The worst case for a naive scan: the text keeps almost matching every stop."""
    from nekotune.serve.limits import MAX_STOP_CHARS, StopScanner

    stops = ["a" * (MAX_STOP_CHARS - 1) + tail for tail in "bcde"]
    n = 20_000
    scanner = StopScanner(stops)
    shown = "".join(scanner.feed(piece)[0] for piece in ["a"] * n)
    assert shown == "a" * (n - (MAX_STOP_CHARS - 1))  # the tail that may start a stop is held back
    # Each character costs each automaton one step plus fallbacks paid for by earlier steps.
    assert scanner.work <= 2 * n * len(stops), scanner.work


def test_cpu_work_runs_off_the_event_loop(api, monkeypatch):
    """Tokenizing the prompt, scanning for stops and counting the answer happen in threads."""
    from nekotune.data.render import Renderer
    from nekotune.serve.limits import StopScanner
    from nekotune.serve.pool import ModelPool

    on_loop = []

    def watch(cls, name):
        original = getattr(cls, name)

        def wrapper(*args, **kwargs):
            try:
                asyncio.get_running_loop()
                on_loop.append(name)
            except RuntimeError:
                pass
            return original(*args, **kwargs)

        monkeypatch.setattr(cls, name, wrapper)

    for cls, name in ((Renderer, "prompt_ids"), (StopScanner, "feed"), (ModelPool, "count_tokens")):
        watch(cls, name)
    assert chat(api, stop=["zz"]).status_code == 200
    assert chat(api, stop=["zz"], stream=True).status_code == 200
    assert on_loop == []


# -- #5: body and prompt size ----------------------------------------------------------------
def test_body_over_the_limit_is_413(pool):
    big = json.dumps({"model": "base", "messages": [{"role": "user", "content": "x" * 300_000}]})

    def chunks():  # no Content-Length: the limit counts what arrives
        yield big[:100_000].encode()
        yield big[100_000:].encode()

    with client(pool, max_body=200_000) as c:
        assert error_of(chat(c, raw=big), 413)["code"] == "request_too_large"
        resp = c.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
        assert error_of(resp, 413)["code"] == "request_too_large"
        assert chat(c).status_code == 200


def test_declared_length_is_refused_before_the_body_is_read(pool):
    """A client announcing 100 MB gets its 413 without sending any of it."""
    import uvicorn

    from nekotune.serve.api import create_app

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(pool), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 60
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100000000\r\n\r\n{")
            reply = ""
            while '"request_too_large"' not in reply and (chunk := sock.recv(65536)):
                reply += chunk.decode("latin-1")
        assert reply.startswith("HTTP/1.1 413"), reply[:200]
        assert '"request_too_large"' in reply
    finally:
        server.should_exit = True
        thread.join(timeout=20)


def test_prompt_length_is_checked_before_tokenizing(api, monkeypatch):
    from nekotune.data.render import Renderer

    calls = []
    original = Renderer.prompt_ids
    monkeypatch.setattr(Renderer, "prompt_ids", lambda self, conv: calls.append(1) or original(self, conv))
    resp = chat(api, messages=[{"role": "user", "content": "word " * 30_000}])  # 150k chars, context 1024
    assert error_of(resp, 400)["code"] == "context_length_exceeded"
    assert calls == []


# -- #6: numbers, text and internal errors ---------------------------------------------------
BAD_NUMBERS = [("seed", 2**70), ("seed", -(2**70)), ("repetition_penalty", 1e-308), ("repetition_penalty", 0),
               ("repetition_penalty", 11), ("top_p", 0), ("top_p", 1.5), ("top_k", -1), ("top_k", 2**70),
               ("temperature", -0.1), ("temperature", 2.5), ("max_tokens", 0), ("max_tokens", 2**70),
               ("n", 2**70), ("frequency_penalty", 3)]


@pytest.mark.parametrize("field,value", BAD_NUMBERS)
def test_out_of_range_numbers_are_400(api, field, value):
    assert error_of(chat(api, **{field: value}), 400)["param"] == field


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e400"])
@pytest.mark.parametrize("field", ["temperature", "top_p", "repetition_penalty", "seed", "max_tokens"])
def test_non_finite_numbers_are_400(api, field, token):
    raw = '{"model": "base", "messages": [{"role": "user", "content": "hi"}], "%s": %s}' % (field, token)
    assert error_of(chat(api, raw=raw), 400)["param"] == field


def test_tiny_temperature_answers_like_greedy(api):
    """1e-300 is 0.0 in float32; it once divided logits into NaN and a 500."""
    tiny = chat(api, temperature=1e-300, max_tokens=4)
    greedy = chat(api, temperature=0, max_tokens=4)
    assert tiny.status_code == greedy.status_code == 200
    assert tiny.json()["choices"][0]["message"] == greedy.json()["choices"][0]["message"]


@pytest.mark.parametrize("where", ["content", "part", "system", "stop", "model", "prompt"])
def test_lone_surrogates_are_400(api, where):
    bad = '"\\ud800"'
    bodies = {
        "content": '{"model": "base", "messages": [{"role": "user", "content": %s}]}' % bad,
        "part": '{"model": "base", "messages": [{"role": "user", "content": [{"type": "text", "text": %s}]}]}' % bad,
        "system": '{"model": "base", "messages": [{"role": "system", "content": %s}, '
                  '{"role": "user", "content": "hi"}]}' % bad,
        "stop": '{"model": "base", "messages": [{"role": "user", "content": "hi"}], "stop": [%s]}' % bad,
        "model": '{"model": %s, "messages": [{"role": "user", "content": "hi"}]}' % bad,
    }
    if where == "prompt":
        resp = api.post("/v1/completions", content='{"model": "base", "prompt": %s}' % bad,
                        headers={"content-type": "application/json"})
    else:
        resp = chat(api, raw=bodies[where])
    assert "surrogate" in error_of(resp, 400)["message"]


def test_internal_errors_are_logged_not_echoed(api, monkeypatch, caplog):
    import nekotune.serve.api as api_module

    def broken(*args, **kwargs):
        raise RuntimeError("secret detail /home/someone/.cache/token")

    monkeypatch.setattr(api_module, "prepare", broken)
    with caplog.at_level("ERROR", logger="nekotune.serve"):
        resp = chat(api)
    err = error_of(resp, 500)
    assert "secret" not in resp.text and "home" not in resp.text and err["type"] == "server_error"
    assert "secret detail" in caplog.text  # kept for whoever runs the server


def _sampled(c, seed: int) -> str:
    resp = chat(c, seed=seed, temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0, max_tokens=12)
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["message"]["content"]


def test_seeded_requests_do_not_share_an_rng(pool):
    import torch

    with client(pool, max_concurrency=4, max_tokens_cap=12) as c:
        alone = {seed: _sampled(c, seed) for seed in (1, 2, 3, 4)}
        assert len(set(alone.values())) > 1  # the seed picks the answer: sampling really happened
        torch.manual_seed(0)
        before = torch.get_rng_state()
        for _ in range(3):
            with ThreadPoolExecutor(max_workers=4) as workers:
                together = dict(zip(alone, workers.map(lambda s: _sampled(c, s), alone)))
            assert together == alone
        assert torch.equal(torch.get_rng_state(), before)  # the global RNG was never reseeded or drawn from


def test_seeded_generation_is_the_same_in_process(pool):
    from nekotune.data.formats import Conversation, Turn
    from nekotune.generate import GenSettings, generate

    entry = pool.get("base")
    settings = GenSettings(max_new_tokens=12, temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0, seed=3)
    expected = generate(pool.model, entry.renderer, Conversation(turns=[Turn("user", "hi")]), settings)
    with client(pool, max_tokens_cap=12) as c:
        assert _sampled(c, 3).strip() == expected


# -- #8: docs, key, queue --------------------------------------------------------------------
def test_docs_are_off_when_a_key_is_set(pool):
    with client(pool, api_key="sk-test") as c:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert c.get(path).status_code == 404
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer sk-test"}).status_code == 200
    with client(pool) as c:
        assert c.get("/openapi.json").status_code == 200


@pytest.fixture
def gated_stream(monkeypatch):
    """Generations that yield one piece and then wait for the test to let them finish."""
    import nekotune.serve.api as api_module

    gate = threading.Event()

    def fake_stream(model, renderer, conv, settings, stop=None, inputs=None):
        yield "first"
        while not gate.wait(0.05):
            if stop is not None and stop.is_set():
                return
        yield " last"

    monkeypatch.setattr(api_module, "stream", fake_stream)
    yield gate
    gate.set()


def _wait_health(c, check, timeout=60) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        health = c.get("/health").json()
        if check(health):
            return health
        time.sleep(0.02)
    pytest.fail(f"/health never got there: {health}")


def test_full_line_is_429_with_retry_after(pool, gated_stream):
    with client(pool, max_concurrency=1, max_queue=1) as c, ThreadPoolExecutor(max_workers=2) as workers:
        first = workers.submit(chat, c)
        _wait_health(c, lambda h: h["active"] == 1)
        second = workers.submit(chat, c)
        _wait_health(c, lambda h: h["waiting"] == 1)
        full = chat(c)
        assert error_of(full, 429)["code"] == "rate_limit_exceeded"
        assert int(full.headers["retry-after"]) >= 1
        gated_stream.set()
        for done in (first.result(timeout=60), second.result(timeout=60)):
            assert done.json()["choices"][0]["message"]["content"] == "first last"
        # The places were given back: the line takes requests again.
        assert chat(c).status_code == 200
        health = c.get("/health").json()
        assert health["active"] == 0 and health["waiting"] == 0


def test_api_key_comes_from_the_environment(pool, tmp_path, monkeypatch):
    """`nekotune serve` reads NEKOTUNE_API_KEY and passes every new flag to the app."""
    import uvicorn
    from fastapi.testclient import TestClient

    import nekotune.commands.serve as api_module
    from nekotune.cli import main

    captured = {}
    monkeypatch.setenv("NEKOTUNE_API_KEY", "sk-from-env")
    monkeypatch.setattr(api_module, "load_pool", lambda cfg, model, adapters, **kw: pool)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: captured.update(app=app, **kw))
    assert main(["serve", str(tmp_path), "--port", "0", "--allow-host", "mybox.lan", "--max-body", "1KB",
                 "--max-queue", "3"]) == 0
    with TestClient(captured["app"], base_url="http://mybox.lan") as c:
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer sk-from-env"}).status_code == 200
        assert c.get("/health").json()["max_queue"] == 3
        big = [{"role": "user", "content": "x" * 2000}]
        assert chat(c, headers={"Authorization": "Bearer sk-from-env"}, messages=big).status_code == 413
