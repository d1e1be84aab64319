"""Preference data: pairwise rows (DPO, ORPO, SimPO) and judged rows (KTO), as users bring them.

Every shape becomes a `PreferencePair` (a prompt Conversation + the chosen and the rejected answer) or a
`KTOExample` (a prompt + one answer + a desirable/undesirable label) as early as possible, through a
small detector + converter per format registered in `PREFERENCE_FORMATS`. Prompts are parsed by the SFT
converters of data/formats.py, so roles, system turns and history mean the same thing in both.

Tokens: data/preference_tokens.py (through the Renderer), training: nekotune/preference.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Union

from nekotune.data.formats import (
    ANSWER_KEYS,
    QUESTION_KEYS,
    SHAREGPT_ROLES,
    Conversation,
    Turn,
    apply_mapping,
    from_alpaca,
    from_messages,
    from_sharegpt,
)
from nekotune.data.sources import Row, read_rows
from nekotune.errors import UserError

LABEL_KEYS = ("kto_tag", "label")  # LLaMA-Factory's column name first, then TRL's


@dataclass
class PreferencePair:
    prompt: Conversation  # ends with a user turn
    chosen: list[Turn]  # one assistant turn (the renderer trains exactly one answer per side)
    rejected: list[Turn]
    where: str = ""

    def conversation(self, side: str) -> Conversation:
        answer = self.chosen if side == "chosen" else self.rejected
        return Conversation(turns=self.prompt.turns + answer, system=self.prompt.system, where=self.where)


@dataclass
class KTOExample:
    prompt: Conversation
    answer: list[Turn]
    label: bool  # True: desirable
    where: str = ""

    def conversation(self) -> Conversation:
        return Conversation(turns=self.prompt.turns + self.answer, system=self.prompt.system, where=self.where)


Example = Union[PreferencePair, KTOExample]


# -- small field readers ------------------------------------------------------------------------
def _fields(data: dict) -> str:
    return ", ".join(sorted(map(str, data))) or "(none)"


def _answer_text(row: Row, key: str) -> Turn:
    value = row.data.get(key)
    if value is None:
        raise UserError(f"{row.where}: field `{key}` is missing; fields found: {_fields(row.data)}; map columns "
                        f"with data.columns.{key}=<your column>")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise UserError(f"{row.where}: field `{key}` must be text, got {type(value).__name__}")
    return _assistant(row, key, value)


def _assistant(row: Row, key: str, content: str) -> Turn:
    if not content.strip():
        raise UserError(f"{row.where}: `{key}` is empty; fill it in or delete the row "
                        f"(`nekotune data check` lists all such rows)")
    return Turn("assistant", content.strip())


def _message(row: Row, key: str, item: Any) -> Turn:
    """One assistant message: {"from": "gpt", "value": ...} or {"role": "assistant", "content": ...}."""
    if not isinstance(item, dict) or not ({"from", "role"} & item.keys()):
        raise UserError(f"{row.where}: `{key}` must be one assistant message like {{\"role\": \"assistant\", "
                        f"\"content\": ...}} or {{\"from\": \"gpt\", \"value\": ...}}, got {type(item).__name__}")
    raw_role = item.get("from", item.get("role"))
    content = item.get("value", item.get("content"))
    if SHAREGPT_ROLES.get(str(raw_role).lower()) != "assistant":
        raise UserError(f"{row.where}: `{key}` has role {raw_role!r}; it must be the assistant's answer")
    if not isinstance(content, str):
        raise UserError(f"{row.where}: `{key}` content must be text, got {type(content).__name__}")
    return _assistant(row, key, content)


def _one_message(row: Row, key: str) -> Turn:
    """TRL's conversational answers: a list holding one assistant message."""
    value = row.data.get(key)
    if isinstance(value, list):
        if len(value) != 1:
            raise UserError(f"{row.where}: `{key}` must hold one assistant message, got {len(value)} messages")
        value = value[0]
    return _message(row, key, value)


def _role(item: Any) -> str | None:
    if not isinstance(item, dict):
        return None
    return SHAREGPT_ROLES.get(str(item.get("from", item.get("role"))).lower())


