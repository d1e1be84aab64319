"""Every dataset format becomes one Conversation, as early as possible.

Each format is a detector plus a `row -> Conversation` adapter. Nothing after this module
knows which format a row came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from nekotune.data.images import ImageRef
from nekotune.data.sources import Row
from nekotune.errors import UserError
from nekotune.registry import DATA_FORMATS

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bot": "assistant", "model": "assistant", "system": "system"}
# Synonyms accepted by auto-detection for question/answer pairs.
QUESTION_KEYS = ("instruction", "prompt", "question", "query")
ANSWER_KEYS = ("output", "response", "answer", "completion")
IMAGE = "<image>"  # LLaMA-Factory's placeholder, and the mark of an image's place in Turn.content


@dataclass
class Turn:
    role: str  # "user" | "assistant"
    content: str  # text; in a turn with images, IMAGE marks each image's place (issue 17)
    images: list[ImageRef] = field(default_factory=list)

    def parts(self) -> str | list[dict]:
        """The content as chat templates take it: text, or parts in order for a turn with images."""
        if not self.images:
            return self.content
        parts: list[dict] = []
        for i, chunk in enumerate(self.content.split(IMAGE)):
            if i:
                parts.append({"type": "image"})
            if chunk:
                parts.append({"type": "text", "text": chunk})
        return parts


@dataclass
class Conversation:
    turns: list[Turn] = field(default_factory=list)
    system: str | None = None
    text: str | None = None  # plain text for continued pre-training (then turns is empty)
    where: str = ""

    def messages(self, default_system: str | None = None) -> list[dict]:
        msgs: list[dict[str, Any]] = []
        system = self.system if self.system is not None else default_system
        if system:
            msgs.append({"role": "system", "content": system})
        msgs.extend({"role": t.role, "content": t.parts()} for t in self.turns)
        return msgs

    @property
    def images(self) -> list[ImageRef]:
        """Every image of the conversation, in the order the template renders them."""
        return [ref for t in self.turns for ref in t.images]

    @property
    def reference(self) -> str | None:
        """The last assistant answer (the expected output for eval/predict)."""
        return self.turns[-1].content if self.turns and self.turns[-1].role == "assistant" else None

    def prompt_part(self) -> "Conversation":
        """The conversation up to (not including) the last assistant answer."""
        turns = self.turns[:-1] if self.reference is not None else list(self.turns)
        return Conversation(turns=turns, system=self.system, where=self.where)


def get_path(row: dict, dotted: str) -> Any:
    """`instances.0.output` reaches into nested rows (Self-Instruct style)."""
    node: Any = row
    for part in dotted.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def apply_mapping(row: Row, columns: dict[str, str]) -> Row:
    if not columns:
        return row
    data = dict(row.data)
    for canonical, source in columns.items():
        value = get_path(row.data, source)
        if value is None:
            raise UserError(f"{row.where}: mapped column `{source}` (for `{canonical}`) is missing; "
                            f"fields found: {_fields(row.data)}; fix data.columns")
        data[canonical] = value
    return Row(data, row.where, row.source)


def _fields(data: dict) -> str:
    return ", ".join(sorted(map(str, data))) or "(none)"


def _text(row: Row, key: str, required: bool = True, fmt: str = "") -> str:
    value = row.data.get(key)
    if value is None:
        if required:
            raise UserError(f"{row.where}: field `{key}` is missing for format {fmt}; fields found: "
                            f"{_fields(row.data)}; map columns with data.columns.{key}=<your column>")
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise UserError(f"{row.where}: field `{key}` must be text, got {type(value).__name__}")
    value = value.strip()
    if required and not value:
        raise UserError(f"{row.where}: field `{key}` is empty; fill it in or delete the row "
                        f"(`nekotune data check` lists all such rows)")
    return value


def _first_key(data: dict, keys: tuple[str, ...]) -> str | None:
    return next((k for k in keys if k in data), None)


def from_alpaca(row: Row, prompts_only: bool = False) -> Conversation:
    qkey = _first_key(row.data, QUESTION_KEYS) or "instruction"
    akey = _first_key(row.data, ANSWER_KEYS) or "output"
    instruction = _text(row, qkey, fmt="alpaca")
    extra = _text(row, "input", required=False) if qkey != "input" else ""
    question = f"{instruction}\n\n{extra}" if extra else instruction
    turns: list[Turn] = []
    history = row.data.get("history") or []
    if not isinstance(history, list):
        raise UserError(f"{row.where}: field `history` must be a list of [question, answer] pairs")
    for i, pair in enumerate(history, start=1):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise UserError(f"{row.where}: history item {i} must be a [question, answer] pair of texts")
        turns += [Turn("user", pair[0].strip()), Turn("assistant", pair[1].strip())]
    turns.append(Turn("user", question))
    if not (prompts_only and akey not in row.data):
        turns.append(Turn("assistant", _text(row, akey, fmt="alpaca")))
    system = _text(row, "system", required=False) or None
    return Conversation(turns=turns, system=system, where=row.where)


def from_prompt_target(row: Row) -> Conversation:
    return Conversation(turns=[Turn("user", _text(row, "text", fmt="prompt_target")),
                               Turn("assistant", _text(row, "target", fmt="prompt_target"))],
                        system=_text(row, "system", required=False) or None, where=row.where)


def _chat(row: Row, key: str, prompts_only: bool = False) -> Conversation:
    """A chat row: turns keyed role/content or from/value (habits.find_chat_column) under `key`,
    else under whichever column holds them (`conversations` with role/content is chat messages)."""
    from nekotune.data import habits  # habits builds on this module's Conversation

    keys = habits.turn_keys(row.data.get(key))
    chat = habits.ChatColumn(key, *keys) if keys else habits.find_chat_column(row.data)
    if chat is None:
        raise UserError(f"{row.where}: field `{key}` must be a non-empty list of turns with role/content (or "
                        f"from/value) keys; fields found: {_fields(row.data)}")
    return habits.chat_conversation(row.data, row.where, chat, prompts_only=prompts_only)


def from_messages(row: Row, prompts_only: bool = False) -> Conversation:
    return _chat(row, "messages", prompts_only)


def from_sharegpt(row: Row, prompts_only: bool = False) -> Conversation:
    return _chat(row, "conversations", prompts_only)


def from_text(row: Row) -> Conversation:
    return Conversation(text=_text(row, "text", fmt="text"), where=row.where)


_ADAPTERS: dict[str, Callable[[Row], Conversation]] = {
    "alpaca": from_alpaca,
    "qa": from_alpaca,  # instruction/output pairs are Alpaca without `input`
    "prompt_target": from_prompt_target,
    "messages": from_messages,
    "sharegpt": from_sharegpt,
    "text": from_text,
}
# One adapter per format of the registry, in its order; a format added there without an adapter
# here fails at import, not on a user's file.
FORMATS: dict[str, Callable[[Row], Conversation]] = {name: _ADAPTERS[name] for name in DATA_FORMATS}


def detect_format(data: dict) -> str | None:
    from nekotune.data.habits import find_chat_column

    chat = find_chat_column(data)  # any column of chat turns: role/content is messages, from/value ShareGPT
    if chat is not None:
        return "messages" if chat.role_key == "role" else "sharegpt"
    if "messages" in data:
        return "messages"
    if "conversations" in data:
        return "sharegpt"
    if "text" in data and "target" in data:
        return "prompt_target"
    if _first_key(data, QUESTION_KEYS) and _first_key(data, ANSWER_KEYS):
        return "alpaca" if ("input" in data or "history" in data) else "qa"
    if "input" in data and "output" in data:
        return "alpaca"
    if "text" in data:
        return "text"
    return None


def to_conversations(rows: list[Row], fmt: str = "auto", columns: dict[str, str] | None = None,
                     source: str = "", prompts_only: bool = False) -> tuple[list[Conversation], str]:
    """Convert rows; returns the conversations and the format used. `prompts_only` also accepts
    question-only rows (e.g. NekoBench) for predict and compare."""
    if not rows:
        raise UserError(f"{source or 'dataset'}: no rows; the file is empty")
    rows = [apply_mapping(r, columns or {}) for r in rows]
    if fmt == "auto":
        fmt = detect_format(rows[0].data) or ""
        if not fmt and prompts_only and _first_key(rows[0].data, QUESTION_KEYS):
            fmt = "qa"
        if not fmt:
            raise UserError(f"{rows[0].where}: cannot tell the format from fields {_fields(rows[0].data)}; "
                            f"set data.format (one of {', '.join(FORMATS)}) and map columns with "
                            f"data.columns (e.g. data.columns.instruction=question)")
    if fmt not in FORMATS:
        raise UserError(f"unknown data.format {fmt!r}; use one of auto, {', '.join(FORMATS)}")
    convert = FORMATS[fmt]
    if prompts_only and fmt in ("alpaca", "qa", "messages", "sharegpt"):
        # prompt-only rows for predict/compare/serve: no answer, or messages ending with a user turn
        adapter = _ADAPTERS[fmt]
        convert = lambda r: adapter(r, prompts_only=True)  # type: ignore[call-arg]  # noqa: E731
    if fmt == "alpaca" and "input" in rows[0].data and "instruction" not in rows[0].data and \
            not _first_key(rows[0].data, QUESTION_KEYS):
        # input/output pairs: the input is the question
        convert = lambda r: from_alpaca(Row({**r.data, "instruction": r.data.get("input"), "input": ""}, r.where))  # noqa: E731
    convert = with_images(fmt, convert)
    return [convert(r) for r in rows], fmt


def with_images(fmt: str, convert: Callable[[Row], Conversation]) -> Callable[[Row], Conversation]:
    """`convert`, taking rows with images too where the format has them (issue 17: messages and
    ShareGPT rows with `<image>` placeholders and `images`, or image content parts)."""
    if fmt not in ("messages", "sharegpt"):
        return convert
    from nekotune.data.image_rows import has_images, to_vision_conversation

    return lambda r: to_vision_conversation(r, _base_dirs(r)) if has_images(r.data) else convert(r)


def _base_dirs(row: Row) -> tuple:
    """Where a row's relative image paths resolve: its file's folder."""
    return (row.source.parent,) if row.source is not None else ()
