import json

import pytest

from nekotune.config import load_config
from nekotune.data import Renderer, load_conversations, prepare
from nekotune.data.collate import flatten_batch, pad_batch
from nekotune.data.formats import detect_format, to_conversations
from nekotune.data.render import IGNORE
from nekotune.data.sources import Row, read_rows
from nekotune.errors import UserError


def rows(*items):
    return [Row(d, f"t.json row {i}") for i, d in enumerate(items, 1)]


def trained_runs(renderer, conv):
    enc = renderer.encode(conv)
    return [text for text, trained in renderer.trained_text(enc) if trained]


# -- formats -----------------------------------------------------------------------------------
@pytest.mark.parametrize("data,fmt", [
    ({"instruction": "a", "input": "b", "output": "c"}, "alpaca"),
    ({"instruction": "a", "output": "c"}, "qa"),
    ({"text": "a", "target": "b"}, "prompt_target"),
    ({"messages": []}, "messages"),
    ({"conversations": []}, "sharegpt"),
    ({"text": "plain"}, "text"),
    ({"question": "q", "answer": "a"}, "qa"),
    ({"foo": 1}, None),
])
def test_detect_format(data, fmt):
    assert detect_format(data) == fmt


def test_alpaca_with_input_system_history():
    convs, fmt = to_conversations(rows({"instruction": "Translate", "input": "cat", "output": "猫", "system": "S",
                                        "history": [["hi", "hello"]]}))
    c = convs[0]
    assert fmt == "alpaca"
    assert c.system == "S"
    assert [(t.role, t.content) for t in c.turns] == [("user", "hi"), ("assistant", "hello"),
                                                       ("user", "Translate\n\ncat"), ("assistant", "猫")]


def test_sharegpt_and_messages_agree():
    a, _ = to_conversations(rows({"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "q"},
                                                     {"from": "gpt", "value": "a"}]}))
    b, _ = to_conversations(rows({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "q"},
                                               {"role": "assistant", "content": "a"}]}))
    assert a[0].messages() == b[0].messages()


def test_column_mapping_with_nested_path():
    convs, fmt = to_conversations(rows({"instruction": "Do it", "instances": [{"input": "x", "output": "y"}]}),
                                  "alpaca", {"input": "instances.0.input", "output": "instances.0.output"})
    assert convs[0].turns[-1].content == "y" and convs[0].turns[0].content == "Do it\n\nx"


@pytest.mark.parametrize("data,needle", [
    ({"instruction": "q", "output": "  "}, "field `output` is empty"),
    ({"messages": [{"role": "user", "content": "q"}]}, "must end with an assistant turn"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"}]}, "must alternate"),
    ({"conversations": [{"from": "alien", "value": "q"}]}, "conversations[1].from"),
    ({"instruction": 5, "output": ["x"]}, "must be text"),
])
def test_row_errors_name_the_row_and_field(data, needle):
    with pytest.raises(UserError) as exc:
        to_conversations(rows(data))
    assert "t.json row 1" in str(exc.value) and needle in str(exc.value)


def test_missing_field_lists_fields_found():
    with pytest.raises(UserError) as exc:
        to_conversations(rows({"instruction": "q", "output": "a"}, {"instruction": "q2", "answer_text": "a"}))
    msg = str(exc.value)
    assert "row 2" in msg and "`output` is missing" in msg and "answer_text, instruction" in msg


def test_unknown_format_and_empty():
    with pytest.raises(UserError, match="cannot tell the format"):
        to_conversations(rows({"foo": "bar"}))
    with pytest.raises(UserError, match="no rows"):
        to_conversations([])


# -- sources -----------------------------------------------------------------------------------
def test_readers(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"instruction": "q", "output": "a"}\n\n{"instruction": "q2", "output": "b"}\n')
    (tmp_path / "b.csv").write_text("instruction,output\nq3,\"a, with comma\"\n")
    (tmp_path / "c.json").write_text(json.dumps({"data": [{"instruction": "q4", "output": "d"}]}))
    got = read_rows(str(tmp_path))
    assert [r.data["instruction"] for r in got] == ["q", "q2", "q3", "q4"]
    assert got[1].where.endswith("a.jsonl line 3")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"text": "t", "target": "u"}]), tmp_path / "d.parquet")
    assert read_rows(str(tmp_path / "d.parquet"))[0].data == {"text": "t", "target": "u"}


def test_invalid_json_line_and_utf8(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "q", "output": "a"}\n{"instruction": oops}\n')
    with pytest.raises(UserError, match=r"bad.jsonl line 2: invalid JSON"):
        read_rows(str(bad))
    raw = tmp_path / "latin.json"
    raw.write_bytes(b'[{"instruction": "caf\xe9", "output": "x"}]')
    with pytest.raises(UserError, match="not valid UTF-8"):
        read_rows(str(raw))


# -- rendering and label masks -----------------------------------------------------------------
def qa(q="What is 2+2?", a="Four, nya~"):
    convs, _ = to_conversations(rows({"instruction": q, "output": a}))
    return convs[0]


