"""Images for vision-language rows: a reference (path, URL, data URL, HF `{bytes, path}` dict or an
in-memory PIL image), loaded with one-line errors naming the row and the image.

Relative paths resolve against `ImageRef.base_dirs`, the first that holds the file winning: the
dataset file's folder, and for LLaMA-Factory dataset_info.json entries its dataset_dir (or
media_dir), which is what LLaMA-Factory resolves against.

`image_size` reads only the header, so `data check`, `estimate` and the renderer count image
tokens without decoding pixels; `load_image` decodes at once (`img.load()`), so a truncated file
fails here, by name, and not deep inside the processor.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nekotune.errors import UserError

INLINE = "(inline image)"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://|file:)")  # file:, ftp://, s3://: not read
EXIF_ORIENTATION = 0x0112  # orientations 5-8 are rotated by 90 degrees: width and height swap


@dataclass(frozen=True, eq=False)
class ImageRef:
    """One image of a row, not yet loaded. `source`: str (path, http(s) URL, data URL), a
    `{"bytes": ..., "path": ...}` dict (datasets' Image feature) or a PIL image (chat, UI, API)."""

    source: Any
    base_dirs: tuple[Path, ...] = ()

    @property
    def label(self) -> str:
        src = self.source
        if isinstance(src, str):
            return INLINE if src.startswith("data:") else (src if len(src) <= 120 else src[:117] + "...")
        if isinstance(src, dict):
            return str(src.get("path") or INLINE)
        return INLINE


@dataclass(frozen=True)
class ImagePolicy:
    """Where images may come from. Datasets are the user's own files (paths and URLs allowed);
    a server request may name neither a local file nor, unless the operator allows it, a URL."""

    allow_files: bool = True
    allow_remote: bool = True
    max_bytes: int = 50 * 2**20
    max_pixels: int = 178_956_970  # PIL's decompression-bomb limit; a photo is ~12-50 Mpx
    timeout: float = 10.0


DATA_POLICY = ImagePolicy()
REQUEST_POLICY = ImagePolicy(allow_files=False, allow_remote=False)


class _Failure(Exception):
    """Why an image cannot be used; turned into a UserError naming row and image."""


def resolve_path(source: str, base_dirs: tuple[Path, ...]) -> Path:
    p = Path(source).expanduser()
    if p.is_absolute() or not base_dirs:
        return p
    candidates = [d / p for d in base_dirs]
    return next((c for c in candidates if c.is_file()), candidates[0])


def _fetch(url: str, policy: ImagePolicy) -> bytes:
    if not policy.allow_remote:
        raise _Failure("is a remote URL, and remote image URLs are off here (send the image as a data URL, "
                       "or start the server with --allow-remote-images)")
    request = urllib.request.Request(url, headers={"User-Agent": "nekotune"})
    try:
        with urllib.request.urlopen(request, timeout=policy.timeout) as response:  # noqa: S310 (http(s) only)
            data = response.read(policy.max_bytes + 1)
    except urllib.error.HTTPError as exc:
        raise _Failure(f"cannot be downloaded (HTTP Error {exc.code}: {exc.reason})") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise _Failure(f"cannot be downloaded ({reason})") from None
    if len(data) > policy.max_bytes:
        raise _Failure(f"is too large (over {policy.max_bytes >> 20} MB)")
    return data


def _data_url(url: str, policy: ImagePolicy) -> bytes:
    header, _, payload = url.partition(",")
    if ";base64" not in header:
        raise _Failure("is a data URL that is not base64 (use data:image/png;base64,...)")
    if len(payload) * 3 // 4 > policy.max_bytes:
        raise _Failure(f"is too large (over {policy.max_bytes >> 20} MB)")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _Failure("is a data URL whose base64 payload is broken") from None


def _file(ref: ImageRef, source: str, policy: ImagePolicy) -> Path:
    if not policy.allow_files:
        raise _Failure("is a local file path, which is not accepted here; send the image as a data URL")
    path = resolve_path(source, ref.base_dirs)
    if not path.is_file():
        raise _Failure(f"was not found ({path})")
    if path.stat().st_size > policy.max_bytes:
        raise _Failure(f"is too large (over {policy.max_bytes >> 20} MB)")
    return path


def _open(ref: ImageRef, policy: ImagePolicy):
    """The image, opened lazily (header read, pixels not decoded)."""
    from PIL import Image

    src = ref.source
    if isinstance(src, Image.Image):
        return src
    if isinstance(src, dict):
        if src.get("bytes"):
            src = bytes(src["bytes"])
        elif isinstance(src.get("path"), str):
            src = src["path"]
        else:
            raise _Failure("has neither bytes nor a path")
    if isinstance(src, str):
        if src.startswith("data:"):
            src = _data_url(src, policy)
        elif src.startswith(("http://", "https://")):
            src = _fetch(src, policy)
        elif _SCHEME.match(src):
            raise _Failure("has a URL scheme nekotune does not read (use a path, http(s) or a data URL)")
        else:
            return Image.open(_file(ref, src, policy))
    if isinstance(src, (bytes, bytearray)):
        return Image.open(io.BytesIO(src))
    raise _Failure(f"must be a path, URL, data URL or {{bytes, path}} object, got {type(src).__name__}")


def _checked(ref: ImageRef, where: str, policy: ImagePolicy, decode: bool):
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        img = _open(ref, policy)
        if img.width * img.height > policy.max_pixels:
            raise _Failure(f"is too large ({img.width}x{img.height} pixels; the limit is {policy.max_pixels})")
        if not decode:
            return img
        img.load()
        return ImageOps.exif_transpose(img)
    except _Failure as exc:
        raise UserError(f"{where}: image {ref.label} {exc}") from None
    except Image.DecompressionBombError:
        raise UserError(f"{where}: image {ref.label} is too large (a decompression bomb?)") from None
    except UnidentifiedImageError:
        raise UserError(f"{where}: image {ref.label} is not an image PIL can read") from None
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt data; PIL raises all three
        first = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{where}: image {ref.label} cannot be read ({first})") from None


def image_size(ref: ImageRef, where: str, policy: ImagePolicy = DATA_POLICY) -> tuple[int, int]:
    """(height, width) as `load_image` will return it, from the header only."""
    img = _checked(ref, where, policy, decode=False)
    try:
        orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # a broken EXIF block: load_image's exif_transpose will ignore it as well
        orientation = 1
    width, height = img.size
    if img is not ref.source:
        img.close()
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


def load_image(ref: ImageRef, where: str, policy: ImagePolicy = DATA_POLICY):
    """The decoded RGB image (EXIF orientation applied, transparency on white, as transformers'
    own `load_image` and `convert_to_rgb` do)."""
    from PIL import Image

    img = _checked(ref, where, policy, decode=True)
    if img.mode == "RGB":
        return img
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


# -- image tokens without pixels -------------------------------------------------------------
def image_grid(image_processor: Any, height: int, width: int) -> tuple[int, int, int]:
    """(t, h, w) patches of one image, as the processor's resize will make it (its smart_resize
    with its own size and patch settings); ValueError for an aspect ratio over 200."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    patch, merge = image_processor.patch_size, image_processor.merge_size
    size = image_processor.size
    h, w = smart_resize(height, width, factor=patch * merge, min_pixels=size["shortest_edge"],
                        max_pixels=size["longest_edge"])
    return 1, h // patch, w // patch


def image_tokens(image_processor: Any, height: int, width: int) -> int:
    """How many image-pad tokens one image becomes in the text."""
    t, h, w = image_grid(image_processor, height, width)
    return t * h * w // image_processor.merge_size ** 2
