"""The phases of `benchmarks/gpu_run.py`, one per process: `python benchmarks/gpu_phases.py PHASE --out FILE`.

Each writes one JSON file with `phase`, `status` (ok, or `skipped: no CUDA` with the `reason`) and
its figures; a phase that needs CUDA still writes every field (None) with `--tiny` on a CPU, so the
rehearsal checks the same shape the GPU run produces.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks import gpu_throughput
from benchmarks.full_model import build_full, plain_call
from benchmarks.gpu_throughput import drain, make_request, timed

UNET_TFLOP_PER_IMAGE_STEP = 1.61  # one UNet call at CFG batch 2 (docs/gpu.md): one image, one step
WARMUPS, REPS = 2, 5


def shape(tiny: bool) -> dict[str, Any]:
    """The run's sizes: the full architecture at 512² and 50 steps, or tiny-random on a CPU."""
    if tiny:
        return {"size": 64, "steps": 4, "batches": [1, 2, 4], "batch": 4, "jobs": 16, "mix": "5,9"}  # 4+1, 4+4+1
    return {"size": 512, "steps": 50, "batches": [1, 16, 32], "batch": 32, "jobs": 64, "mix": "17,40"}


def build(tiny: bool) -> Any:
    if tiny:
        from workers.models.tiny import build_tiny_random

        pipe = build_tiny_random()
        pipe.set_progress_bar_config(disable=True)
        return pipe
    return build_full("cuda", torch.float16)


def needs_cuda(tiny: bool) -> str | None:
    """Why a CUDA-only phase cannot run here, or None."""
    if tiny:
        return "--tiny rehearses on the CPU"
    return None if torch.cuda.is_available() else "torch sees no CUDA device"


def plain(tiny: bool, out: Path) -> dict[str, Any]:
    """Plain diffusers, eager fp16, at each batch size: WARMUPS calls, then the median of REPS."""
    sh, pipe = shape(tiny), build(tiny)
    rows = []
    for b in sh["batches"]:
        reqs = [make_request(i, sh["size"], sh["steps"], seed=i) for i in range(b)]
        for _ in range(WARMUPS):
            plain_call(pipe, reqs)
        times, images = timed(lambda reqs=reqs: plain_call(pipe, reqs), REPS)
        med = statistics.median(times)
        rows.append({
            "batch": b, "warmups": WARMUPS, "reps": REPS, "times_s": times, "median_s": med, "images_per_s": b / med,
            "unet_tflop_s": None if tiny else b * sh["steps"] * UNET_TFLOP_PER_IMAGE_STEP / med,
            "nan_outputs": int(not bool(torch.isfinite(torch.from_numpy(images)).all())),
        })  # fmt: skip
        write(out, {"phase": "plain", "status": "running", "batches": rows})
    best = max(rows, key=lambda r: r["images_per_s"])
    return {"batches": rows, "best_batch": best["batch"], "best_images_per_s": best["images_per_s"]}


def service(tiny: bool, out: Path, cache_dir: str) -> dict[str, Any]:
    """The worker's path (gpu_throughput.py): its buckets and defaults, cold compile, single job,
    saturated, and partial batches to show padding. Saves the compile cache for `warm_start`."""
    sh = shape(tiny)
    argv = ["--out", str(out), "--batch", str(sh["batch"]), "--jobs", str(sh["jobs"]), "--steps", str(sh["steps"]),
            "--size", str(sh["size"]), "--buckets", "worker", "--mix", sh["mix"], "--baseline-batch", "0",
            "--window-ms", "0", "--compile-cache", cache_dir] + (["--tiny"] if tiny else [])  # fmt: skip
    return gpu_throughput.main(argv, extra={"phase": "service", "status": "running"})


