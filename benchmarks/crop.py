"""Inpaint only the masked area (`crop_to_mask`) against the whole image: a 2048×2048 input with a
200×200 mask, on the tiny-random pipeline and on the classical inpainter, on this machine's CPU.

Usage: python benchmarks/crop.py [--steps 2] [--repeat 3] [--out FILE]. Prints one line per case and
writes the figures as JSON (default benchmarks/results/crop-<date>.json)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.config import Settings  # noqa: E402
from workers.inpaint.request import InpaintRequest  # noqa: E402
from workers.inpaint.run import run_inpaint  # noqa: E402
from workers.models.loading import load_pipeline  # noqa: E402


def pair(size: int = 2048, hole: int = 200) -> tuple[Image.Image, Image.Image]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    arr = np.stack([xx * 255 // size, yy * 255 // size, (xx + yy) * 127 // size], -1).astype(np.int16)
    arr += rng.integers(-6, 7, arr.shape, dtype=np.int16)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    mask = Image.new("L", (size, size), 0)
    x0 = size // 3
    ImageDraw.Draw(mask).ellipse((x0, x0, x0 + hole, x0 + hole), fill=255)
    return img, mask


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--crop-size", type=int, default=512)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / f"crop-{datetime.now():%Y-%m-%d}.json"))
    args = ap.parse_args()
    img, mask = pair()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in ("tiny-random", "classical"):
            pipeline = load_pipeline(Settings(model=model, device="cpu", data_dir=Path(tmp), _env_file=None))  # type: ignore[call-arg]
            for cropped in (False, True):
                req = InpaintRequest(
                    image=img, mask=mask, prompt="a bowl of fruit", num_inference_steps=args.steps,
                    crop_size=args.crop_size if cropped else 0, crop_padding=32,
                )  # fmt: skip
                times = []
                for _ in range(args.repeat):
                    t = time.perf_counter()
                    run_inpaint(pipeline, req)
                    times.append(time.perf_counter() - t)
                row = {"model": model, "crop_to_mask": cropped, "seconds_median": round(statistics.median(times), 3),
                       "seconds": [round(x, 3) for x in times]}  # fmt: skip
                print(json.dumps(row), flush=True)
                results.append(row)
    doc = {"machine": f"{platform.node()} ({os.cpu_count()} CPUs)", "date": datetime.now().isoformat(timespec="seconds"),
           "input": "2048x2048 RGB, 200x200 elliptical mask", "steps": args.steps, "crop_size": args.crop_size,
           "results": results}  # fmt: skip
    Path(args.out).write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
