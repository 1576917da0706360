"""Decode, validate and encode images: the checks the API runs before a job exists."""

from __future__ import annotations

import binascii
import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
import pybase64
from PIL import Image, ImageOps, UnidentifiedImageError

from shared.errors import Code, Problem

# Only these decoders ever see user bytes; the format is read from the content, never a name.
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")
_DATA_URL = re.compile(r"^data:([\w/+.-]+)?(;[\w=.-]+)*;base64,", re.IGNORECASE)
_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90°
# What an orientation in a PNG is read from: an eXIf chunk, a raw EXIF text chunk, XMP (chunk names,
# text keys, and the keys Pillow files them under).
_PNG_ORIENTATION_MARKS = (b"eXIf", b"exif", b"XML:com.adobe.xmp")
_PNG_ORIENTATION_KEYS = ("exif", "Raw profile type exif", "xmp", "XML:com.adobe.xmp")


class ImageError(Problem):
    """Bad image input: a stable code, a message and the HTTP status it maps to."""

    def __init__(self, code: Code, message: str, status: int = 400, param: str | None = None):
        super().__init__(status, code, message, param)


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int  # after the EXIF orientation is applied
    height: int


def decode_base64(value: str, field: str) -> bytes:
    """Bytes of a base64 string or a `data:` URL; line breaks and missing padding are forgiven.

    pybase64 (SIMD) decodes a 470 KB photo's base64 in 0.02 ms against the standard library's 1.0 ms,
    on every submit; an unbroken string, the common case, is decoded as it is, without a copy."""
    text = _DATA_URL.sub("", value.strip(), count=1)
    for attempt in (text, "".join(text.split())):  # the second: a body wrapped in lines, as MIME does
        if not attempt:
            raise ImageError(Code.invalid_base64, f"`{field}` is empty", param=field)
        try:
            return pybase64.b64decode(attempt + "=" * (-len(attempt) % 4), validate=True)
        except (binascii.Error, ValueError):
            continue
    raise ImageError(Code.invalid_base64, f"`{field}` is not valid base64 or a base64 data URL", param=field)


