"""Decoding, validation and the pixel helpers the worker relies on."""

from __future__ import annotations

import random
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile, PngImagePlugin

from shared.imaging import (
    ImageError,
    ImageInfo,
    composite_unmasked,
    decode_base64,
    inspect_image,
    load_image,
    load_mask,
    pad_to_multiple,
)
from tests.conftest import b64, make_pair, png_bytes


def test_base64_and_data_urls_decode_to_the_same_bytes():
    raw = b"\x89PNG-some-bytes"
    assert decode_base64(b64(raw), "image") == raw
    assert decode_base64("data:image/png;base64," + b64(raw), "image") == raw
    assert decode_base64(b64(raw).rstrip("="), "image") == raw  # missing padding is forgiven
    with pytest.raises(ImageError) as err:
        decode_base64("not base64!", "mask")
    assert err.value.code == "invalid_base64" and err.value.param == "mask"


def test_base64_wrapped_in_lines_or_padded_oddly_is_read_and_nothing_else_is():
    raw = bytes(range(256)) * 40
    text = b64(raw)
    wrapped = "\r\n".join(text[i : i + 76] for i in range(0, len(text), 76))  # MIME's line length
    assert decode_base64(wrapped, "image") == raw
    assert decode_base64("data:image/png;base64,\n" + wrapped + "\n", "image") == raw
    assert decode_base64(b64(raw[:-1]).rstrip("="), "image") == raw[:-1]
    for bad in ("ab$d" + text, text + "=A", text[:-2] + "-_", "===="):
        with pytest.raises(ImageError) as err:
            decode_base64(bad, "image")
        assert err.value.code == "invalid_base64", bad[-8:]


def test_format_is_read_from_content_not_name():
    img = Image.new("RGB", (16, 16), "red")
    assert inspect_image(png_bytes(img, "JPEG"), "image", 10_000).format == "JPEG"
    with pytest.raises(ImageError) as err:
        inspect_image(png_bytes(img, "BMP"), "image", 10_000)
    assert err.value.code == "unsupported_image_format"


def test_pixel_limit_checked_from_header():
    img = Image.new("RGB", (200, 100))
    with pytest.raises(ImageError) as err:
        inspect_image(png_bytes(img), "image", 19_999)
    assert (err.value.code, err.value.status) == ("image_too_large", 413)
    assert inspect_image(png_bytes(img), "image", 20_000).width == 200


def test_exif_orientation_swaps_reported_size_and_is_applied():
    img = Image.new("RGB", (40, 20), "blue")
    img.paste((255, 0, 0), (0, 0, 10, 10))  # a red corner, top-left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90° clockwise
    data = png_bytes(img, "JPEG", exif=exif.tobytes(), quality=95)
    info = inspect_image(data, "image", 10_000)
    assert (info.width, info.height) == (20, 40)
    upright = load_image(data, 10_000)
    assert upright.size == (20, 40)
    r, _g, b = upright.getpixel((15, 3))  # the red corner is now top-right
    assert r > 200 and b < 60


def test_mask_is_one_channel_and_thresholded():
    m = Image.new("RGB", (8, 8), (100, 100, 100))
    m.paste((200, 200, 200), (0, 0, 4, 8))
    out = load_mask(png_bytes(m), 1000)
    assert out.mode == "L" and set(np.unique(np.asarray(out))) == {0, 255}
    assert out.getpixel((1, 1)) == 255 and out.getpixel((6, 1)) == 0


def test_transparent_and_16bit_images_become_rgb():
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert load_image(png_bytes(rgba), 1000).getpixel((0, 0)) == (255, 255, 255)
    deep = Image.new("I;16", (8, 8), 65535)
    assert load_image(png_bytes(deep), 1000).getpixel((0, 0)) == (255, 255, 255)


