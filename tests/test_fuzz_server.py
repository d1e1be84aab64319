"""Hostile request bodies to the API server: OpenAI-format errors, never a 500, a crash or a hang."""

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

EXAMPLES = int(os.environ.get("NEKOTUNE_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def client(tiny_llama):
    from fastapi.testclient import TestClient

    from nekotune.config import load_config
    from nekotune.serve.api import create_app
    from nekotune.serve.pool import load_pool

    pool = load_pool(load_config(None, [], default_to_demo=False), str(tiny_llama), [])
    with TestClient(create_app(pool, max_concurrency=2, max_tokens_cap=3)) as c:
        yield c


text = st.text(max_size=30) | st.sampled_from(["", "base", "user", "assistant", "system", "tool", "../x", "\x00"])
value = st.recursive(st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True) | text,
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
                     max_leaves=12)
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "bogus"]) | value,
                                 "content": text | value})
body = st.fixed_dictionaries({"model": st.sampled_from(["base", "nope", ""]) | value,
                              "messages": st.lists(message, max_size=3) | value},
                             optional={"max_tokens": value, "temperature": value, "top_p": value, "stream": value,
                                       "stop": value, "n": value, "seed": value, "prompt": text | value}) | value

OK = {200, 400, 401, 404, 413, 415, 422}


def _check(resp):
    assert resp.status_code in OK, (resp.status_code, resp.text[:500])
    if resp.status_code != 200:
        err = resp.json()["error"]
        assert isinstance(err["message"], str) and err["message"]


@FUZZ
@given(payload=body, route=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
def test_random_json_bodies(client, payload, route):
    _check(client.post(route, content=json.dumps(payload), headers={"content-type": "application/json"}))


@FUZZ
@given(raw=st.binary(max_size=200), route=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
def test_random_bytes(client, raw, route):
    _check(client.post(route, content=raw, headers={"content-type": "application/json"}))


def test_server_still_answers_after_fuzzing(client):
    resp = client.post("/v1/chat/completions", json={"model": "base", "messages": [{"role": "user", "content": "hi"}],
                                                     "max_tokens": 2})
    assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["role"] == "assistant"
