"""GPU throughput of the worker's batching path against plain diffusers, in one run on one card.

Builds the full-size architecture of `--model` (default stable-diffusion-2-inpainting; also SDXL
inpainting, FLUX.1 Fill) with random weights (the real configs, `benchmarks/full_model.py`; no
weights can be downloaded) and times, in this order:

1. baseline: plain diffusers, eager, SDPA, fp16 (FLUX bf16), at the model's size (512², SDXL and
   FLUX 1024²), 50 steps, batch 1 (and a larger batch);
2. ours, one job on an empty queue: `gather` (which waits its window) + `run_batch` + per-job finish;
3. ours, saturated: `--jobs` queued jobs drained through `gather` + `run_batch` (the worker's code,
   without Redis or S3), images/s;
4. max relative error of ours (alone and batched) against the baseline on the same weights, seeds
   and inputs, and a NaN check of every output;
5. peak GPU memory and the compile/warm-up time.

`--tiny` runs the same code on the model's tiny fixture (tiny-random, tiny-random-sdxl,
tiny-random-flux) on a CPU in seconds and checks that batching raises throughput (batch 8 vs one at
a time).

    python benchmarks/gpu_throughput.py                 # on a GPU: writes benchmarks/results/gpu-<date>.json
    python benchmarks/gpu_throughput.py --model flux-fill --steps 28
    python benchmarks/gpu_throughput.py --tiny --out /tmp/tiny.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from PIL import Image

from benchmarks.full_model import bench_dtype, build_full, build_tiny, plain_call, tiny_of
from benchmarks.outpaths import result_path
from benchmarks.padding import mix, warm_buckets_for
from benchmarks.profiling import profile_batch
from shared import catalog
from shared.config import Settings
from workers.gpu.batcher import Item, MemoryQueue, gather
from workers.inpaint.request import InpaintRequest, InpaintResult
from workers.inpaint.run import run_batch
from workers.models.families import ROW_COST, denoiser
from workers.models.loading import LoadedPipeline, prepare_for_serving
from workers.models.serving import rows_from_memory


def make_request(i: int, size: int, steps: int, seed: int, guidance: float = 7.5) -> InpaintRequest:
    """Job i: its own noise image, mask rectangle, prompt and seed (never zeros: they hide bugs)."""
    rng = np.random.default_rng(1000 + i)
    img = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")
    m = np.zeros((size, size), np.uint8)
    x0, y0 = rng.integers(0, size // 2, 2)
    m[y0 : y0 + size // 2, x0 : x0 + size // 2] = 255
    return InpaintRequest(
        image=img, mask=Image.fromarray(m, "L"), prompt=f"job {i}: a red chair in a sunlit room",
        num_inference_steps=steps, guidance_scale=guidance, seed=seed, preserve_unmasked=False,
    )  # fmt: skip


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def to_u8(arr: np.ndarray) -> np.ndarray:
    return (np.clip(arr, 0, 1) * 255).round().astype(np.float64)


def rel_error(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-12))


def timed(fn: Any, reps: int) -> tuple[list[float], Any]:
    times, out = [], None
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t)
    return times, out


def drain(pipeline: LoadedPipeline, reqs: list[InpaintRequest], max_rows: int, window_s: float) -> dict[str, Any]:
    """The worker's loop without Redis: take the oldest job, gather its batch, run, finish each job."""
    q: MemoryQueue[int] = MemoryQueue()
    for i, r in enumerate(reqs):
        q.put(Item(r, i))
    results: dict[int, InpaintResult | BaseException] = {}
    sizes = []
    sync()
    t = time.perf_counter()
    while (first := q.pop()) is not None:
        batch = gather(first, q.take, max_rows, window_s)
        sizes.append(sum(it.rows for it in batch))
        for it, res in zip(batch, run_batch(pipeline, [it.request for it in batch]), strict=True):
            results[it.ref] = res
    sync()
    wall = time.perf_counter() - t
    return {"wall_s": wall, "images_per_s": len(reqs) / wall, "batch_sizes": sizes, "results": results}