def test_pad_then_crop_and_composite():
    img = Image.new("RGB", (13, 9), (1, 2, 3))
    padded = pad_to_multiple(img, 8)
    assert padded.size == (16, 16) and padded.getpixel((15, 15)) == (1, 2, 3)
    mask = pad_to_multiple(Image.new("L", (13, 9), 255), 8, fill_edge=False)
    assert mask.getpixel((15, 15)) == 0  # padding is never repainted
    gen = Image.new("RGB", (13, 9), (9, 9, 9))
    keep = Image.new("L", (13, 9), 0)
    keep.paste(255, (0, 0, 5, 9))
    out = composite_unmasked(gen, img, keep)
    assert out.getpixel((2, 2)) == (9, 9, 9) and out.getpixel((10, 2)) == (1, 2, 3)


def test_a_mask_with_real_alpha_is_read_by_its_alpha_transparent_repaints():
    """OpenAI's convention: the transparent pixels of the mask are the ones to edit, whatever their color."""
    m = Image.new("RGBA", (8, 8), (255, 255, 255, 255))  # opaque white: the old rule repainted all of it
    m.paste((255, 255, 255, 0), (0, 0, 4, 8))  # transparent left half
    out = np.asarray(load_mask(png_bytes(m), 1000))
    assert (out[:, :4] == 255).all() and (out[:, 4:] == 0).all()
    # a palette PNG with a transparent index, likewise
    p = Image.new("P", (8, 8), 1)
    p.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    p.paste(0, (0, 0, 8, 2))
    p.info["transparency"] = 0
    out = np.asarray(load_mask(png_bytes(p), 1000))
    assert (out[:2] == 255).all() and (out[2:] == 0).all()
    # an alpha channel that is opaque everywhere is no alpha: white still means repaint
    opaque = Image.new("RGBA", (8, 8), (0, 0, 0, 255))
    opaque.paste((255, 255, 255, 255), (0, 0, 8, 3))
    out = np.asarray(load_mask(png_bytes(opaque), 1000))
    assert (out[:3] == 255).all() and (out[3:] == 0).all()


@pytest.mark.parametrize("kind", ["noise", "photo-like", "flat"])
def test_png_outputs_are_lossless_and_read_back_by_every_decoder(kind):
    import io

    import cv2

    from shared.imaging import encode_image

    rng = np.random.default_rng(3)
    if kind == "noise":
        arr = rng.integers(0, 256, (67, 130, 3), dtype=np.uint8)  # odd sizes: no row padding assumed
    elif kind == "photo-like":
        arr = np.clip(np.linspace(0, 255, 130)[None, :, None] + rng.normal(0, 6, (67, 130, 3)), 0, 255).astype(np.uint8)
    else:
        arr = np.full((67, 130, 3), (10, 200, 30), np.uint8)
    data = encode_image(Image.fromarray(arr), "png")
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), arr)
    assert np.array_equal(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[..., ::-1], arr)
    # What the worker stores passes the API's own checks, should it come back as an input.
    assert inspect_image(data, "image", 10**6).format == "PNG"


def upright(data: bytes) -> tuple[int, int]:
    info = inspect_image(data, "image", 10_000)
    return info.width, info.height


def _chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    out, pos = [], 8
    while pos < len(png):
        length, kind = struct.unpack(">I4s", png[pos : pos + 8])
        out.append((kind, png[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return out


def _png(chunks: list[tuple[bytes, bytes]]) -> bytes:
    """A PNG of these chunks, every checksum right."""
    out = [b"\x89PNG\r\n\x1a\n"]
    for kind, data in chunks:
        out.append(struct.pack(">I4s", len(data), kind) + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind))))
    return b"".join(out)


def _rechecksummed(png: bytes, damage) -> bytes:  # type: ignore[no-untyped-def]
    """The PNG with `damage` applied to its joined IDAT data and every checksum made right again:
    what only a broken encoder or a crafted file produces."""
    chunks = _chunks(png)
    idat = damage(b"".join(data for kind, data in chunks if kind == b"IDAT"))
    first = next(i for i, (kind, _) in enumerate(chunks) if kind == b"IDAT")
    rest = [c for c in chunks if c[0] != b"IDAT"]
    return _png([*rest[:first], (b"IDAT", idat), *rest[first:]])