def _prompt_conversation(row: Row, key: str, items: Any) -> Conversation:
    """A list of messages ending with the user's turn, parsed by the SFT converters: a placeholder
    answer is appended so that their checks (alternation, roles, system first) apply unchanged."""
    if not isinstance(items, list) or not items:
        raise UserError(f"{row.where}: field `{key}` must be a non-empty list of turns; fields found: "
                        f"{_fields(row.data)}")
    if _role(items[-1]) != "user":
        raise UserError(f"{row.where}: `{key}` must end with a user turn (the prompt); the answers go in "
                        f"`chosen` and `rejected` (or the answer in `completion`)")
    if isinstance(items[0], dict) and "from" in items[0]:
        parsed = from_sharegpt(Row({"conversations": items + [{"from": "gpt", "value": "-"}],
                                    "system": row.data.get("system")}, row.where))
    else:
        parsed = from_messages(Row({"messages": items + [{"role": "assistant", "content": "-"}]}, row.where))
        if parsed.system is None and isinstance(row.data.get("system"), str):
            parsed.system = row.data["system"].strip() or None
    return parsed.prompt_part()


def _alpaca_prompt(row: Row) -> Conversation:
    """instruction (or prompt/question/query) + input + system + history, as SFT's Alpaca reads them."""
    drop = set(ANSWER_KEYS) | {"chosen", "rejected", *LABEL_KEYS}
    return from_alpaca(Row({k: v for k, v in row.data.items() if k not in drop}, row.where), prompts_only=True)


def _label(row: Row) -> bool:
    key = next(k for k in LABEL_KEYS if k in row.data)
    value = row.data[key]
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):  # CSV cells are text
        return value.strip().lower() == "true"
    if not isinstance(value, bool):
        raise UserError(f"{row.where}: field `{key}` must be true (desirable) or false (undesirable), got {value!r}")
    return value


# -- converters ---------------------------------------------------------------------------------
def pair_from_alpaca(row: Row) -> PreferencePair:
    """{"instruction", "input"?, "system"?, "history"?, "chosen": str, "rejected": str}; also TRL's
    {"prompt", "chosen", "rejected"} strings (the prompt becomes the user's message)."""
    return PreferencePair(_alpaca_prompt(row), [_answer_text(row, "chosen")], [_answer_text(row, "rejected")],
                          row.where)


def pair_from_sharegpt(row: Row) -> PreferencePair:
    """LLaMA-Factory's pairwise ShareGPT (dpo_en_demo.json): `conversations` (or `messages`) ending with
    the user's turn, `chosen` and `rejected` each one assistant message."""
    key = "conversations" if "conversations" in row.data else "messages"
    prompt = _prompt_conversation(row, key, row.data.get(key))
    return PreferencePair(prompt, [_message(row, "chosen", row.data.get("chosen"))],
                          [_message(row, "rejected", row.data.get("rejected"))], row.where)


def pair_from_trl_messages(row: Row) -> PreferencePair:
    """TRL's conversational shape: `prompt` a list of messages, `chosen`/`rejected` lists of one
    assistant message."""
    prompt = _prompt_conversation(row, "prompt", row.data.get("prompt"))
    return PreferencePair(prompt, [_one_message(row, "chosen")], [_one_message(row, "rejected")], row.where)


def _conversation_list(row: Row, key: str) -> list:
    value = row.data.get(key)
    if not isinstance(value, list) or len(value) < 2:
        raise UserError(f"{row.where}: `{key}` must be a whole conversation (a list of turns ending with the "
                        f"answer) when the row has no `prompt`")
    return value


def pair_from_implicit(row: Row) -> PreferencePair:
    """TRL's implicit prompt: `chosen` and `rejected` are whole conversations; the prompt is what they
    share (as TRL's extract_prompt takes it), and each must differ only in its last assistant turn."""
    chosen, rejected = _conversation_list(row, "chosen"), _conversation_list(row, "rejected")
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    if len(chosen) != shared + 1 or len(rejected) != shared + 1:
        raise UserError(f"{row.where}: `chosen` and `rejected` differ before their last answer; put the shared "
                        f"turns in `prompt` and one answer in each, or make them differ only in the last turn")
    prompt = _prompt_conversation(row, "chosen", chosen[:shared])
    return PreferencePair(prompt, [_message(row, "chosen", chosen[-1])], [_message(row, "rejected", rejected[-1])],
                          row.where)


