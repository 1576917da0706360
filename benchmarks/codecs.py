"""Time and size of encoding one 512×512 output as PNG: fpng (what the worker uses) against OpenCV/zlib
at level 1 with the RLE strategy (what it used before) and Pillow's default, on three kinds of picture:
a photo-like one (gradients with sensor noise), a smooth one (the photo blurred, like most diffusion
outputs) and pure noise (what the tiny-random test model paints inside the mask). Every encoding is
decoded back and checked to be lossless.

Then what the API's check of an input costs (`shared.imaging.inspect_image`) against decoding every
pixel (what it did before), for the photo-like picture as a PNG and as JPEGs.

    python benchmarks/codecs.py [--out benchmarks/results/codecs-DATE.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import fpng
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.overhead import inputs
from shared.imaging import decode_base64, inspect_image, load_image


def opencv_level1(arr: np.ndarray) -> bytes:
    params = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]
    ok, buf = cv2.imencode(".png", cv2.cvtColor(arr, cv2.COLOR_RGB2BGR), params)
    assert ok
    return bytes(buf)


def pillow_default(arr: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(arr).save(out, format="PNG")
    return out.getvalue()


ENCODERS: dict[str, Callable[[np.ndarray], bytes]] = {
    "fpng": lambda arr: bytes(fpng.from_ndarray(arr)),
    "opencv-zlib-1-rle": opencv_level1,
    "pillow-default": pillow_default,
}


def pictures() -> dict[str, np.ndarray]:
    photo = np.ascontiguousarray(np.asarray(load_image(decode_base64(inputs()[0], "image"), 10**7)))
    return {
        "photo-like": photo,
        "smooth": np.ascontiguousarray(cv2.GaussianBlur(photo, (0, 0), 3)),
        "noise": np.random.default_rng(0).integers(0, 256, photo.shape, dtype=np.uint8),
    }


def timed(f: Callable[[], object], n: int) -> float:
    f()
    t = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t) * 1000 / n


def full_decode(data: bytes) -> None:
    with Image.open(io.BytesIO(data)) as img:
        img.load()


def checks(photo: np.ndarray, n: int) -> list[dict[str, object]]:
    img = Image.fromarray(photo)
    inputs_ = {"png": pillow_default(photo)}
    for name, kw in (("jpeg q90", {}), ("jpeg q90 progressive", {"progressive": True})):
        out = io.BytesIO()
        img.save(out, format="JPEG", quality=90, **kw)
        inputs_[name] = out.getvalue()
    found = []
    for name, data in inputs_.items():
        check = timed(lambda data=data: inspect_image(data, "image", 10**7), n)  # type: ignore[misc]
        decode = timed(lambda data=data: full_decode(data), n)  # type: ignore[misc]
        print(f"check {name:21s} {len(data) / 1000:7.1f} KB  check {check:6.2f} ms  full decode {decode:6.2f} ms")
        found.append({"input": name, "kb": round(len(data) / 1000, 1), "check_ms": round(check, 3),
                      "full_decode_ms": round(decode, 3)})  # fmt: skip
    return found


def main(n: int = 40, out: str | None = None) -> None:
    encodes = []
    for kind, arr in pictures().items():
        for name, encode in ENCODERS.items():
            data = encode(arr)
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), arr), name
            t = time.perf_counter()
            for _ in range(n):
                encode(arr)
            ms = (time.perf_counter() - t) * 1000 / n
            print(f"{kind:11s} {name:18s} {ms:6.2f} ms  {len(data) / 1000:7.1f} KB")
            encodes.append({"picture": kind, "encoder": name, "ms": round(ms, 3), "kb": round(len(data) / 1000, 1)})
    found = checks(pictures()["photo-like"], n)
    if out:
        doc = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "repeats": n, "png_encode_512": encodes, "input_checks": found}  # fmt: skip
        Path(out).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--out", help="also write the figures as JSON here")
    args = ap.parse_args()
    main(args.repeats, args.out)
