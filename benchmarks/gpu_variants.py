"""`gpu_throughput.py --variants`: after the table, recompile with one change and re-time the
saturated run on the same card, against the same baseline outputs."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from benchmarks.gpu_throughput import drain, job_pixels, rel_error
from shared.config import Settings
from workers.inpaint.request import InpaintRequest
from workers.models.loading import LoadedPipeline
from workers.models.serving import compile_modules, uncompile, warm_shape


def variant(
    name: str,
    loaded: LoadedPipeline,
    settings: Settings,
    reqs: list[InpaintRequest],
    refs: list[np.ndarray],
    max_rows: int,
    window: float,
) -> dict[str, Any]:
    """Recompile with one change and re-time the saturated run (the full bucket only)."""
    import torch._dynamo

    pipe = loaded.pipe
    if name == "cudnn-attention":
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        torch.backends.cuda.enable_cudnn_sdp(True)
    elif name == "fp8":  # INPAINT_PRECISION=fp8 (the last variant: the layers stay quantized)
        from workers.models.precision import apply_precision

        uncompile(pipe)
        apply_precision(pipe, "fp8")
    else:
        raise ValueError(name)
    uncompile(pipe)
    torch._dynamo.reset()
    t = time.perf_counter()
    compile_modules(pipe, settings.compile, settings.compile_vae, 2)
    warm_shape(pipe, reqs[0].image.width, reqs[0].image.height, max_rows)
    warm = time.perf_counter() - t
    loaded.plan.buckets = [max_rows]
    drain(loaded, reqs[:max_rows], max_rows, window)
    sat = drain(loaded, reqs, max_rows, window)
    outs = [job_pixels(sat["results"][i]) for i in range(2)]
    return {
        "throughput_images_per_s": sat["images_per_s"], "wall_s": sat["wall_s"], "warmup_s": warm,
        "max_rel_error": max(rel_error(o, r) for o, r in zip(outs, refs, strict=True)),
        "nan_outputs": sum(int(not np.isfinite(job_pixels(x)).all()) for x in sat["results"].values()),
    }  # fmt: skip