def _open(data: bytes, field: str, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(Code.image_too_large, f"`{field}` has too many pixels", 413, field) from None
    except UnidentifiedImageError:
        raise ImageError(
            Code.unsupported_image_format, f"`{field}` is not a PNG, JPEG or WebP image", 400, field
        ) from None
    except Exception:  # noqa: BLE001 - a header that breaks a decoder is bad input, never a 500
        raise ImageError(Code.invalid_image, f"`{field}` could not be read as an image", 400, field) from None
    # Refuse decompression bombs from the header, before a single pixel is decoded.
    if img.width * img.height > max_pixels:
        raise ImageError(
            Code.image_too_large,
            f"`{field}` is {img.width}×{img.height}, above the limit of {max_pixels} pixels",
            413,
            field,
        )
    if img.width < 8 or img.height < 8:
        raise ImageError(Code.image_too_small, f"`{field}` must be at least 8×8 pixels", 400, field)
    return img


def read_header(data: bytes, field: str, max_pixels: int) -> ImageInfo:
    """Format, stored size and the pixel limit, from the header alone (microseconds): what may be
    checked before the pixels are. The size is as stored, before any EXIF rotation."""
    img = _open(data, field, max_pixels)
    img.close()
    return ImageInfo(img.format or "", img.width, img.height)


def inspect_image(data: bytes, field: str, max_pixels: int) -> ImageInfo:
    """Check that the bytes are a whole allowed image within the pixel limit, so that a truncated or
    corrupt file fails here, not on the GPU worker; no pixels are kept. The size is upright (EXIF
    orientation applied), as the worker will see it.

    What is checked costs what it must (`benchmarks/codecs.py`, 512×512 photo): a PNG by its structure,
    every chunk read through IEND with its CRC (0.2 ms, against 4 ms to inflate and unfilter the
    pixels), which refuses any truncation or changed byte; a JPEG by decoding its whole entropy-coded
    stream at one eighth of the size (0.5 ms against 1.0); WebP by decoding it. A PNG whose checksums
    hold but whose compressed pixels do not (made only by a broken encoder, or on purpose) is refused
    by the worker's decode instead: its job fails `invalid_input`."""
    img = _open(data, field, max_pixels)
    width, height = img.size
    if img.format == "PNG" and not _png_may_turn(img, data):
        try:
            img.verify()
        except Exception:  # noqa: BLE001
            raise _corrupt(field) from None
        return ImageInfo("PNG", width, height)
    if img.format == "JPEG":
        img.draft(img.mode, (width // 8, height // 8))
    decode_pixels(img, field)
    try:
        # After decoding: a PNG's eXIf chunk may follow its pixels, and the worker reads it there too.
        orientation = int(img.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - broken EXIF is ignored the way viewers ignore it
        orientation = 1
    finally:
        img.close()
    if orientation in _SWAPS_AXES:
        width, height = height, width
    return ImageInfo(img.format or "", width, height)


def _png_may_turn(img: Image.Image, data: bytes) -> bool:
    """Whether a PNG may carry an orientation: in a chunk before its pixels (read at open, so in
    `img.info`) or in one after them (only decoding reads those: its bytes after the last `IDAT`)."""
    tail = data.rfind(b"IDAT")
    return any(key in img.info for key in _PNG_ORIENTATION_KEYS) or any(
        data.find(mark, tail) >= 0 for mark in _PNG_ORIENTATION_MARKS
    )


def decode_pixels(img: Image.Image, field: str) -> None:
    """Decode the pixels; a file that cannot give them all is bad input, wherever it is found."""
    try:
        img.load()
    except Exception:  # noqa: BLE001
        raise _corrupt(field) from None


def _corrupt(field: str) -> ImageError:
    return ImageError(Code.invalid_image, f"`{field}` is truncated or corrupt", 400, field)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if _has_alpha(img):
        # Transparent pixels become white, the way browsers show them on a page.
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(data: bytes, max_pixels: int) -> Image.Image:
    """An upright RGB image from validated bytes (EXIF orientation applied)."""
    img = _open(data, "image", max_pixels)
    decode_pixels(img, "image")
    img = ImageOps.exif_transpose(img) or img
    return _to_rgb(img)


def load_mask(data: bytes, max_pixels: int) -> Image.Image:
    """An upright one-channel mask, thresholded: 255 = repaint, 0 = keep.

    A mask with a real alpha channel (some pixel not fully opaque) is read by its alpha, transparent =
    repaint: OpenAI's convention, where the mask is the image with the area to edit erased. Any other
    mask by its brightness: white = repaint."""
    img = _open(data, "mask", max_pixels)
    decode_pixels(img, "mask")
    img = ImageOps.exif_transpose(img) or img
    alpha = _alpha(img)
    if alpha is not None and alpha.min() < 255:
        return Image.fromarray(np.where(alpha < 128, 255, 0).astype(np.uint8), "L")
    gray = np.asarray(_to_rgb(img).convert("L"))
    return Image.fromarray(np.where(gray >= 128, 255, 0).astype(np.uint8), "L")


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)


def _alpha(img: Image.Image) -> np.ndarray | None:
    """The image's alpha channel, when it has one."""
    return np.asarray(img.convert("RGBA").getchannel("A")) if _has_alpha(img) else None


def pad_to_multiple(img: Image.Image, multiple: int = 8, fill_edge: bool = True) -> Image.Image:
    """Pad right and bottom up to a multiple; edges are repeated (images) or zero (masks: keep)."""
    w, h = img.size
    pw, ph = -w % multiple, -h % multiple
    if not pw and not ph:
        return img
    arr = np.asarray(img)
    pad = ((0, ph), (0, pw)) + (((0, 0),) if arr.ndim == 3 else ())
    out = np.pad(arr, pad, mode="edge") if fill_edge else np.pad(arr, pad, mode="constant")
    return Image.fromarray(out, img.mode)


def composite_unmasked(generated: Image.Image, original: Image.Image, mask: Image.Image) -> Image.Image:
    """Keep the original's own pixels wherever the mask says keep (the mask is binary)."""
    return Image.composite(generated.convert("RGB"), original, mask)


def encode_image(img: Image.Image, fmt: str) -> bytes:
    """Encode an output. PNG goes through fpng (Rich Geldreich's fast encoder): on a 512×512 photo about
    0.7 ms against 10–13 ms for OpenCV/zlib at level 1, for files about 20% larger on photos (up to 80% on
    very smooth images), and encoding sits on every job's path (`benchmarks/codecs.py`)."""
    if fmt == "png":
        import fpng

        return bytes(fpng.from_ndarray(np.ascontiguousarray(np.asarray(img.convert("RGB")))))
    out = io.BytesIO()
    if fmt == "jpeg":
        img.save(out, format="JPEG", quality=95)
    else:
        img.save(out, format="WEBP", quality=95)
    return out.getvalue()
