"""Data and output habits (nekotune.data.habits): chat columns by their turn keys, data.repeat, the
one-row validation rule, prompt-only chat rows, UTF-8-safe truncation and empty think blocks."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nekotune.data import habits
from nekotune.data.sources import read_rows
from nekotune.errors import UserError

ROLE_CONTENT = [{"role": "system", "content": "You are a cat."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Meow."}]


# -- chat columns ----------------------------------------------------------------------------
def test_conversations_with_role_content_are_chat_messages(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"conversations": ROLE_CONTENT}) + "\n", encoding="utf-8")
    (row,) = read_rows(str(path))
    chat = habits.find_chat_column(row.data)
    assert chat == habits.ChatColumn("conversations", "role", "content")
    conv = habits.chat_conversation(row.data, row.where, chat)
    assert conv.system == "You are a cat." and [(t.role, t.content) for t in conv.turns] == [
        ("user", "Hi"), ("assistant", "Meow.")]


def test_chat_column_detection():
    sharegpt = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Meow."}]
    assert habits.find_chat_column({"conversations": sharegpt}) == habits.ChatColumn("conversations", "from", "value")
    assert habits.find_chat_column({"id": 3, "dialog_turns": ROLE_CONTENT}).column == "dialog_turns"  # any column
    assert habits.find_chat_column({"messages": ROLE_CONTENT, "other": sharegpt}).column == "messages"
    assert habits.find_chat_column({"conversations": "Hi"}) is None
    assert habits.find_chat_column({"conversations": []}) is None
    assert habits.find_chat_column({"instruction": "x", "output": "y"}) is None
    conv = habits.chat_conversation({"conversations": sharegpt, "system": "Be brief."}, "row 1")
    assert conv.system == "Be brief." and conv.reference == "Meow."


def test_chat_errors_name_the_row_and_turn():
    bad = {"conversations": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}
    with pytest.raises(UserError, match=r"f\.jsonl line 2: conversations\[2\] is `user` but a assistant turn"):
        habits.chat_conversation(bad, "f.jsonl line 2")
    with pytest.raises(UserError, match=r"conversations\[1\]\.role is 'robot'"):
        habits.chat_conversation({"conversations": [{"role": "robot", "content": "a"}]}, "row 1")
    with pytest.raises(UserError, match="no column holds chat turns"):
        habits.chat_conversation({"text": "x"}, "row 1")


# -- prompt-only chat rows -------------------------------------------------------------------
def test_prompt_only_messages_ending_with_a_user_turn(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "What do cats eat?"}]}) + "\n")
    (row,) = read_rows(str(path))
    with pytest.raises(UserError, match="must end with an assistant turn"):  # for training: as today
        habits.chat_conversation(row.data, row.where)
    prompt = habits.prompt_conversation(row.data, row.where)
    assert [(t.role, t.content) for t in prompt.turns] == [("user", "What do cats eat?")]
    assert prompt.reference is None


def test_prompt_part_of_a_full_conversation_keeps_the_reference():
    more = [{"role": "user", "content": "And fish?"}, {"role": "assistant", "content": "Yes."}]
    rows = {"messages": ROLE_CONTENT + more}
    conv = habits.chat_conversation(rows, "row 1", prompts_only=True)
    assert conv.reference == "Yes."
    prompt = habits.prompt_conversation(rows, "row 1")
    assert prompt.turns[-1].content == "And fish?" and len(prompt.turns) == 3 and prompt.system == "You are a cat."


# -- data.repeat and the one-row validation rule -----------------------------------------------
def test_repeat_one_record():
    assert habits.repeat_rows(["hello"], 20) == ["hello"] * 20
    assert habits.repeat_rows([1, 2], 1) == [1, 2]
    for bad in (0, -1, 1.5, True, "3"):
        with pytest.raises(UserError, match="data.repeat="):
            habits.check_repeat(bad)


def test_one_row_with_a_validation_fraction_trains_with_a_note():
    train, val, note = habits.split_rows(["only"], 0.1, seed=42)
    assert train == ["only"] and val == [] and "data.val_size=0.1 ignored" in note and "1 row" in note
    train, val, note = habits.split_rows(["only"] * 1, 0.0, seed=42)
    assert (train, val, note) == (["only"], [], None)
    # repeat after the split: the one record is trained 20 times, none is held out
    assert len(habits.repeat_rows(train, 20)) == 20


@pytest.mark.parametrize("n, val_size", [(2, 0.1), (5, 0.1), (10, 0.2), (10, 3), (7, 6), (30, 0.5)])
def test_split_matches_today_s_split_for_two_rows_or_more(n, val_size):
    import random

    def split_before_issue_16(rows, val_size, seed):  # data._split, which split_rows replaced
        n_val = max(1, min(int(round(val_size * len(rows))) if val_size < 1 else int(val_size), len(rows) - 1))
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        val_idx = set(order[:n_val])
        return [r for i, r in enumerate(rows) if i not in val_idx], [r for i, r in enumerate(rows) if i in val_idx]

    rows = list(range(n))
    train, val, note = habits.split_rows(rows, val_size, seed=7)
    assert (train, val) == split_before_issue_16(rows, val_size, 7) and note is None and train


# -- generated text: UTF-8 --------------------------------------------------------------------
def test_truncated_chinese_never_ends_in_a_broken_character(smol_tokenizer):
    text = "猫喜欢吃鱼，也喜欢晒太阳。🐟"
    ids = smol_tokenizer(text, add_special_tokens=False)["input_ids"]
    broken = 0
    for k in range(1, len(ids) + 1):
        raw = smol_tokenizer.decode(ids[:k])
        broken += raw.endswith(habits.REPLACEMENT)
        safe = habits.decode_complete(smol_tokenizer, ids[:k])
        assert not safe.endswith(habits.REPLACEMENT) and text.startswith(safe)
    assert broken > 0  # the byte-level tokenizer really does cut characters
    assert habits.decode_complete(smol_tokenizer, ids) == text
    # a batch row filled up with padding after a cut character
    pad = smol_tokenizer.pad_token_id if smol_tokenizer.pad_token_id is not None else smol_tokenizer.eos_token_id
    cut = next(k for k in range(1, len(ids)) if smol_tokenizer.decode(ids[:k]).endswith(habits.REPLACEMENT))
    padded = habits.decode_complete(smol_tokenizer, ids[:cut] + [pad] * 5, trailing={pad}, skip_special_tokens=True)
    assert text.startswith(padded) and not padded.endswith(habits.REPLACEMENT)


def test_utf8_safe_stream():
    assert list(habits.utf8_safe_stream(["ab", "c\ufffd", "d", "e\ufffd\ufffd"])) == ["ab", "c", "\ufffdd", "e"]
    assert "".join(habits.utf8_safe_stream(["\ufffd"])) == ""
    assert habits.strip_broken_tail("猫\ufffd") == "猫"


# -- generated text: empty think blocks -------------------------------------------------------
def test_hide_empty_think():
    assert habits.hide_empty_think("<think>\n\n</think>\n\nMeow.") == "Meow."
    assert habits.hide_empty_think("<think>purr</think>Meow.") == "<think>purr</think>Meow."  # reasoning stays
    pieces = ["<", "think", ">\n", "\n</thi", "nk>", "\n\n", "Meow", "."]
    assert list(habits.hide_empty_think_stream(pieces)) == ["Meow", "."]
    assert "".join(habits.hide_empty_think_stream(["I <thin", "g> you"])) == "I <thing> you"


ALPHABET = ["<think>", "</think>", "<", "think", ">", "</", "\n", " ", "a", "猫", "<th", "ink>"]


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(st.sampled_from(ALPHABET), max_size=12), cuts=st.lists(st.integers(0, 80), max_size=6))
def test_streamed_equals_whole(parts, cuts):
    text = "".join(parts)
    bounds = sorted({0, len(text), *[c for c in cuts if c <= len(text)]})
    pieces = [text[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    assert "".join(habits.hide_empty_think_stream(pieces)) == habits.hide_empty_think(text)
