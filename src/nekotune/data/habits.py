"""Data and output shapes users bring from other tools, as small functions the stages call.

- chat turns keyed `role`/`content` under any column (`conversations` included) are chat messages;
- `data.repeat=N` repeats the training rows; a one-row dataset with a validation fraction trains
  on that row (with a note) instead of putting it in the validation set and failing;
- prompt-only chat rows (`messages` ending with a user turn) for predict, compare and serve;
- generated text: never ending in a broken UTF-8 character, and without the empty
  `<think></think>` block Qwen3-style templates emit when thinking is off.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence, TypeVar

from nekotune.data.formats import SHAREGPT_ROLES, Conversation, Turn
from nekotune.errors import UserError

T = TypeVar("T")

# -- chat columns --------------------------------------------------------------------------
# (role key, content key) pairs, in the order they are tried: OpenAI-style first, then ShareGPT's
TURN_KEYS = (("role", "content"), ("from", "value"))
CHAT_COLUMNS = ("messages", "conversations", "conversation", "chat", "dialog", "dialogue", "turns")
CHAT_ROLES = SHAREGPT_ROLES  # user/assistant/system and ShareGPT's human/gpt/... under either key pair


@dataclass(frozen=True)
class ChatColumn:
    column: str
    role_key: str
    content_key: str


def turn_keys(turns: Any) -> tuple[str, str] | None:
    """The (role, content) keys of a list of turns, judged by its first turn; None if it is not one."""
    if not isinstance(turns, list) or not turns or not isinstance(turns[0], dict):
        return None
    first = turns[0]
    return next(((r, c) for r, c in TURN_KEYS if r in first and c in first), None)


def find_chat_column(data: dict) -> ChatColumn | None:
    """The column holding chat turns, whatever it is called: the usual names first, then any
    column whose value is a list of role/content (or from/value) turns."""
    names = [c for c in CHAT_COLUMNS if c in data] + [c for c in data if c not in CHAT_COLUMNS]
    for name in names:
        keys = turn_keys(data.get(name))
        if keys:
            return ChatColumn(name, *keys)
    return None


def chat_conversation(data: dict, where: str, chat: ChatColumn | None = None,
                      prompts_only: bool = False) -> Conversation:
    """A row's chat turns as a Conversation. For training it must end with an assistant turn;
    with `prompts_only` (predict, compare, serve batches) it may end with a user turn: then
    `.prompt_part()` is the whole conversation and `.reference` is None."""
    chat = chat or find_chat_column(data)
    if chat is None:
        raise UserError(f"{where}: no column holds chat turns with role/content (or from/value) keys")
    items = data[chat.column]
    turns: list[Turn] = []
    raw_system = data.get("system")
    system = (raw_system.strip() or None) if isinstance(raw_system, str) else None
    for i, item in enumerate(items, start=1):
        role, content = _turn(item, i, chat, where)
        if role == "system":
            if turns:
                raise UserError(f"{where}: {chat.column}[{i}] is a system message after the conversation started; "
                                f"put it first")
            system = content or None
            continue
        expected = "user" if not turns or turns[-1].role == "assistant" else "assistant"
        if role != expected:
            raise UserError(f"{where}: {chat.column}[{i}] is `{item.get(chat.role_key)}` but a {expected} turn was "
                            f"expected; turns must alternate user/assistant")
        if not content:
            raise UserError(f"{where}: {chat.column}[{i}].{chat.content_key} is empty; fill it in or delete the row")
        turns.append(Turn(role, content))
    if not turns:
        raise UserError(f"{where}: `{chat.column}` has no user or assistant turn")
    if turns[-1].role != "assistant" and not prompts_only:
        raise UserError(f"{where}: `{chat.column}` must end with an assistant turn to have something to train on")
    return Conversation(turns=turns, system=system, where=where)


def _turn(item: Any, i: int, chat: ChatColumn, where: str) -> tuple[str, str]:
    if not isinstance(item, dict):
        raise UserError(f"{where}: {chat.column}[{i}] must be an object with `{chat.role_key}` and "
                        f"`{chat.content_key}`")
    raw = item.get(chat.role_key)
    role = CHAT_ROLES.get(str(raw).lower()) if raw is not None else None
    if role is None:
        raise UserError(f"{where}: {chat.column}[{i}].{chat.role_key} is {raw!r}; use one of "
                        f"{', '.join(sorted(set(CHAT_ROLES)))}")
    content = item.get(chat.content_key)
    if not isinstance(content, str):
        raise UserError(f"{where}: {chat.column}[{i}].{chat.content_key} must be text, got {type(content).__name__}")
    return role, content.strip()


def prompt_conversation(data: dict, where: str, chat: ChatColumn | None = None) -> Conversation:
    """The prompt part of a chat row for generation: every turn up to the last user turn."""
    return chat_conversation(data, where, chat, prompts_only=True).prompt_part()


# -- rows: repeat and the validation split -------------------------------------------------
def check_repeat(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"data.repeat={value!r}: give a whole number of copies, 1 or more (e.g. data.repeat=20)")
    return value


def repeat_rows(rows: Sequence[T], times: int) -> list[T]:
    """The training rows `times` times over (after the validation split, so no validation row is
    ever trained on); the Trainer shuffles them per epoch."""
    return list(rows) * check_repeat(times)


def validation_count(n_rows: int, val_size: float) -> tuple[int, str | None]:
    """How many rows go to validation, and a note when the fraction cannot be honoured.
    val_size below 1 is a fraction, 1 or more a row count; at least one row always stays for training."""
    if val_size <= 0:
        return 0, None
    if n_rows < 2:
        return 0, (f"data.val_size={val_size:g} ignored: the dataset has {n_rows} row, so it all goes to "
                   f"training and nothing is evaluated (give data.val_path for a validation file)")
    n_val = int(round(val_size * n_rows)) if val_size < 1 else int(val_size)
    return max(1, min(n_val, n_rows - 1)), None


def split_rows(rows: Sequence[T], val_size: float, seed: int) -> tuple[list[T], list[T], str | None]:
    """(train, validation, note): the same shuffle as data.prepare's split, plus the one-row rule."""
    n_val, note = validation_count(len(rows), val_size)
    if n_val == 0:
        return list(rows), [], note
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    return ([r for i, r in enumerate(rows) if i not in val_idx], [r for i, r in enumerate(rows) if i in val_idx],
            note)