def kto_from_messages(row: Row) -> KTOExample:
    """LLaMA-Factory's kto_en_demo.json: `messages` (or ShareGPT `conversations`) ending with the judged
    assistant answer, and a boolean `label` (or `kto_tag`)."""
    conv = from_messages(row) if "messages" in row.data else from_sharegpt(row)
    return KTOExample(conv.prompt_part(), [conv.turns[-1]], _label(row), row.where)


def kto_from_alpaca(row: Row) -> KTOExample:
    """Alpaca's instruction/input/output + `kto_tag`; also TRL's prompt/completion/label strings."""
    conv = from_alpaca(Row({k: v for k, v in row.data.items() if k not in LABEL_KEYS}, row.where))
    return KTOExample(conv.prompt_part(), [conv.turns[-1]], _label(row), row.where)


def kto_from_trl_messages(row: Row) -> KTOExample:
    """TRL's conversational KTO rows: `prompt` a list of messages, `completion` one assistant message."""
    prompt = _prompt_conversation(row, "prompt", row.data.get("prompt"))
    return KTOExample(prompt, [_one_message(row, "completion")], _label(row), row.where)


# -- the registry -------------------------------------------------------------------------------
def _has_label(d: dict) -> bool:
    return any(k in d for k in LABEL_KEYS)


def _key_of(d: dict, keys: tuple[str, ...]) -> str | None:
    return next((k for k in keys if k in d), None)


@dataclass(frozen=True)
class PreferenceFormat:
    name: str
    kind: str  # "pairs" (chosen + rejected) or "kto" (one answer + label)
    detect: Callable[[dict], bool]
    convert: Callable[[Row], Example]
    shape: str  # one line for docs and error messages


# Order matters: the first detector that accepts the first row wins (as the SFT formats detect).
PREFERENCE_FORMATS: dict[str, PreferenceFormat] = {f.name: f for f in (
    PreferenceFormat("pairwise_sharegpt", "pairs", lambda d: isinstance(d.get("chosen"), dict) and "rejected" in d,
                     pair_from_sharegpt, "conversations|messages + chosen/rejected messages (LLaMA-Factory)"),
    PreferenceFormat("pairwise_messages", "pairs",
                     lambda d: isinstance(d.get("chosen"), list) and isinstance(d.get("prompt"), list),
                     pair_from_trl_messages, "prompt messages + chosen/rejected [assistant message] (TRL)"),
    PreferenceFormat("pairwise_implicit", "pairs",
                     lambda d: isinstance(d.get("chosen"), list) and "rejected" in d and "prompt" not in d,
                     pair_from_implicit, "chosen/rejected as whole conversations (TRL implicit prompt)"),
    PreferenceFormat("pairwise_alpaca", "pairs",
                     lambda d: "chosen" in d and "rejected" in d and bool(_key_of(d, QUESTION_KEYS + ("input",))),
                     pair_from_alpaca, "instruction/input (or prompt) + chosen/rejected texts"),
    PreferenceFormat("kto_messages", "kto", lambda d: _has_label(d) and ("messages" in d or "conversations" in d),
                     kto_from_messages, "messages|conversations ending with the answer + label|kto_tag"),
    PreferenceFormat("kto_trl_messages", "kto", lambda d: _has_label(d) and isinstance(d.get("prompt"), list),
                     kto_from_trl_messages, "prompt messages + completion [assistant message] + label (TRL)"),
    PreferenceFormat("kto_alpaca", "kto",
                     lambda d: _has_label(d) and bool(_key_of(d, QUESTION_KEYS)) and bool(_key_of(d, ANSWER_KEYS)),
                     kto_from_alpaca, "instruction/input/output (or prompt/completion) + label|kto_tag"),
)}


def detect_preference_format(data: dict) -> str | None:
    return next((f.name for f in PREFERENCE_FORMATS.values() if f.detect(data)), None)