def test_a_png_is_checked_without_decoding_its_pixels(monkeypatch: pytest.MonkeyPatch):
    """Inflating and unfiltering a 512² photo costs the API ~4 ms a submit; every chunk's checksum, read
    through IEND, costs 0.1 ms and already refuses any truncation or changed byte."""
    img, _ = make_pair(64, 48)
    data = png_bytes(img)

    def no_decoding(self):  # type: ignore[no-untyped-def]
        raise AssertionError("the pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    assert inspect_image(data, "image", 10_000) == ImageInfo("PNG", 64, 48)
    for cut in (len(data) - 13, len(data) // 2, 60):  # what follows IEND's header carries nothing
        with pytest.raises(ImageError) as err:
            inspect_image(data[:cut], "image", 10_000)
        assert err.value.code in ("invalid_image", "unsupported_image_format"), cut
    for at in range(8, len(data) - 4, 7):
        flipped = bytearray(data)
        flipped[at] ^= 0x10
        with pytest.raises(ImageError):
            inspect_image(bytes(flipped), "image", 10_000)


def test_a_png_that_may_carry_an_orientation_is_still_seen_upright():
    """An orientation may sit in a chunk after the pixels, where only decoding reaches it: such a PNG
    takes the decoding path, and the API compares the mask with the image as the worker will see it."""
    img = Image.new("RGB", (40, 20), "blue")
    exif = Image.Exif()
    exif[0x0112] = 6
    assert upright(png_bytes(img, exif=exif.tobytes())) == (20, 40)
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><tiff:Orientation>8</tiff:Orientation></x:xmpmeta>'
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", xmp.decode())
    assert upright(png_bytes(img, pnginfo=info)) == (20, 40)
    # The eXIf chunk after the pixels, where the PNG specification allows it
    chunks = _chunks(png_bytes(img, exif=exif.tobytes()))
    late = [
        *(c for c in chunks if c[0] not in (b"eXIf", b"IEND")),
        *(c for c in chunks if c[0] == b"eXIf"),
        (b"IEND", b""),
    ]
    assert [k for k, _ in late][-3:] == [b"IDAT", b"eXIf", b"IEND"]
    assert upright(_png(late)) == (20, 40) == load_image(_png(late), 10_000).size


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_what_the_api_accepts_the_worker_can_decode(fmt: str):
    """Damaged copies of an image: whatever passes the API's check decodes in the worker, whatever the
    check's shortcut for the format (checksums for PNG, one-eighth scale for JPEG)."""
    rng = random.Random(11)
    img, _ = make_pair(96, 64)
    data = png_bytes(img, fmt, **({"quality": 90} if fmt != "PNG" else {}))
    accepted = 0
    for k in range(150):
        damaged = bytearray(data)
        if k % 3 == 0:
            damaged = damaged[: rng.randrange(16, len(data))]
        else:
            for _ in range(rng.randrange(1, 4)):
                damaged[rng.randrange(2, len(damaged))] ^= 1 << rng.randrange(8)
        try:
            info = inspect_image(bytes(damaged), "image", 10_000)
        except ImageError:
            continue
        accepted += 1
        assert load_image(bytes(damaged), 10_000).size == (info.width, info.height), k
    assert accepted >= 1 or fmt == "PNG"


def test_a_png_whose_checksums_hold_but_whose_pixels_do_not_fails_as_bad_input():
    """The one damage the PNG check cannot see: the worker's decode refuses it as bad input (the job
    fails `invalid_input`), never an unexpected error."""
    img, mask = make_pair(64, 48)
    for damage in (lambda z: z[: len(z) // 2], lambda z: z[:40] + bytes(b ^ 0x5A for b in z[40:80]) + z[80:]):
        for data, load in ((png_bytes(img), load_image), (png_bytes(mask), load_mask)):
            crafted = _rechecksummed(data, damage)
            assert upright(crafted) == (64, 48)
            with pytest.raises(ImageError) as err:
                load(crafted, 10_000)
            assert err.value.code == "invalid_image"
