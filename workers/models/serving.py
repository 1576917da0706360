"""How a loaded pipeline is served: the batch budget, the CUDA fast path, compiled shapes.

Everything here is optional per setting; with it all off the plain diffusers pipeline runs, which is
what a small card or a CPU gets. On CUDA, `torch.compile` specialises each (size, rows) shape; every
bucket of rows (1, 2, 4, …, max) of every `INPAINT_COMPILE_SIZES` size is warmed before the worker
reports ready, and a shape router sends any other shape to the eager module, so no request recompiles.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from shared.config import Settings
from workers.models import compile_cache
from workers.models.families import ROW_COST, denoiser, family_of, text_args
from workers.models.precision import apply_precision, check_precision

log = logging.getLogger(__name__)

REFERENCE_PIXELS = 512 * 512  # the batch budget is counted in rows of this many pixels
AUTO_MAX_ROWS_CUDA = 32  # past this a batch only adds latency: the GPU is already saturated
AUTO_MAX_ROWS_CPU = 4


@dataclass
class ServingPlan:
    """What `prepare` decided for a pipeline."""

    max_rows: int = 1  # rows per pipeline call at 512×512 (scaled down for larger images)
    buckets: list[int] = field(default_factory=list)  # compiled row counts; empty: eager
    compiled_sizes: list[tuple[int, int]] = field(default_factory=list)  # (width, height) warmed
    compile: str = "off"  # the compile mode in effect
    warmup_s: float = 0.0
    row_bytes: int = 0  # measured GPU memory per extra row at 512×512
    precision: str = "fp32"  # fp16 or fp8 on CUDA (INPAINT_PRECISION), fp32 on a CPU
    compile_cache: str = "off"  # loaded (a warm start), saved (compiled, then kept), cold, or off
    cfg: bool = True  # guidance doubles the denoiser's rows (SD2, SDXL); FLUX embeds it instead

    def padded_rows(self, rows: int, width: int, height: int, guidance: float) -> int:
        """Rows to run so a compiled graph sees a warmed-up shape: the next bucket where the compiled
        modules would see this call (CFG doubles the rows; without it, or at another size, the
        pipeline runs eagerly and padding buys nothing)."""
        if not self.buckets or (self.cfg and guidance <= 1) or (width, height) not in self.compiled_sizes:
            return rows
        return next((b for b in self.buckets if b >= rows), rows)


def rows_for_size(max_rows: int, width: int, height: int) -> int:
    """Rows per call at `width`×`height`: activations grow with pixels, so larger images batch fewer."""
    return max(1, min(max_rows, (max_rows * REFERENCE_PIXELS) // max(1, width * height)))


def buckets_up_to(max_rows: int) -> list[int]:
    """Powers of two below `max_rows`, then `max_rows` itself: the batch sizes a compiled pipeline sees."""
    out, b = [], 1
    while b < max_rows:
        out.append(b)
        b *= 2
    return [*out, max_rows]


def prepare(
    pipe: Any, kind: str, device: str, settings: Settings, warm_buckets: list[int] | None = None
) -> ServingPlan:
    """Choose the batch budget, switch on the CUDA fast path and compile/warm every bucket.

    A compile that fails to warm up falls back to the eager pipeline, loudly."""
    if kind == "sim":  # batches as a GPU would: one call's time whatever its rows
        return ServingPlan(max_rows=settings.batch_max_size or AUTO_MAX_ROWS_CUDA)
    if kind != "diffusers":
        return ServingPlan(max_rows=1)
    check_precision(settings.precision, device)  # fp8 where it cannot run: the worker refuses to start
    if device != "cuda":
        return ServingPlan(max_rows=settings.batch_max_size or AUTO_MAX_ROWS_CPU)
    import torch

    # Before compiling (the graphs see the fp8 layers), outside the compile fallback: a transform that
    # fails is a PrecisionUnavailable, and the worker refuses to start rather than serve another precision.
    plan_precision = apply_precision(pipe, settings.precision)
    if settings.cuda_fast:
        torch.backends.cudnn.benchmark = True
        if getattr(pipe, "unet", None) is not None:  # a transformer has no convolutions to lay out
            pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        # FluxFillPipeline has no pipeline-level fuse; its transformer fuses its own projections
        fuse = getattr(pipe, "fuse_qkv_projections", None) or denoiser(pipe).fuse_qkv_projections
        fuse()
    plan = ServingPlan(precision=plan_precision, cfg=family_of(pipe) != "flux")
    if settings.batch_max_size:
        plan.max_rows = settings.batch_max_size
    else:
        plan.max_rows, plan.row_bytes = rows_from_memory(pipe)
    if settings.compile == "off":
        return plan
    started = time.perf_counter()
    buckets = warm_buckets or buckets_up_to(plan.max_rows)
    sizes = settings.compiled_sizes()
    cache = compile_cache.cache_file(settings.compile_cache_dir, pipe, settings.compile, sizes, buckets, plan_precision)
    plan.compile_cache = "loaded" if compile_cache.load(cache) else ("cold" if cache else "off")
    try:
        compile_modules(pipe, settings.compile, settings.compile_vae, len(sizes) * len(buckets))
        for w, h in sizes:
            for b in buckets:
                if b <= rows_for_size(plan.max_rows, w, h):
                    warm_shape(pipe, w, h, b)
        if plan.compile_cache == "cold" and compile_cache.save(cache):
            plan.compile_cache = "saved"
    except Exception:
        log.exception("compiling the pipeline (%s) failed; serving it eagerly", settings.compile)
        uncompile(pipe)
        plan.compile = f"off (compile {settings.compile} failed)"
        return plan
    plan.compile, plan.buckets, plan.compiled_sizes = settings.compile, buckets, sizes
    plan.warmup_s = round(time.perf_counter() - started, 2)
    log.info(
        "compiled %s for %s, buckets %s, in %.1fs (compile cache: %s)",
        settings.compile,
        sizes,
        buckets,
        plan.warmup_s,
        plan.compile_cache,
    )
    return plan


def rows_from_memory(pipe: Any) -> tuple[int, int]:
    """(rows at 512×512 that fit in 60% of the card's free memory, bytes per row), measured: the
    peak of 2 rows − the peak of 1. The cap past which rows only add latency is SD2's divided by
    the family's row cost (SDXL, FLUX: 4× SD2's work per row, so a quarter of the rows saturate)."""
    import torch

    torch.cuda.empty_cache()  # memory the caching allocator holds counts as used in mem_get_info
    peaks = []
    for rows in (1, 2):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run_shape(pipe, 512, 512, rows, steps=2)
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
    row_bytes = max(peaks[1] - peaks[0], 1)
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    fit = int((0.6 * free - peaks[0]) // row_bytes)
    cap = max(1, AUTO_MAX_ROWS_CUDA // ROW_COST.get(family_of(pipe), 1))
    return max(1, min(cap, fit)), row_bytes


def probe_pair(width: int, height: int) -> tuple[Image.Image, Image.Image]:
    """A grey image and a mask over its centre: what warm-ups and memory probes run."""
    image = Image.new("RGB", (width, height), (127, 127, 127))
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    return image, mask


def run_shape(pipe: Any, width: int, height: int, rows: int, steps: int) -> None:
    """One call of the plain pipeline at this shape (probe images, fixed seeds)."""
    import torch

    image, mask = probe_pair(width, height)
    with torch.inference_mode():
        pipe(
            **text_args(family_of(pipe), pipe, ["warm-up"] * rows, [""] * rows),
            image=[image] * rows,
            mask_image=[mask] * rows,
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=7.5,
            generator=[torch.Generator("cpu").manual_seed(i) for i in range(rows)],
            output_type="np",
        )


def warm_shape(pipe: Any, width: int, height: int, rows: int) -> None:
    """Compile, record and replay this shape (three calls: CUDA graphs record on the second)."""
    routers = [m.forward for m in (denoiser(pipe), pipe.vae.decoder) if isinstance(m.forward, ShapeRouter)]
    for r in routers:
        r.learning = True
    try:
        for _ in range(3):
            run_shape(pipe, width, height, rows, steps=2)
    finally:
        for r in routers:
            r.learning = False


class ShapeRouter:
    """A module's forward that sends warmed-up input shapes to the compiled graph, others eagerly.

    With `dynamic=False` every new shape would recompile (tens of seconds on a user's job); the
    router makes "no recompile after warm-up" a guarantee instead of a hope.
    """

    def __init__(self, eager: Any, compiled: Any):
        self.eager, self.compiled = eager, compiled
        self.shapes: set[tuple[int, ...]] = set()
        self.learning = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # The UNet gets its latents first, FLUX's transformer as `hidden_states=`.
        sample = args[0] if args else kwargs["hidden_states" if "hidden_states" in kwargs else "sample"]
        shape = tuple(sample.shape)
        if self.learning:
            self.shapes.add(shape)
        if shape in self.shapes:
            return self.compiled(*args, **kwargs)
        return self.eager(*args, **kwargs)


def compile_modules(pipe: Any, mode: str, with_vae: bool, shapes: int) -> None:
    """`torch.compile` the denoiser (UNet or transformer; and the VAE decoder), each behind a `ShapeRouter`."""
    import torch
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    # Every warmed shape keeps its own specialised graph; raise the cache so none is evicted.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), 2 * shapes + 8))
    inductor_config.conv_1x1_as_mm = True  # SD's many 1×1 convolutions as matrix products
    modules = [denoiser(pipe)] + ([pipe.vae.decoder] if with_vae else [])
    for m in modules:
        eager = m.forward
        compiled = torch.compile(eager, mode=mode, fullgraph=True, dynamic=False)
        m.forward = ShapeRouter(eager, compiled)


def uncompile(pipe: Any) -> None:
    for m in (denoiser(pipe), pipe.vae.decoder):
        if isinstance(m.forward, ShapeRouter):
            m.forward = m.forward.eager
