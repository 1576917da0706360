"""Time and size of encoding one 512×512 output as PNG: fpng (what the worker uses) against OpenCV/zlib
at level 1 with the RLE strategy (what it used before) and Pillow's default, on three kinds of picture:
a photo-like one (gradients with sensor noise), a smooth one (the photo blurred, like most diffusion
outputs) and pure noise (what the tiny-random test model paints inside the mask). Every encoding is
decoded back and checked to be lossless.

    python benchmarks/codecs.py
"""

from __future__ import annotations

import io
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
from shared.imaging import decode_base64, load_image


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


def main(n: int = 40) -> None:
    for kind, arr in pictures().items():
        for name, encode in ENCODERS.items():
            data = encode(arr)
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), arr), name
            t = time.perf_counter()
            for _ in range(n):
                encode(arr)
            ms = (time.perf_counter() - t) * 1000 / n
            print(f"{kind:11s} {name:18s} {ms:6.2f} ms  {len(data) / 1000:7.1f} KB")


if __name__ == "__main__":
    main()
