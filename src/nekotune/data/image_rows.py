"""Rows with images -> a Conversation whose user turns carry images.

Two shapes users bring, mixed freely within a row:
- LLaMA-Factory: `messages` (role/content) or ShareGPT `conversations` (from/value) with `<image>`
  placeholders in the text and an `images` list beside, one entry per placeholder, in order;
- OpenAI / TRL / HF content parts: `{"type": "text", "text": ...}`, `{"type": "image", "image": ...}`
  (or `url`/`path`), `{"type": "image_url", "image_url": {"url": ...}}`. A part without a payload
  (TRL's `{"type": "image"}`) takes the next entry of `images`, as TRL does.

The Conversation carries them as data/formats.py defines it: a Turn has
`images: list[ImageRef]` and keeps `content: str`, in which `<image>` marks each image's place.
Everything that reads `content` as text (the loss mask, limits, the reference answer, display)
keeps working; only `messages()` changes, emitting the content-part list chat templates expect
for a turn with images. Validation (roles, alternation, empty turns) is the text formats' own:
the row is converted to text with placeholders first and handed to them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nekotune.data.formats import IMAGE, Conversation, Turn, from_messages, from_sharegpt
from nekotune.data.images import ImageRef
from nekotune.data.sources import Row
from nekotune.errors import UserError


def user_turn(text: str, images: list[Any] | None = None, base_dirs: tuple[Path, ...] = ()) -> Turn:
    """A user turn for chat, `ask --image`, the UI and the API: images first, then the text
    (the layout of Qwen's own examples)."""
    refs = [i if isinstance(i, ImageRef) else ImageRef(i, base_dirs) for i in images or []]
    return Turn("user", IMAGE * len(refs) + text, refs)


def turn_from_content(role: str, content: Any, where: str) -> Turn:
    """One OpenAI chat message (the server's `messages[i]`): text or content parts, images by
    `image_url` (data URLs; remote URLs only where the renderer's ImagePolicy allows them)."""
    text, payloads = content_text(content, where)
    if payloads and role != "user":
        raise UserError(f"{where}: the {role} message has an image; images go in user messages")
    if any(p is None or not isinstance(p, str) for p in payloads):
        raise UserError(f"{where}: an image part without an image; send {{\"type\": \"image_url\", "
                        f"\"image_url\": {{\"url\": \"data:image/png;base64,...\"}}}}")
    return Turn(role, text, [ImageRef(p) for p in payloads])


def _part_payload(part: Any, where: str) -> tuple[str, Any]:
    """("text", text) or ("image", payload or None) for one content part."""
    if not isinstance(part, dict):
        raise UserError(f"{where} must be an object like {{\"type\": \"text\", \"text\": ...}}")
    kind = part.get("type")
    if kind == "text" or (kind is None and "text" in part and "image" not in part):
        text = part.get("text")
        if text is not None and not isinstance(text, str):
            raise UserError(f"{where}.text must be text, got {type(text).__name__}")
        if text and IMAGE in text:
            raise UserError(f"{where}: a text part holds the {IMAGE} placeholder; in content parts an image is "
                            f"its own part ({{\"type\": \"image\", \"image\": ...}})")
        return "text", text or ""
    if kind == "image_url":  # OpenAI: {"type": "image_url", "image_url": {"url": ...}}
        value = part.get("image_url")
        url = value.get("url") if isinstance(value, dict) else value
        if not isinstance(url, str) or not url:
            raise UserError(f"{where}.image_url.url must be a URL or data URL")
        return "image", url
    if kind == "image" or "image" in part:  # TRL / HF; TRL's payload-less placeholder gives None
        return "image", part.get("image") or part.get("url") or part.get("path")
    raise UserError(f"{where} has type {kind!r}; use text, image or image_url")


def content_text(content: Any, where: str) -> tuple[str, list[Any]]:
    """Text with one IMAGE per image, and the images' payloads in order (None: from `images`)."""
    if content is None or isinstance(content, str):
        text = content or ""
        return text, [None] * text.count(IMAGE)
    if not isinstance(content, list):
        raise UserError(f"{where} must be text or a list of content parts, got {type(content).__name__}")
    chunks, payloads = [], []
    for j, part in enumerate(content):
        kind, value = _part_payload(part, f"{where}[{j}]")
        if kind == "text":
            chunks.append(value)
        else:
            chunks.append(IMAGE)
            payloads.append(value)
    return "".join(chunks), payloads


def _images_column(data: dict, where: str) -> list[Any]:
    images = data.get("images", data.get("image"))
    if images is None:
        return []
    if isinstance(images, (str, dict)):
        return [images]
    if not isinstance(images, list):
        raise UserError(f"{where}: field `images` must be a list of paths/URLs, got {type(images).__name__}")
    return images


def has_images(data: dict) -> bool:
    """Whether a row is a vision row (an `images` column, placeholders or image parts)."""
    if _images_column(data, ""):
        return True
    for key, content_key in (("messages", "content"), ("conversations", "value")):
        items = data.get(key)
        for msg in items if isinstance(items, list) else []:
            content = msg.get(content_key) if isinstance(msg, dict) else None
            if isinstance(content, str) and IMAGE in content:
                return True
            if isinstance(content, list) and any(_is_image_part(p) for p in content):
                return True
    return False


def _is_image_part(part: Any) -> bool:
    return isinstance(part, dict) and (part.get("type") in ("image", "image_url") or "image" in part)


def to_vision_conversation(row: Row, base_dirs: tuple[Path, ...] = ()) -> Conversation:
    """A `messages` or ShareGPT `conversations` row with images -> Conversation."""
    key, role_key, content_key = ("conversations", "from", "value") if "conversations" in row.data and \
        "messages" not in row.data else ("messages", "role", "content")
    items = row.data.get(key)
    if not isinstance(items, list):
        raise UserError(f"{row.where}: field `{key}` must be a non-empty list of turns")
    text_items, slots = [], []  # slots: (message index, payload or None), in rendering order
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise UserError(f"{row.where}: {key}[{i + 1}] must be an object with `{role_key}` and `{content_key}`")
        text, payloads = content_text(item.get(content_key), f"{row.where}: {key}[{i + 1}].{content_key}")
        role = str(item.get(role_key)).lower()
        if payloads and role not in ("user", "human"):
            raise UserError(f"{row.where}: {key}[{i + 1}] (role {item.get(role_key)}) has an image; images go "
                            f"in user turns")
        slots += [(i, p) for p in payloads]
        text_items.append({**item, content_key: text})
    _fill_from_column(slots, _images_column(row.data, row.where), row.where)
    conv = (from_sharegpt if key == "conversations" else from_messages)(Row({**row.data, key: text_items}, row.where))
    refs = iter(ImageRef(payload, base_dirs) for _, payload in slots)
    turns = [Turn(t.role, t.content, [next(refs) for _ in range(t.content.count(IMAGE))]) for t in conv.turns]
    return Conversation(turns=list(turns), system=conv.system, where=conv.where)


def _fill_from_column(slots: list[tuple[int, Any]], images: list[Any], where: str) -> None:
    free = [k for k, (_, payload) in enumerate(slots) if payload is None]
    if len(free) != len(images):
        raise UserError(f"{where}: {len(free)} image placeholder(s) but {len(images)} image(s) in `images`; give "
                        f"one `images` entry per {IMAGE} (or image part without a payload), in order")
    for k, payload in zip(free, images, strict=True):
        if payload is None or payload == "":
            raise UserError(f"{where}: `images` entry {free.index(k) + 1} is empty")
        slots[k] = (slots[k][0], payload)
