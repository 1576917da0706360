"""Quality harness: does a faster path still make the images the reference path makes?

Fixed cases (image, mask, prompt, seed), two with small masks and two with large ones. Every path
draws its noise on the CPU from the same seeds (the worker's own `torch.Generator("cpu")` per row),
so every path starts from the same latents. For each candidate against the reference (fp16 eager on
a GPU; fp32 eager with `--tiny` on a CPU), per case:

- relative L2 distance of the final latents;
- PSNR over the whole image and inside the mask (what the model painted), capped at 99 dB
  (identical images would otherwise be infinitely close).

The **noise floor** is measured first: the reference path again, with all cases in one call (eager vs
eager at another batch size) and, where asked, compiled (eager vs compiled): what no one would call a
quality change. A candidate is **fp16-level** when its mean masked PSNR is within 1 dB of the floor's
mean and its worst case is within 3 dB of the floor's worst (no outlier), every pixel finite.

The models here have random weights (no weights can be downloaded where this runs): this is a
numerical check of a path against the reference, not an aesthetic judgement of the pictures.

    python benchmarks/quality.py --tiny                          # CPU, seconds
    python benchmarks/quality.py --candidates compiled,fp8       # on a GPU, full-size architecture
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from PIL import Image

from benchmarks.full_model import plain_call
from benchmarks.outpaths import result_path
from workers.inpaint.request import InpaintRequest

PSNR_CAP_DB = 99.0
WITHIN_MEAN_DB = 1.0
WORST_CASE_DB = 3.0


def cases(size: int, steps: int) -> list[InpaintRequest]:
    """Four fixed cases: noise-textured images, two small masks (1/16 of the area), two large (1/2)."""
    out = []
    for i, (frac, prompt) in enumerate([(0.25, "a red apple on a table"), (0.25, "a window with blue curtains"),
                                        (0.7, "a mountain lake at dawn"), (0.7, "an old brick wall with ivy")]):  # fmt: skip
        rng = np.random.default_rng(7000 + i)
        img = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")
        side = max(8, int(size * frac) // 8 * 8)
        x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, 2))
        m = np.zeros((size, size), np.uint8)
        m[y0 : y0 + side, x0 : x0 + side] = 255
        out.append(InpaintRequest(image=img, mask=Image.fromarray(m, "L"), prompt=prompt, seed=100 + i,
                                  num_inference_steps=steps, guidance_scale=7.5))  # fmt: skip
    return out


def run(pipe: Any, batch: list[InpaintRequest]) -> tuple[np.ndarray, np.ndarray]:
    """(images in [0, 1], final latents) of one plain call over `batch`, noise drawn on the CPU."""
    final: dict[str, torch.Tensor] = {}

    def keep(p: Any, step: int, t: Any, kw: dict[str, Any]) -> dict[str, Any]:
        final["latents"] = kw["latents"]  # the last step's stays
        return kw

    with torch.inference_mode():
        images = plain_call(pipe, batch, keep)
    return images.astype(np.float64), final["latents"].float().cpu().numpy().astype(np.float64)


def each_alone(pipe: Any, all_cases: list[InpaintRequest]) -> tuple[np.ndarray, np.ndarray]:
    pairs = [run(pipe, [c]) for c in all_cases]
    return np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return PSNR_CAP_DB if mse == 0 else min(PSNR_CAP_DB, 10 * math.log10(1.0 / mse))


def compare(ref: tuple[np.ndarray, np.ndarray], got: tuple[np.ndarray, np.ndarray], all_cases: list[InpaintRequest]
            ) -> dict[str, Any]:  # fmt: skip
    per_case = []
    for i, c in enumerate(all_cases):
        inside = np.asarray(c.mask, dtype=np.uint8) > 127
        a, b = ref[0][i], got[0][i]
        lat = float(np.linalg.norm(got[1][i] - ref[1][i]) / max(np.linalg.norm(ref[1][i]), 1e-12))
        per_case.append({"latent_rel_l2": lat, "psnr_db": psnr(a, b), "masked_psnr_db": psnr(a[inside], b[inside]),
                         "finite": bool(np.isfinite(b).all())})  # fmt: skip
    masked = [c["masked_psnr_db"] for c in per_case]
    return {
        "cases": per_case,
        "mean_masked_psnr_db": float(np.mean(masked)),
        "min_masked_psnr_db": float(np.min(masked)),
        "mean_psnr_db": float(np.mean([c["psnr_db"] for c in per_case])),
        "max_latent_rel_l2": float(max(c["latent_rel_l2"] for c in per_case)),
    }


def verdict(result: dict[str, Any], floor_db: float, floor_min_db: float) -> dict[str, Any]:
    ok_mean = result["mean_masked_psnr_db"] >= floor_db - WITHIN_MEAN_DB
    ok_worst = result["min_masked_psnr_db"] >= floor_min_db - WORST_CASE_DB
    finite = all(c["finite"] for c in result["cases"])
    return {"fp16_level": bool(ok_mean and ok_worst and finite), "within_mean": ok_mean, "no_outlier": ok_worst,
            "finite": finite}  # fmt: skip


# Each candidate: a function (reference pipeline, cases) -> (images, latents), run alone per case as
# the worker runs a job on an empty queue, unless it says otherwise.
Candidate = Callable[[Any, list[InpaintRequest]], tuple[np.ndarray, np.ndarray]]


def _batched(pipe: Any, cs: list[InpaintRequest]) -> tuple[np.ndarray, np.ndarray]:
    return run(pipe, cs)


def _compiled(pipe: Any, cs: list[InpaintRequest]) -> tuple[np.ndarray, np.ndarray]:
    from workers.models.serving import compile_modules, uncompile, warm_shape

    compile_modules(pipe, "default", True, 1)
    try:
        warm_shape(pipe, cs[0].image.width, cs[0].image.height, 1)  # the shape each case runs at
        return each_alone(pipe, cs)
    finally:
        uncompile(pipe)


def _bf16(pipe: Any, cs: list[InpaintRequest]) -> tuple[np.ndarray, np.ndarray]:
    return each_alone(copy.deepcopy(pipe).to(dtype=torch.bfloat16), cs)


def _fp8(pipe: Any, cs: list[InpaintRequest]) -> tuple[np.ndarray, np.ndarray]:
    from workers.models.precision import apply_precision

    other = copy.deepcopy(pipe)
    apply_precision(other, "fp8")
    return each_alone(other, cs)


def _control_fewer_steps(pipe: Any, cs: list[InpaintRequest]) -> tuple[np.ndarray, np.ndarray]:
    """A path that is not the reference (one denoising step fewer): the harness must reject it."""
    return each_alone(pipe, [replace(c, num_inference_steps=max(1, c.num_inference_steps - 1)) for c in cs])


CANDIDATES: dict[str, Candidate] = {"batched": _batched, "compiled": _compiled, "bf16": _bf16, "fp8": _fp8,
                                    "control-fewer-steps": _control_fewer_steps}  # fmt: skip


def evaluate(pipe: Any, size: int, steps: int, candidates: list[str], floor: list[str]) -> dict[str, Any]:
    """The harness on `pipe` (the reference path): the floor first, then each candidate, with verdicts."""
    all_cases = cases(size, steps)
    ref = each_alone(pipe, all_cases)
    results: dict[str, Any] = {}
    for name in floor:
        results[name] = compare(ref, CANDIDATES[name](pipe, all_cases), all_cases)
    floor_db = min(results[n]["mean_masked_psnr_db"] for n in floor) if floor else PSNR_CAP_DB
    floor_min_db = min(results[n]["min_masked_psnr_db"] for n in floor) if floor else PSNR_CAP_DB
    for name in candidates:
        if name in results:
            continue
        try:
            results[name] = compare(ref, CANDIDATES[name](pipe, all_cases), all_cases)
        except Exception as exc:
            results[name] = {"unavailable": f"{type(exc).__name__}: {exc}"}
    for r in results.values():
        if "cases" in r:
            r["verdict"] = verdict(r, floor_db, floor_min_db)
    return {
        "reference": f"eager, {next(iter(pipe.unet.parameters())).dtype}, each case alone",
        "size": size, "steps": steps, "cases": len(all_cases), "floor": floor, "floor_mean_masked_psnr_db": floor_db,
        "floor_min_masked_psnr_db": floor_min_db,
        "rule": f"mean masked PSNR within {WITHIN_MEAN_DB} dB of the floor's mean, the worst case within "
                f"{WORST_CASE_DB} dB of the floor's worst, every pixel finite (PSNR capped at {PSNR_CAP_DB} dB)",
        "weights": "random (a numerical check, not an aesthetic one)",
        "candidates": results,
    }  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny-random pipeline on the CPU, fp32 reference")
    ap.add_argument("--candidates", default="bf16,control-fewer-steps", help=f"of {', '.join(CANDIDATES)}")
    ap.add_argument("--floor", default="batched", help="floor paths: batched, compiled (GPU: batched,compiled)")
    ap.add_argument("--steps", type=int, default=None, help="default 50; tiny 10")
    ap.add_argument("--out", default=None, help="result JSON (under $OUT when set; never overwritten)")
    args = ap.parse_args()
    if args.tiny:
        from workers.models.tiny import build_tiny_random

        pipe, size, steps = build_tiny_random(), 64, args.steps or 10
        pipe.set_progress_bar_config(disable=True)
    else:
        from benchmarks.full_model import build_full

        pipe, size, steps = build_full("cuda", torch.float16), 512, args.steps or 50
    floor = [f for f in args.floor.split(",") if f]
    report = evaluate(pipe, size, steps, [c for c in args.candidates.split(",") if c], floor)
    text = json.dumps(report, indent=2)
    if args.out or os.environ.get("OUT"):
        out = result_path(args.out, "quality")
        out.write_text(text + "\n")
        print(f"wrote {out}")
    for name, r in report["candidates"].items():
        if "verdict" in r:
            print(f"{name:22s} mean masked PSNR {r['mean_masked_psnr_db']:6.2f} dB  min {r['min_masked_psnr_db']:6.2f} dB"
                  f"  latents rel L2 {r['max_latent_rel_l2']:.2e}  fp16-level {r['verdict']['fp16_level']}")  # fmt: skip
        else:
            print(f"{name:22s} {r['unavailable']}")
    print(f"floor {report['floor_mean_masked_psnr_db']:.2f} dB ({', '.join(floor)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