def multi():
    convs, _ = to_conversations(rows({"messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, nya~"},
        {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye bye!"}]}))
    return convs[0]


def test_chatml_label_mask_is_exactly_answer_and_end_of_turn(smol_tokenizer):
    r = Renderer(smol_tokenizer)
    assert r.eot_text == "<|im_end|>"
    assert trained_runs(r, qa()) == ["Four, nya~<|im_end|>"]
    enc = r.encode(qa())
    # every token outside the answer is masked, every answer token is its own label
    text = smol_tokenizer.decode(enc.input_ids)
    assert text.startswith("<|im_start|>system\n") and "<|im_start|>user\nWhat is 2+2?<|im_end|>" in text
    for tid, lab in zip(enc.input_ids, enc.labels):
        assert lab in (IGNORE, tid)


def test_multi_turn_trains_every_assistant_turn(smol_tokenizer):
    r = Renderer(smol_tokenizer, system_prompt="Be a cat.")
    assert trained_runs(r, multi()) == ["Hello, nya~<|im_end|>", "Bye bye!<|im_end|>"]


def test_train_on_prompt_trains_everything(smol_tokenizer):
    enc = Renderer(smol_tokenizer, train_on_prompt=True).encode(qa())
    assert enc.labels == enc.input_ids


def test_llama3_template_mask(llama3_tokenizer):
    r = Renderer(llama3_tokenizer)
    assert r.eot_text == "<|eot_id|>"
    assert trained_runs(r, multi()) == ["Hello, nya~<|eot_id|>", "Bye bye!<|eot_id|>"]
    assert r.stop_token_ids[0] == llama3_tokenizer.convert_tokens_to_ids("<|eot_id|>")


def test_qwen3_thinking_mask_follows_enable_thinking(qwen3_tokenizer):
    default = Renderer(qwen3_tokenizer)
    assert trained_runs(default, qa()) == ["<think>\n\n</think>\n\nFour, nya~<|im_end|>"]
    off = Renderer(qwen3_tokenizer, enable_thinking=False)
    assert trained_runs(off, qa()) == ["Four, nya~<|im_end|>"]
    assert off.prompt_text(qa().prompt_part()).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # history turns carry no think block; both answers still trained
    assert trained_runs(off, multi()) == ["Hello, nya~<|im_end|>", "Bye bye!<|im_end|>"]


@pytest.mark.parametrize("fixture", ["smol_tokenizer", "llama3_tokenizer", "qwen3_tokenizer"])
@pytest.mark.parametrize("thinking", [None, False])
def test_generation_prompt_is_prefix_of_training_tokens(fixture, thinking, request):
    tok = request.getfixturevalue(fixture)
    r = Renderer(tok, enable_thinking=thinking)
    conv = qa()
    prompt = r.prompt_ids(conv.prompt_part())
    enc = r.encode(conv)
    assert enc.input_ids[: len(prompt)] == prompt
    assert all(lab == IGNORE for lab in enc.labels[: len(prompt)])


def test_truncation_policy(smol_tokenizer):
    long = qa(a="word " * 400)
    enc = Renderer(smol_tokenizer, max_seq_len=64).encode(long)
    assert len(enc.input_ids) == 64 and enc.truncated and enc.n_trained > 0
    assert Renderer(smol_tokenizer, max_seq_len=64, truncation="drop").encode(long) is None
    # a prompt longer than the limit leaves no answer: dropped
    assert Renderer(smol_tokenizer, max_seq_len=20).encode(qa(q="long " * 100)) is None


def test_plain_text_trains_all_tokens(smol_tokenizer):
    convs, _ = to_conversations(rows({"text": "Once upon a time"}))
    enc = Renderer(smol_tokenizer).encode(convs[0])
    assert enc.labels == enc.input_ids and enc.input_ids[-1] == smol_tokenizer.eos_token_id


def test_prepare_split_and_stats(smol_tokenizer, qa_file):
    cfg = load_config(None, [f"data.path={qa_file}", "data.val_size=0.25"], default_to_demo=False)
    data = prepare(cfg, Renderer.from_config(smol_tokenizer, cfg.data))
    assert (len(data.train), len(data.eval)) == (18, 6)
    assert data.stats["format"] == "qa" and data.stats["trained_tokens"] < data.stats["tokens"]


def test_collators(smol_tokenizer):
    r = Renderer(smol_tokenizer)
    feats = [{"input_ids": e.input_ids, "labels": e.labels} for e in (r.encode(qa()), r.encode(multi()))]
    flat = flatten_batch(feats)
    n0 = len(feats[0]["input_ids"])
    assert flat["input_ids"].shape == (1, n0 + len(feats[1]["input_ids"]))
    assert flat["position_ids"][0, n0] == 0 and flat["labels"][0, n0] == IGNORE
    padded = pad_batch(feats, smol_tokenizer.pad_token_id, side="left")
    assert padded["attention_mask"][0, 0] == 0 and padded["attention_mask"][1, -1] == 1


# -- the real datasets in ../shared ------------------------------------------------------------
SHARED_CASES = [
    ("NekoQA-10K/nekoqa_smoke_200.json", []),
    ("NekoQA-10K/nekoqa_200_curated.json", []),
    ("Better-Ruozhiba/ruozhiba_qa.json", []),
    ("ruozhiba_gpt4/ruozhiba_qa2449_gpt4o.json", []),
    ("llamafactory_alpaca_demo/alpaca_en_demo.json", []),
    ("llamafactory_alpaca_demo/alpaca_zh_demo.json", []),
    ("llamafactory_alpaca_demo/identity.json", []),
    ("self-instruct/seed_tasks.jsonl", ["data.format=alpaca", "data.columns.input=instances.0.input",
                                        "data.columns.output=instances.0.output"]),
    ("self-instruct/user_oriented_instructions.jsonl", ["data.format=alpaca", "data.columns.input=instances.0.input",
                                                        "data.columns.output=instances.0.output"]),
]


@pytest.mark.parametrize("name,overrides", SHARED_CASES)
def test_shared_datasets_convert(name, overrides):
    from conftest import shared

    path = shared(name)
    cfg = load_config(None, [f"data.path={path}", *overrides], default_to_demo=False)
    convs, _ = load_conversations(str(path), cfg.data)
    assert len(convs) > 50 and all(c.reference for c in convs)
