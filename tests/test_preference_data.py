"""Preference data: the shapes users bring, their errors, rendering through the Renderer, data check."""

import json

import pytest

from nekotune.config import load_config
from nekotune.data.formats import Conversation, Turn
from nekotune.data.preference import PREFERENCE_FORMATS, PreferencePair, detect_preference_format, to_examples
from nekotune.data.preference_tokens import (PreferenceEncoder, check_preference_file, check_preferences,
                                             prepare_preference)
from nekotune.data.render import IGNORE, Renderer
from nekotune.errors import UserError
from preference_fixtures import alpaca_pair_rows, rows

SYSTEM_CONVERSATION = [{"from": "system", "value": "Be a cat."}, {"from": "human", "value": "hi"},
                       {"from": "gpt", "value": "nya"}, {"from": "human", "value": "Why is the sky blue?"}]

PAIRWISE = [
    # LLaMA-Factory's dpo_en_demo.json: conversations ending with the user, answers as single messages
    ("pairwise_sharegpt", {"conversations": SYSTEM_CONVERSATION, "chosen": {"from": "gpt", "value": "Rayleigh, nya~"},
                           "rejected": {"from": "gpt", "value": "Dunno."}}),
    ("pairwise_sharegpt", {"messages": [{"role": "user", "content": "Why is the sky blue?"}], "system": "Be a cat.",
                           "chosen": {"role": "assistant", "content": "Rayleigh, nya~"},
                           "rejected": {"role": "assistant", "content": "Dunno."}}),
    # TRL conversational: prompt messages + answers as lists of one assistant message
    ("pairwise_messages", {"prompt": [{"role": "system", "content": "Be a cat."},
                                      {"role": "user", "content": "Why is the sky blue?"}],
                           "chosen": [{"role": "assistant", "content": "Rayleigh, nya~"}],
                           "rejected": [{"role": "assistant", "content": "Dunno."}]}),
    # TRL implicit prompt: two whole conversations sharing all but the last turn
    ("pairwise_implicit", {"chosen": [{"role": "user", "content": "Why is the sky blue?"},
                                      {"role": "assistant", "content": "Rayleigh, nya~"}],
                           "rejected": [{"role": "user", "content": "Why is the sky blue?"},
                                        {"role": "assistant", "content": "Dunno."}]}),
    # Alpaca pairwise, and TRL's prompt/chosen/rejected strings
    ("pairwise_alpaca", {"instruction": "Why is the sky", "input": "blue?", "system": "Be a cat.",
                         "chosen": "Rayleigh, nya~", "rejected": "Dunno."}),
    ("pairwise_alpaca", {"prompt": "Why is the sky blue?", "chosen": "Rayleigh, nya~", "rejected": "Dunno."}),
]

KTO = [
    ("kto_messages", {"messages": [{"role": "user", "content": "Why is the sky blue?"},
                                   {"role": "assistant", "content": "Rayleigh, nya~"}], "label": True}),
    ("kto_messages", {"conversations": [{"from": "human", "value": "Why is the sky blue?"},
                                        {"from": "gpt", "value": "Dunno."}], "kto_tag": False}),
    ("kto_alpaca", {"instruction": "Why is the sky blue?", "output": "Rayleigh, nya~", "kto_tag": True}),
    ("kto_alpaca", {"prompt": "Why is the sky blue?", "completion": "Dunno.", "label": "false"}),  # CSV text
    ("kto_trl_messages", {"prompt": [{"role": "user", "content": "Why is the sky blue?"}],
                          "completion": [{"role": "assistant", "content": "Rayleigh, nya~"}], "label": True}),
]


@pytest.mark.parametrize("fmt,data", PAIRWISE)
def test_pairwise_formats(fmt, data):
    assert detect_preference_format(data) == fmt
    (pair,), used = to_examples(rows(data), "pairs")
    assert used == fmt and isinstance(pair, PreferencePair)
    assert pair.prompt.turns[-1] == Turn("user", "Why is the sky\n\nblue?" if "input" in data else
                                         "Why is the sky blue?")
    assert pair.chosen == [Turn("assistant", "Rayleigh, nya~")] and pair.rejected == [Turn("assistant", "Dunno.")]
    assert pair.prompt.system == ("Be a cat." if "Be a cat." in json.dumps(data) else None)
    assert pair.where == "t.json row 1"


