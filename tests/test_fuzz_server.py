"""Hostile request bodies to the API server: OpenAI-format errors, never a 500, a crash or a hang.

Besides random JSON, the bodies carry the values that once broke it: long and odd stop strings,
numbers at and past every edge (huge, tiny, NaN, infinite, negative, 2**70) and odd text (lone
surrogates, NUL, right-to-left marks, emoji). `make fuzz` runs many more examples.
"""

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
    app = create_app(pool, max_concurrency=2, max_tokens_cap=3)
    with TestClient(app, base_url="http://127.0.0.1:8000", raise_server_exceptions=False) as c:
        yield c


ODD_CHARS = ["\ud800", "\udfff", "\x00", "\u202e", "\u200f", "\ufeff", "\U0001f431", "\U0001f408\u200d\u2b1b", "\n",
             "\\", '"', "</s>", "<|im_end|>", "<|im_start|>"]
odd_text = st.lists(st.sampled_from(ODD_CHARS) | st.characters(exclude_categories=()), max_size=12).map("".join)
text = st.text(max_size=30) | odd_text | st.sampled_from(["", "base", "user", "assistant", "system", "tool", "../x",
                                                          "\x00"])
long_text = st.text(st.sampled_from("ab\ud800 "), min_size=200, max_size=400) | st.sampled_from(["ab" * 150_000])
stops = text | long_text | st.lists(text | long_text, max_size=6)
EDGE_NUMBERS = [2**70, -(2**70), 2**63, 2**63 - 1, -(2**63), -(2**63) - 1, 2**31, -1, 0, 1, 1e-300, 1e-308, 5e-324,
                -1e-300, 1e308, float("nan"), float("inf"), float("-inf"), 0.01, 0.0099, 2.0, 2.0000001, 10, 10.5]
number = st.sampled_from(EDGE_NUMBERS) | st.integers() | st.floats(allow_nan=True)
value = st.recursive(st.none() | st.booleans() | number | text,
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
                     max_leaves=12)
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "bogus"]) | value,
                                 "content": text | value | st.lists(st.fixed_dictionaries(
                                     {"type": st.sampled_from(["text", "image_url"]) | text, "text": text}),
                                     max_size=2)})
NUMERIC = ["max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "n",
           "frequency_penalty", "presence_penalty", "logprobs", "best_of"]
body = st.fixed_dictionaries({"model": st.sampled_from(["base", "nope", ""]) | value,
                              "messages": st.lists(message, max_size=3) | value},
                             optional={**{k: number | value for k in NUMERIC}, "stream": value, "stop": stops | value,
                                       "prompt": text | st.lists(text, max_size=3) | value}) | value
# Well-formed requests with one edge value each: they get past validation into generation.
edgy = st.fixed_dictionaries({"model": st.just("base"), "messages": st.just([{"role": "user", "content": "hi"}])},
                             optional={**{k: st.sampled_from(EDGE_NUMBERS) for k in NUMERIC if k != "n"},
                                       "stop": stops, "stream": st.booleans()})

OK = {200, 400, 401, 404, 413, 415, 422}


def _check(resp):
    assert resp.status_code in OK, (resp.status_code, resp.text[:500])
    if resp.headers.get("content-type", "").startswith("text/event-stream"):
        assert '"server_error"' not in resp.text, resp.text[-500:]  # a stream reports errors as events
    elif resp.status_code != 200:
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


@FUZZ
@given(payload=edgy, route=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
def test_edge_values_in_valid_requests(client, payload, route):
    if route == "/v1/completions":
        payload = {**{k: v for k, v in payload.items() if k != "messages"}, "prompt": "hi"}
    _check(client.post(route, content=json.dumps(payload), headers={"content-type": "application/json"}))


@FUZZ
@given(content=odd_text, stop=stops)
def test_odd_text_and_stops(client, content, stop):
    payload = {"model": "base", "messages": [{"role": "user", "content": content}], "stop": stop, "max_tokens": 2}
    _check(client.post("/v1/chat/completions", content=json.dumps(payload),
                       headers={"content-type": "application/json"}))


def test_server_still_answers_after_fuzzing(client):
    resp = client.post("/v1/chat/completions", json={"model": "base", "messages": [{"role": "user", "content": "hi"}],
                                                     "max_tokens": 2})
    assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["role"] == "assistant"