def warm_start(tiny: bool, out: Path, cache_dir: str) -> dict[str, Any]:
    """A second worker start from the compile cache alone (this process's inductor and Triton cache
    dirs are fresh): the warm-up time against the service phase's cold one."""
    fields: dict[str, Any] = dict.fromkeys(["warmup_s", "compile_cache", "buckets", "fxgraph_cache_hits",
                                            "fxgraph_cache_misses", "single_job_latency_s"])  # fmt: skip
    if reason := needs_cuda(tiny):
        return {"status": "skipped: no CUDA", "reason": reason, **fields}
    from torch._dynamo.utils import counters

    from shared.config import Settings
    from workers.models.loading import LoadedPipeline, prepare_for_serving

    sh, pipe = shape(tiny), build(tiny)
    loaded = LoadedPipeline("bench", "random", "diffusers", "cuda", pipe, str(pipe.unet.dtype))
    settings = Settings(batch_max_size=sh["batch"], compile_sizes=f"{sh['size']}x{sh['size']}",
                        compile_cache_dir=cache_dir, _env_file=None)  # type: ignore[call-arg]  # fmt: skip
    t = time.perf_counter()
    prepare_for_serving(loaded, settings)
    fields.update(warmup_s=round(time.perf_counter() - t, 2), compile_cache=loaded.plan.compile_cache,
                  buckets=loaded.plan.buckets, fxgraph_cache_hits=counters["inductor"]["fxgraph_cache_hit"],
                  fxgraph_cache_misses=counters["inductor"]["fxgraph_cache_miss"])  # fmt: skip
    req = make_request(0, sh["size"], sh["steps"], seed=0)
    lat = [drain(loaded, [req], sh["batch"], 0.0)["wall_s"] for _ in range(3)]
    fields["single_job_latency_s"] = statistics.median(lat)
    return fields


def fp8_smoke() -> dict[str, Any]:
    """One quantized linear before the whole UNet: error against fp16 and whether it ran at all."""
    from workers.models.precision import quantize_fp8

    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(1280, 1280)).to("cuda", torch.float16)
    x = torch.randn(4096, 1280, device="cuda", dtype=torch.float16)
    ref = lin(x).float()
    quantize_fp8(lin)
    got = lin(x).float()
    return {"rel_error": float((got - ref).norm() / ref.norm()), "weight_type": type(lin[0].weight).__name__}


def fp8(tiny: bool, out: Path) -> dict[str, Any]:
    """FP8 as served (per-tensor, fp16 UNet): the one-linear smoke step, then saturated throughput."""
    fields: dict[str, Any] = {"smoke": None, "throughput_images_per_s": None, "single_job_latency_s": None,
                              "max_rel_error": None, "precision": None}  # fmt: skip
    if reason := needs_cuda(tiny):
        return {"status": "skipped: no CUDA", "reason": reason, **fields}
    from workers.models.precision import PrecisionUnavailable, check_precision

    try:
        check_precision("fp8", "cuda")
        fields["smoke"] = fp8_smoke()
    except PrecisionUnavailable as exc:
        return {"status": "refused", "reason": str(exc), **fields}
    print(f"fp8 smoke: {fields['smoke']}", flush=True)  # the file is gpu_throughput's from here on
    sh = shape(tiny)
    argv = ["--out", str(out), "--precision", "fp8", "--batch", str(sh["batch"]), "--jobs", str(sh["jobs"]),
            "--steps", str(sh["steps"]), "--baseline-batch", "0", "--window-ms", "0"]  # fmt: skip
    res = gpu_throughput.main(argv, extra={"phase": "fp8", "status": "running", "smoke": fields["smoke"]})
    return {**res, "precision": res["ours"]["precision"]}


def quality(tiny: bool, out: Path) -> dict[str, Any]:
    """The quality harness in a process of its own (nothing compiled or quantized before it)."""
    from benchmarks.quality import evaluate

    sh, pipe = shape(tiny), build(tiny)
    candidates = ["bf16", "control-fewer-steps", "fp8"] + ([] if tiny else ["compiled"])
    return {"quality": evaluate(pipe, sh["size"], sh["steps"], candidates, ["batched"])}


def write(out: Path, res: dict[str, Any]) -> None:
    """Written as soon as there is something: a phase cut short by its budget keeps what it had."""
    out.write_text(json.dumps(res, indent=1, default=str))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("phase", choices=["plain", "service", "warm_start", "fp8", "quality"])
    ap.add_argument("--out", required=True, help="this phase's JSON file")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--compile-cache", default="", help="the compile cache dir the service phase fills")
    a = ap.parse_args()
    out, t = Path(a.out), time.perf_counter()
    base = {"phase": a.phase, "tiny": a.tiny, "torch": torch.__version__, "pid": os.getpid(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() and not a.tiny else "cpu"}  # fmt: skip
    if a.phase == "plain":
        res = plain(a.tiny, out)
    elif a.phase == "service":
        res = service(a.tiny, out, a.compile_cache)
    elif a.phase == "warm_start":
        res = warm_start(a.tiny, out, a.compile_cache)
    elif a.phase == "fp8":
        res = fp8(a.tiny, out)
    else:
        res = quality(a.tiny, out)
    status = res.pop("status", "ok")
    write(out, {**base, **res, "status": "ok" if status == "running" else status,
                "elapsed_s": round(time.perf_counter() - t, 2)})  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