def test_multi_turn_prompt_keeps_history():
    (pair,), _ = to_examples(rows(PAIRWISE[0][1]), "pairs")
    assert [t.role for t in pair.prompt.turns] == ["user", "assistant", "user"]
    assert pair.prompt.turns[1].content == "nya"


@pytest.mark.parametrize("fmt,data", KTO)
def test_kto_formats(fmt, data):
    assert detect_preference_format(data) == fmt
    (ex,), used = to_examples(rows(data), "kto")
    assert used == fmt
    assert ex.prompt.turns == [Turn("user", "Why is the sky blue?")]
    assert ex.label is (ex.answer[0].content == "Rayleigh, nya~")


def test_pairs_unpair_for_kto_and_kto_rows_are_refused_for_pairs():
    items, fmt = to_examples(rows(PAIRWISE[5][1]), "kto")
    assert fmt == "pairwise_alpaca" and [(e.answer[0].content, e.label) for e in items] == \
        [("Rayleigh, nya~", True), ("Dunno.", False)]
    with pytest.raises(UserError, match="t.json row 1: the rows are KTO rows.*train.stage=kto"):
        to_examples(rows(KTO[0][1]), "pairs")


def test_every_registered_format_is_covered():
    assert {fmt for fmt, _ in PAIRWISE + KTO} == set(PREFERENCE_FORMATS)
    assert {f.kind for f in PREFERENCE_FORMATS.values()} == {"pairs", "kto"}


def test_column_mapping_reaches_preference_rows():
    (pair,), _ = to_examples(rows({"question": "Q?", "good": "yes", "bad": "no"}), "pairs",
                             columns={"chosen": "good", "rejected": "bad"})
    assert pair.chosen[0].content == "yes" and pair.rejected[0].content == "no"


@pytest.mark.parametrize("data,kind,message", [
    ({"instruction": "Q", "chosen": "a"}, "pairs", "cannot tell the preference format"),
    ({"instruction": "Q", "chosen": "a", "rejected": "  "}, "pairs", "row 1: `rejected` is empty"),
    ({"instruction": "Q", "chosen": "a", "rejected": ["x"]}, "pairs", "row 1: field `rejected` must be text"),
    ({"conversations": [{"from": "human", "value": "Q"}], "chosen": {"from": "gpt", "value": "a"},
      "rejected": {"from": "human", "value": "b"}}, "pairs", "`rejected` has role 'human'"),
    ({"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "a"}],
      "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}}, "pairs",
     "`conversations` must end with a user turn"),
    ({"conversations": [{"from": "human", "value": "Q"}], "chosen": {"from": "gpt", "value": "a"},
      "rejected": "b"}, "pairs", "`rejected` must be one assistant message"),
    ({"prompt": [{"role": "user", "content": "Q"}], "chosen": [{"role": "assistant", "content": "a"}] * 2,
      "rejected": [{"role": "assistant", "content": "b"}]}, "pairs", "`chosen` must hold one assistant message, got 2"),
    ({"chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]}, "pairs",
     "differ before their last answer"),
    ({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "a"}], "label": "yes"},
     "kto", "field `label` must be true \\(desirable\\) or false"),
    ({"messages": [{"role": "user", "content": "Q"}], "label": True}, "kto", "must end with an assistant turn"),
])
def test_errors_are_one_line_and_name_the_row(data, kind, message):
    with pytest.raises(UserError, match=message) as err:
        to_examples(rows(data), kind)
    assert "\n" not in str(err.value) and str(err.value).startswith("t.json row 1")


def test_unknown_format_lists_the_formats():
    with pytest.raises(UserError, match="unknown preference data.format 'nope'; use one of auto, pairwise_sharegpt"):
        to_examples(alpaca_pair_rows(), "pairs", fmt="nope")