def job_pixels(res: InpaintResult | BaseException) -> np.ndarray:
    if isinstance(res, BaseException):
        raise res
    return np.asarray(res.images[0], dtype=np.float64)


def main(argv: list[str] | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    models = [m.name for m in catalog.MODELS.values() if m.pipeline and not m.toy]
    ap.add_argument("--model", default=catalog.SD2, choices=models, help="the architecture (default %(default)s)")
    ap.add_argument("--tiny", action="store_true", help="the model's tiny fixture on the CPU (CI)")
    ap.add_argument(
        "--jobs", type=int, default=None, help="queued jobs for the saturated run (default 96 ÷ row cost; tiny 32)"
    )
    ap.add_argument("--batch", type=int, default=0, help="rows per call (default: from free memory; tiny 8)")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default 50; tiny 10)")
    ap.add_argument("--size", type=int, default=None, help="image side (default the model's: 512, 1024; tiny 64)")
    ap.add_argument("--guidance", type=float, default=None, help="guidance scale (default the model's: 7.5, FLUX 30)")
    ap.add_argument("--compile", default="reduce-overhead", choices=["off", "default", "reduce-overhead"])
    ap.add_argument(
        "--baseline-batch",
        type=int,
        default=None,
        help="also time plain diffusers at this batch (0: skip; 16 ÷ row cost)",
    )
    ap.add_argument("--window-ms", type=float, default=20.0)
    ap.add_argument("--variants", default="", help="after the table, re-time saturated with: cudnn-attention, fp8")
    ap.add_argument(
        "--out",
        default=None,
        help="result JSON (default benchmarks/results/gpu-<date>-<time>.json; under $OUT when set; never overwritten)",
    )
    ap.add_argument("--precision", default="fp16", choices=["fp16", "fp8"], help="INPAINT_PRECISION for ours")
    ap.add_argument(
        "--compile-cache", default="", help="INPAINT_COMPILE_CACHE_DIR: run twice, the second is a warm start"
    )
    ap.add_argument(
        "--buckets", default="", help='warmed buckets: "" {1, batch}, "worker" (1, 2, 4, … batch) or a list'
    )
    ap.add_argument("--mix", default="", help="after saturated, drain these job counts with the service's defaults")
    ap.add_argument("--profile", action="store_true", help="profile one full micro-batch (benchmarks/profiling.py)")
    ap.add_argument(
        "--quality",
        default="",
        help="quality harness candidates first (benchmarks/quality.py), "
        "e.g. compiled,fp8; the floor is batched (+ compiled on a GPU)",
    )
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    tiny = a.tiny
    model = catalog.MODELS[tiny_of(a.model) if tiny else a.model]  # what runs: the model or its fixture
    if a.quality and model.family == "flux":
        ap.error("--quality reads a UNet (benchmarks/quality.py): not for FLUX's transformer")
    cuda = torch.cuda.is_available() and not tiny
    cost = ROW_COST[model.family]  # SDXL, FLUX: a row is ~4× SD2's work, so fewer jobs time as long
    jobs = a.jobs or (32 if tiny else 96 // cost)
    steps = a.steps or (10 if tiny else 50)
    size = a.size or model.size
    guidance = a.guidance or model.limits.default_guidance
    baseline_batch = 16 // cost if a.baseline_batch is None else a.baseline_batch
    device = "cuda" if cuda else "cpu"
    dtype = bench_dtype(a.model, device)
    dtype_name = str(dtype).removeprefix("torch.")
    res: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "model": a.model,
        "pipeline": model.name if tiny else f"{a.model} architecture, random weights, {dtype_name}",
        "size": size,
        "steps": steps,
        "guidance_scale": guidance,
        "jobs": jobs,
        **(extra or {}),
    }
    stem = "gpu-tiny" if tiny else "gpu"
    out = result_path(a.out, stem if a.model == catalog.SD2 else f"{stem}-{a.model}")

    def dump(label: str) -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1, default=str))
        print(f"[{time.strftime('%H:%M:%S')}] {label}", flush=True)

    t0 = time.perf_counter()
    pipe = build_tiny(model.name).to(device) if tiny else build_full(device, dtype, a.model)
    pipe.set_progress_bar_config(disable=True)
    res["build_s"] = round(time.perf_counter() - t0, 2)
    reqs = [make_request(i, size, steps, seed=i, guidance=guidance) for i in range(jobs)]
    if a.quality:  # on the eager reference pipeline, before anything is compiled or quantized
        from benchmarks.quality import evaluate

        floor = ["batched", "compiled"] if cuda else ["batched"]
        res["quality"] = evaluate(pipe, size, steps, a.quality.split(","), floor)
        dump("quality: " + ", ".join(f"{k} {v.get('verdict', v)}" for k, v in res["quality"]["candidates"].items()))

    # 1. the plain baseline, batch 1 (reference outputs for jobs 0 and 1 kept)
    plain_call(pipe, reqs[:1])  # warm-up
    times, _ = timed(lambda: plain_call(pipe, reqs[:1]), 3 if cuda else 2)
    refs = [to_u8(plain_call(pipe, [r]))[0] for r in reqs[:2]]
    res["baseline_batch1_latency_s"] = statistics.median(times)
    res["baseline_images_per_s"] = 1 / res["baseline_batch1_latency_s"]
    res["baseline_batch1_times_s"] = times
    if baseline_batch > 1 and cuda:
        bb = baseline_batch
        plain_call(pipe, reqs[:bb])
        bt, _ = timed(lambda: plain_call(pipe, reqs[:bb]), 2)
        res["baseline_best_batch"] = {"batch": bb, "times_s": bt, "images_per_s": bb / statistics.median(bt)}
    dump(f"baseline: {res['baseline_batch1_latency_s']:.3f} s per image at batch 1")

    # 2-5. ours: prepare exactly as a worker does (batch budget, fast path, compile + warm-up)
    loaded = LoadedPipeline(
        "bench", "random", "diffusers", device, pipe, str(denoiser(pipe).dtype), family=model.family
    )
    settings = Settings(
        batch_max_size=a.batch or (8 if tiny else 0), batch_window_ms=a.window_ms, compile=a.compile,
        compile_sizes=f"{size}x{size}", precision=a.precision, compile_cache_dir=a.compile_cache,
        _env_file=None,
    )  # type: ignore[call-arg]  # fmt: skip
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    row_bytes = 0
    if cuda:
        # The worker warms every bucket up to its batch; timing 1 and the full batch is what this run
        # needs, and saves the device minutes the others would take.
        rows = settings.batch_max_size
        if not rows:
            rows, row_bytes = rows_from_memory(pipe)
        settings = settings.model_copy(update={"batch_max_size": rows})
        prepare_for_serving(loaded, settings, warm_buckets=warm_buckets_for(a.buckets, rows))
    else:
        prepare_for_serving(loaded, settings)
    res["warmup_s"] = round(time.perf_counter() - t, 2)
    plan = loaded.plan
    max_rows = plan.max_rows
    res["ours"] = {
        "max_rows": max_rows, "buckets": plan.buckets, "compiled_sizes": plan.compiled_sizes, "compile": plan.compile,
        "warmup_s": plan.warmup_s, "row_bytes_gb": round((row_bytes or plan.row_bytes) / 1e9, 3),
        "cuda_fast": settings.cuda_fast, "window_ms": a.window_ms, "precision": plan.precision,
        "compile_cache": plan.compile_cache,
    }  # fmt: skip
    dump(f"prepared: max_rows={max_rows} compile={plan.compile} in {res['warmup_s']}s")

    window = a.window_ms / 1000
    lat = [drain(loaded, [reqs[0]], max_rows, window) for _ in range(4 if cuda else 3)]
    res["single_job_latency_s"] = statistics.median(x["wall_s"] for x in lat[1:])
    res["single_job_times_s"] = [x["wall_s"] for x in lat]
    single = job_pixels(lat[-1]["results"][0])
    dump(f"single job: {res['single_job_latency_s']:.3f} s")

    if tiny:  # the same queue one at a time: what batching is measured against
        serial = drain(loaded, reqs, 1, 0.0)
        res["serial_images_per_s"] = serial["images_per_s"]
    drain(loaded, reqs[:max_rows], max_rows, window)  # one full batch first: nothing left to warm
    sat = drain(loaded, reqs, max_rows, window)
    res["throughput_images_per_s"] = sat["images_per_s"]
    res["saturated"] = {"wall_s": sat["wall_s"], "batch_sizes": sat["batch_sizes"]}
    # Since prepare began: warm-up, CUDA-graph pools and the saturated run.
    res["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2) if cuda else None
    res["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 1e9, 2) if cuda else None
    outs = [job_pixels(sat["results"][i]) for i in range(jobs)]
    res["nan_outputs"] = sum(int(not np.isfinite(o).all()) for o in outs)
    res["distinct_outputs"] = len({o.tobytes() for o in outs})
    errs = {
        "single_vs_baseline": rel_error(single, refs[0]),
        "batched_job0_vs_baseline": rel_error(outs[0], refs[0]),
        "batched_job1_vs_baseline": rel_error(outs[1], refs[1]),
    }
    res["rel_errors"] = errs
    res["max_rel_error"] = max(errs.values())
    res["speedup_saturated_vs_baseline"] = res["throughput_images_per_s"] / res["baseline_images_per_s"]
    res["speedup_single_vs_baseline"] = res["baseline_batch1_latency_s"] / res["single_job_latency_s"]
    if tiny:
        res["batching_gain"] = res["throughput_images_per_s"] / res["serial_images_per_s"]
    if a.mix:
        res["mix"] = mix(loaded, size, steps, [int(n) for n in a.mix.split(",")], window)
        dump(f"mix: {res['mix']}")
    if a.profile:
        res["profile"] = profile_batch(loaded, reqs[:max_rows])
        dump(f"profile: {res['profile']['by_kind_ms']}")
    dump("done")
    if cuda and a.variants:
        from benchmarks.gpu_variants import variant

        res["variants"] = {}
        for name in a.variants.split(","):
            try:
                res["variants"][name] = variant(name, loaded, settings, reqs, refs, max_rows, window)
            except Exception as exc:  # a variant that breaks must not cost the table above
                logging.exception("variant %s failed", name)
                res["variants"][name] = {"error": repr(exc)[:500]}
            dump(f"variant {name}: {res['variants'][name]}")
    rows = [
        ("device", res["device"]),
        ("baseline batch 1 (s/image)", f"{res['baseline_batch1_latency_s']:.3f}"),
        ("baseline images/s", f"{res['baseline_images_per_s']:.2f}"),
    ]
    if "baseline_best_batch" in res:
        b = res["baseline_best_batch"]
        rows.append((f"baseline batch {b['batch']} images/s", f"{b['images_per_s']:.2f}"))
    rows += [
        ("ours single job (s)", f"{res['single_job_latency_s']:.3f}"),
        (f"ours saturated images/s ({jobs} jobs, batch {max_rows})", f"{res['throughput_images_per_s']:.2f}"),
        ("max rel error vs baseline", f"{res['max_rel_error']:.2e}"),
        ("NaN outputs", str(res["nan_outputs"])),
        ("peak memory (GB)", str(res["peak_memory_gb"])),
        ("compile + warm-up (s)", str(res["warmup_s"])),
    ]
    if tiny:
        rows.append(("batching gain (batch 8 vs serial)", f"{res['batching_gain']:.2f}x"))
    for k, v in rows:
        print(f"{k:<48} {v}")
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main()
