"""The processor of a Qwen-VL model: tokenizer + image processor + chat template.

`AutoProcessor` is used where it works. Where torchvision is missing (or does not load beside a
CPU build of torch) it cannot build the Qwen-VL processors, whose video processor needs it, so the
processor is built from the tokenizer, the PIL image processor and the chat template; image
training and inference are identical either way (video is not supported).

Pixel bounds (`data.image_min_pixels`/`image_max_pixels`) are passed when the image processor is
constructed: they become its `size` (shortest_edge/longest_edge). Assigning `ip.max_pixels`
afterwards is honoured by processing but not by `size` or the token counting: counts and pixels
would disagree.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from typing import Any

from nekotune.errors import UserError
from nekotune.vision.families import family_of

# What makes a directory load as a VLM elsewhere: copied into adapter and merged directories
# (saving the image-only processor object would write a layout stock AutoProcessor refuses).
PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json",
                   "chat_template.jinja", "chat_template.json")


def _file(path: str, name: str, revision: str | None = None) -> Path | None:
    """A file of a local directory or hub snapshot; None where it has none."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local / name if (local / name).is_file() else None
    from transformers.utils import cached_file

    found = cached_file(path, name, revision=revision, _raise_exceptions_for_missing_entries=False,
                        _raise_exceptions_for_connection_errors=False)
    return Path(found) if found else None


def _json(path: str, name: str, revision: str | None = None) -> dict:
    f = _file(path, name, revision)
    if f is None:
        return {}
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{f}: not readable JSON ({exc})") from None
    return data if isinstance(data, dict) else {}


def read_model_json(path: str, name: str, revision: str | None = None) -> dict:
    """A JSON file of a model directory or hub snapshot ({} where it has none)."""
    return _json(path, name, revision)


def has_processor_files(path: str | Path) -> bool:
    return (Path(path) / "preprocessor_config.json").is_file()


def processor_source(base: str, adapter: str | None = None) -> str:
    """Where to load the processor from: an adapter or run that carries its files, else the base."""
    return adapter if adapter and has_processor_files(adapter) else base


def chat_template_of(path: str, tokenizer: Any, revision: str | None = None) -> str | None:
    """The processor-level template wins (chat_template.jinja, then legacy chat_template.json), as
    AutoProcessor does; AutoTokenizer reads neither."""
    jinja = _file(path, "chat_template.jinja", revision)
    if jinja is not None:
        return jinja.read_text(encoding="utf-8")
    return _json(path, "chat_template.json", revision).get("chat_template") or tokenizer.chat_template


@functools.cache
def _image_only(cls: Any) -> type:
    """`cls` without its video processor. ProcessorMixin reads its sub-processors from __init__'s
    signature and type-checks `video_processor` against a class that needs torchvision."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        cls.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": __name__})


def _pixel_kwargs(min_pixels: int | None, max_pixels: int | None) -> dict[str, int]:
    if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
        raise UserError(f"data.image_min_pixels={min_pixels} is above data.image_max_pixels={max_pixels}; "
                        f"lower the minimum or raise the maximum")
    for key, value in (("image_min_pixels", min_pixels), ("image_max_pixels", max_pixels)):
        if value is not None and value <= 0:
            raise UserError(f"data.{key}={value} must be a positive number of pixels (e.g. 589824 = 768*768)")
    return {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}


def _is_missing_torchvision(exc: Exception) -> bool:
    # The ImportError's first line is empty ("\nQwen2VLVideoProcessor requires the Torchvision ..."),
    # and with no video config saved the error is an OSError "Can't load video processor".
    text = str(exc).lower()
    return "torchvision" in text or "video processor" in text


def load_processor(path: str, min_pixels: int | None = None, max_pixels: int | None = None,
                   chat_template: str | None = None, revision: str | None = None,
                   trust_remote_code: bool = False) -> Any:
    """The processor of a model directory, adapter/run/merged directory with processor files, or
    hub id. `chat_template` (model.chat_template's text) replaces the model's template."""
    from transformers import AutoImageProcessor, AutoProcessor

    pixels = _pixel_kwargs(min_pixels, max_pixels)
    proc = None
    try:
        proc = AutoProcessor.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except (ImportError, OSError) as exc:
        if not _is_missing_torchvision(exc):
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserError(f"cannot load the processor of {path} ({first[:200]})") from None
    if proc is not None and hasattr(proc, "image_processor"):
        if pixels:
            proc.image_processor = AutoImageProcessor.from_pretrained(path, revision=revision, **pixels)
    else:  # no torchvision, or AutoProcessor fell back to a bare tokenizer (unknown processor_class)
        proc = _build_image_only(path, pixels, revision)
    tok = proc.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    template = chat_template or proc.chat_template or chat_template_of(path, tok, revision)
    proc.chat_template = tok.chat_template = template  # the Renderer renders through the tokenizer
    return proc


def _build_image_only(path: str, pixels: dict[str, int], revision: str | None) -> Any:
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer

    name = (_json(path, "processor_config.json", revision).get("processor_class")
            or _json(path, "preprocessor_config.json", revision).get("processor_class"))
    if not name:
        fam = family_of(_json(path, "config.json", revision))
        name = fam.processor_class if fam else None
    cls = getattr(transformers, str(name), None) if name else None
    if cls is None:
        raise UserError(f"{path}: no processor_class in preprocessor_config.json to build the image processor "
                        f"from; is this a vision-language model?")
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=revision)
        ip = AutoImageProcessor.from_pretrained(path, revision=revision, backend="pil", **pixels)
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"cannot load the processor of {path} ({first[:200]})") from None
    return _image_only(cls)(image_processor=ip, tokenizer=tok, chat_template=chat_template_of(path, tok, revision))


def copy_processor_files(source: str, dest: str | Path, revision: str | None = None) -> list[str]:
    """Copy the base's processor files into an adapter or merged directory nekotune writes."""
    copied = []
    for name in PROCESSOR_FILES:
        f = _file(source, name, revision)
        if f is not None:
            shutil.copyfile(f, Path(dest) / name)
            copied.append(name)
    return copied