# -- rendering -----------------------------------------------------------------------------------
def _trained_span(renderer: Renderer, conv: Conversation) -> list[int]:
    enc = Renderer(renderer.tokenizer, renderer.system_prompt, max_seq_len=10_000, chat_template=renderer.template) \
        .encode(conv)
    end = max(i for i, label in enumerate(enc.labels) if label != IGNORE) + 1
    start = end - 1
    while enc.labels[start - 1] != IGNORE:
        start -= 1
    return enc.input_ids[start:end]


@pytest.mark.parametrize("tok_fixture", ["smol_tokenizer", "qwen3_tokenizer", "llama3_tokenizer"])
@pytest.mark.parametrize("system_prompt", [None, "You are a cat."])
def test_pair_ids_are_what_chat_sends_and_what_sft_trains(request, tok_fixture, system_prompt):
    tokenizer = request.getfixturevalue(tok_fixture)
    renderer = Renderer(tokenizer, system_prompt=system_prompt, max_seq_len=512)
    encoder = PreferenceEncoder(renderer)
    for _, data in PAIRWISE:
        (pair,), _ = to_examples(rows(data), "pairs")
        enc = encoder.encode_pair(pair)
        assert enc.prompt_ids == renderer.prompt_ids(pair.prompt)  # byte-identical to what chat sends
        assert enc.chosen_ids == _trained_span(renderer, pair.conversation("chosen"))
        assert enc.rejected_ids == _trained_span(renderer, pair.conversation("rejected"))
        assert tokenizer.decode(enc.chosen_ids).endswith(renderer.eot_text)
        assert "Rayleigh, nya~" in tokenizer.decode(enc.chosen_ids)


def test_truncation_keeps_the_prompt_and_cuts_the_answers(smol_tokenizer):
    pair = to_examples(rows({"instruction": "Q?", "chosen": "word " * 80, "rejected": "short"}), "pairs")[0][0]
    full = PreferenceEncoder(Renderer(smol_tokenizer, max_seq_len=4096)).encode_pair(pair)
    cut = PreferenceEncoder(Renderer(smol_tokenizer, max_seq_len=len(full.prompt_ids) + 10)).encode_pair(pair)
    assert cut.truncated and cut.prompt_ids == full.prompt_ids
    assert cut.chosen_ids == full.chosen_ids[:10] and cut.rejected_ids == full.rejected_ids
    dropped = Renderer(smol_tokenizer, max_seq_len=len(full.prompt_ids) + 10, truncation="drop")
    assert PreferenceEncoder(dropped).encode_pair(pair) is None
    no_room = Renderer(smol_tokenizer, max_seq_len=len(full.prompt_ids))
    assert PreferenceEncoder(no_room).encode_pair(pair) is None


# -- data check and prepare --------------------------------------------------------------------
def test_check_reports_problems_by_row(smol_tokenizer, tmp_path):
    good = [{"instruction": f"Q{i}?", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(3)]
    bad = [{"instruction": "Same?", "chosen": "same", "rejected": "same"},  # row 4: identical
           {"instruction": "Empty?", "chosen": "", "rejected": "no"},  # row 5: empty side
           {"instruction": "Long?", "chosen": "word " * 100, "rejected": "no"},  # row 6: over max_seq_len
           dict(good[0])]  # row 7: duplicate of row 1
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(good + bad))
    cfg = load_config(None, ["data.max_seq_len=64"], default_to_demo=False)
    report = check_preference_file(str(path), cfg.data, Renderer.from_config(smol_tokenizer, cfg.data), "pairs")
    assert report.format == "pairwise_alpaca" and report.rows == 7
    assert report.identical == ["row 4"]
    assert report.problems == {"`chosen` is empty": ["row 5"]}
    assert report.over_length == ["row 6"] and report.prompt_too_long == []
    assert report.duplicates == ["row 7"]
    assert report.bad_rows == 2 and not report.ok  # truncate: row 6 is cut, not lost
    assert any(trained and "yes 0" in text for text, trained in report.example)
    summary = report.to_dict()
    assert summary["length_max"] > 64 and summary["identical"] == ["row 4"]