def unpair(pairs: list[PreferencePair]) -> list[KTOExample]:
    """A pairwise file for KTO: the chosen answer is desirable, the rejected one undesirable."""
    out = []
    for p in pairs:
        out += [KTOExample(p.prompt, p.chosen, True, p.where), KTOExample(p.prompt, p.rejected, False, p.where)]
    return out


def resolve_format(rows: list[Row], fmt: str, kind: str) -> PreferenceFormat:
    """The format of a file (detected from its first row when `auto`), refusing KTO rows for pairs."""
    names = ", ".join(PREFERENCE_FORMATS)
    if fmt == "auto":
        name = detect_preference_format(rows[0].data)
        if name is None:
            need = "a boolean `label` (or `kto_tag`)" if kind == "kto" else "`chosen` and `rejected`"
            raise UserError(f"{rows[0].where}: cannot tell the preference format from fields {_fields(rows[0].data)}; "
                            f"rows need {need} (formats: {names}); map columns with data.columns")
        fmt = name
    if fmt not in PREFERENCE_FORMATS:
        raise UserError(f"unknown preference data.format {fmt!r}; use one of auto, {names}")
    spec = PREFERENCE_FORMATS[fmt]
    if kind == "pairs" and spec.kind == "kto":
        raise UserError(f"{rows[0].where}: the rows are KTO rows (one answer + a label, format {fmt}); train them "
                        f"with train.stage=kto, or give chosen/rejected pairs")
    return spec


def to_examples(rows: list[Row], kind: str, fmt: str = "auto", columns: dict[str, str] | None = None,
                source: str = "", unpair_pairs: bool = True) -> tuple[list[Example], str]:
    """Rows -> PreferencePairs (kind "pairs") or KTOExamples (kind "kto"). For KTO, pairwise rows are
    unpaired unless `unpair_pairs` is False (prepare splits off validation pairs first, so that the
    two halves of one pair never land on both sides of the split)."""
    if not rows:
        raise UserError(f"{source or 'dataset'}: no rows; the file is empty")
    rows = [apply_mapping(r, columns or {}) for r in rows]
    spec = resolve_format(rows, fmt, kind)
    items = [spec.convert(r) for r in rows]
    if kind == "kto" and spec.kind == "pairs" and unpair_pairs:
        return list(unpair(items)), spec.name  # type: ignore[arg-type]
    return items, spec.name


def load_examples(path: str, data_cfg: Any, kind: str, fmt: str | None = None,
                  unpair_pairs: bool = True) -> tuple[list[Example], str]:
    """Read and convert a preference file with data.split / data.max_rows / data.columns. An SFT name in
    data.format (sharegpt, alpaca, ...) means auto: LLaMA-Factory calls its pairwise files sharegpt too."""
    rows = read_rows(path, split=data_cfg.split, max_rows=data_cfg.max_rows)
    return to_examples(rows, kind, preference_format_name(data_cfg.format, fmt), data_cfg.columns, source=path,
                       unpair_pairs=unpair_pairs)


def preference_format_name(data_format: str, explicit: str | None = None) -> str:
    return explicit or (data_format if data_format in PREFERENCE_FORMATS else "auto")


def preference_kind(path: str, data_cfg: Any, stage: str) -> str | None:
    """"pairs" or "kto" when `path` is a preference file, None for an SFT/text file (data check, eval):
    the stage's kind for a preference train.stage (registry.TRAINING_STAGES), else what the first row looks
    like: chosen + rejected, or a boolean label/kto_tag (a non-boolean `label` column stays SFT data)."""
    from nekotune.registry import TRAINING_STAGES

    spec = TRAINING_STAGES.get(stage)
    if spec is not None and spec.preference:
        return spec.data
    rows = read_rows(path, split=data_cfg.split, max_rows=1)
    if not rows:
        return None
    first = apply_mapping(rows[0], data_cfg.columns).data
    name = detect_preference_format(first)
    if name is None:
        return None
    kind = PREFERENCE_FORMATS[name].kind
    if kind == "kto" and not isinstance(first.get(_key_of(first, LABEL_KEYS) or ""), bool):
        return None
    return kind