# -- generated text ------------------------------------------------------------------------
REPLACEMENT = "\ufffd"
MAX_UTF8_BYTES = 4  # a byte-level BPE token can hold a single byte of a character


def strip_broken_tail(text: str) -> str:
    """Drop the U+FFFD characters that decoding a token sequence cut inside a character leaves at the end."""
    return text.rstrip(REPLACEMENT)


def decode_complete(tokenizer: Any, ids: Sequence[int], trailing: Iterable[int] = (), **decode_kwargs: Any) -> str:
    """Decode `ids`, leaving out trailing tokens that hold only part of a character (an answer cut
    by max_new_tokens in the middle of a Chinese character, an emoji ...). `trailing`: ids dropped
    from the end first (the pad and stop tokens a batch is filled up with)."""
    ids, drop = [int(i) for i in ids], set(trailing)
    while ids and ids[-1] in drop:
        ids.pop()
    text = tokenizer.decode(ids, **decode_kwargs)
    cut = 0
    while text.endswith(REPLACEMENT) and cut < MAX_UTF8_BYTES - 1 and cut < len(ids):
        cut += 1
        text = tokenizer.decode(ids[:-cut], **decode_kwargs)
    return strip_broken_tail(text)


def utf8_safe_stream(pieces: Iterable[str]) -> Iterator[str]:
    """Stream pieces with any trailing U+FFFD held back: emitted if more text follows (it was in
    the answer), dropped at the end (it was a character cut by the token limit)."""
    held = ""
    for piece in pieces:
        text = held + piece
        body = text.rstrip(REPLACEMENT)
        held = text[len(body):]
        if body:
            yield body


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
EMPTY_THINK = re.compile(r"<think>\s*</think>\s*")


def hide_empty_think(text: str) -> str:
    """Remove empty `<think></think>` blocks (and the blank lines after them); reasoning is kept."""
    return EMPTY_THINK.sub("", text)


def hide_empty_think_stream(pieces: Iterable[str]) -> Iterator[str]:
    """`hide_empty_think` over streamed text: text that may still become an empty block (a prefix
    of `<think>`, an open block holding only whitespace) is held until the next piece decides it.
    The joined output always equals `hide_empty_think` of the joined input."""
    buf = ""
    for piece in pieces:
        buf += piece
        ready, buf = _think_split(buf)
        if ready:
            yield ready
    tail = hide_empty_think(buf)  # at the end, a held block is either complete (hidden) or not (shown)
    if tail:
        yield tail


def _think_split(buf: str) -> tuple[str, str]:
    """(text that can be shown now, text held back)."""
    out = []
    while True:
        i = buf.find(THINK_OPEN)
        if i < 0:
            keep = _prefix_overlap(buf, THINK_OPEN)
            out.append(buf[: len(buf) - keep])
            return "".join(out), buf[len(buf) - keep:]
        out.append(buf[:i])
        rest = buf[i + len(THINK_OPEN):]
        inner = rest.lstrip()
        if inner.startswith(THINK_CLOSE):
            after = inner[len(THINK_CLOSE):]
            tail = after.lstrip()
            if not tail:  # blank lines after the block may continue: hold the block until text follows
                return "".join(out), buf[i:]
            buf = tail
            continue
        if THINK_CLOSE.startswith(inner):  # only whitespace, or a part of "</think>", so far
            return "".join(out), buf[i:]
        out.append(THINK_OPEN)  # a block with reasoning in it: shown as it is
        buf = rest


def _prefix_overlap(text: str, token: str) -> int:
    """The length of the longest end of `text` that begins `token`."""
    for n in range(min(len(text), len(token) - 1), 0, -1):
        if token.startswith(text[-n:]):
            return n
    return 0