def test_check_counts_kto_labels(smol_tokenizer):
    # one format a file (detected from its first row): a row of another shape is a problem of that row
    report = check_preferences(rows(KTO[0][1], KTO[1][1], KTO[1][1], KTO[2][1]), Renderer(smol_tokenizer), "kto")
    assert (report.desirable, report.undesirable) == (1, 2) and report.duplicates == ["t.json row 3"]
    assert list(report.problems.values()) == [["t.json row 4"]] and not report.ok


def test_prepare_drops_identical_pairs_and_splits_before_unpairing(smol_tokenizer, tmp_path):
    data = [{"instruction": f"Q{i}?", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(10)]
    train_file, val_file = tmp_path / "pairs.jsonl", tmp_path / "val.json"
    same = {"instruction": "S?", "chosen": "s", "rejected": "s"}
    train_file.write_text("\n".join(json.dumps(d) for d in data + [same]))
    val_file.write_text(json.dumps(data[:3]))
    cfg = load_config(None, [f"data.path={train_file}", f"data.val_path={val_file}", "data.max_seq_len=64"],
                      default_to_demo=False)
    renderer = Renderer.from_config(smol_tokenizer, cfg.data)
    pairs = prepare_preference(cfg.data, renderer, "pairs", seed=1)
    assert (pairs.stats["rows"], pairs.stats["train_rows"], pairs.stats["eval_rows"]) == (11, 10, 3)
    assert pairs.stats["identical_pairs"] == 1 and pairs.stats["format"] == "pairwise_alpaca"
    assert pairs.stats["tokens"] == sum(e.tokens for e in pairs.train)

    cfg = load_config(None, [f"data.path={train_file}", "data.val_size=2", "data.max_seq_len=64"],
                      default_to_demo=False)
    kto = prepare_preference(cfg.data, renderer, "kto", seed=1)
    assert kto.stats["desirable"] == kto.stats["undesirable"] and kto.kind == "kto"
    # both halves of a held-out pair are held out: no eval prompt is trained on
    assert len(kto.eval) in (2, 4) and not {tuple(e.prompt_ids) for e in kto.eval} & \
        {tuple(e.prompt_ids) for e in kto.train}
    with pytest.raises(UserError, match="needs data.path"):
        prepare_preference(load_config(None, ["data.max_seq_len=64"], default_to_demo=False).data, renderer,
                           "pairs", seed=1)


def test_predict_output_maps_to_pairs():
    """The persona recipe: `nekotune predict` rows (prompt, prediction = the base model's answer,
    reference = the persona's) become pairs with data.columns chosen=reference, rejected=prediction."""
    row = {"prompt": "Hello!", "prediction": "Hi! How can I help?", "reference": "(purrs) Hello, Master! nya~"}
    (pair,), fmt = to_examples(rows(row), "pairs", columns={"chosen": "reference", "rejected": "prediction"})
    assert fmt == "pairwise_alpaca" and pair.prompt.turns == [Turn("user", "Hello!")]
    assert (pair.chosen[0].content, pair.rejected[0].content) == (row["reference"], row["prediction"])


def test_persona_dpo_example_loads_with_its_stage_keys():
    """examples/persona-dpo.yaml through the real config: a DPO stage, and a column mapping that turns
    `nekotune predict` output into pairs."""
    from pathlib import Path

    from nekotune.config import load_config

    cfg = load_config(Path(__file__).parents[1] / "examples" / "persona-dpo.yaml")
    assert (cfg.train.stage, cfg.train.pref_beta, cfg.train.pref_loss) == ("dpo", 0.1, "sigmoid")
    row = {"prompt": "Hello!", "prediction": "Hi.", "reference": "(purrs) Hello, Master! nya~"}
    (pair,), _ = to_examples(rows(row), "pairs", columns=cfg.data.columns)
    assert pair.chosen[0].content == row["reference"] and pair.rejected[0].content == row["prediction"]
