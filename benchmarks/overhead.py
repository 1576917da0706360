"""What the service adds around the pipeline, and how fast one API process accepts jobs.

Starts a real stack on loopback (redis-server, SeaweedFS, one `inpaint api` process, one
`inpaint worker` with tiny-random) and measures:

1. overhead: for N jobs submitted one at a time (`Prefer: wait`: no polling), (the worker's recorded
   finish time − the client's time just before POST) − the time spent inside the pipeline call; p50
   and p99 in ms;
2. submit throughput: accepted `POST /v1/jobs` per second from a concurrent client against the
   one API process (the worker is stopped first, so it does not compete for the CPU);
3. fairness: with the thousands of jobs the flood left queued (tenant `bench`), a worker starts and
   tenant `b` submits one job: its wait in units of one micro-batch call; then the same for an
   interactive job of `bench` behind 2,000 of its own `bulk` jobs.

Inputs are 512×512 PNGs. The last line is `overhead_p50_ms=… overhead_p99_ms=… submit_jobs_per_s=…`.
Usage: python benchmarks/overhead.py [--jobs 200] [--submits 2000] [--concurrency 32] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.benchstack import BenchStack, machine  # noqa: E402
from stack.services import stop_process  # noqa: E402


def inputs(size: int = 512, kind: str = "photo") -> tuple[str, str, int]:
    """A 512×512 image and mask as base64 PNG: `photo` has sensor-like noise (a ~350 KB PNG, like a real
    photo), `flat` is an illustration of smooth gradients and shapes (a few KB)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    arr = np.stack([xx * 255 // size, yy * 255 // size, (xx + yy) * 127 // size], -1).astype(np.int16)
    if kind == "photo":
        arr += rng.integers(-6, 7, arr.shape, dtype=np.int16)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    draw.ellipse((100, 120, 300, 320), fill=(200, 60, 40))
    draw.rectangle((320, 300, 460, 470), fill=(30, 90, 200))
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).ellipse((80, 100, 320, 340), fill=255)
    out = []
    for im in (img, mask):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out[0], out[1], len(out[0]) + len(out[1])


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


BENCH_KEY, B_KEY = "bench-key-0123456789", "b-key-0123456789"
AUTH = {"Authorization": f"Bearer {BENCH_KEY}"}


def stamp(job: dict[str, Any], field: str) -> float:
    return datetime.fromisoformat(job[field].replace("Z", "+00:00")).timestamp()


def wait_in_calls(base: str, key: str, body: dict[str, Any], backlog: list[str]) -> dict[str, float]:
    """Submit one job with `key`; its wait (submit to start) in seconds and in micro-batch calls, a
    call's time being the median call of the backlog's jobs that ran meanwhile."""
    with httpx.Client(base_url=base, timeout=60) as c:
        job = c.post("/v1/jobs", json=body, headers={"Authorization": f"Bearer {key}"}).json()
        while job["status"] != "succeeded":
            time.sleep(0.05)
            job = c.get(f"/v1/jobs/{job['id']}", headers={"Authorization": f"Bearer {key}"}).json()
        calls: list[float] = []
        deadline = time.monotonic() + 120
        while len(calls) < 3 and time.monotonic() < deadline:  # a few of the backlog's calls, to time one
            time.sleep(0.5)
            calls = []
            for jid in backlog[:200]:
                other = c.get(f"/v1/jobs/{jid}", headers=AUTH).json()
                if other["status"] == "succeeded":
                    calls.append(other["metrics"]["inference_s"])
    wait = stamp(job, "started_at") - stamp(job, "created_at")
    call = statistics.median(calls) if calls else float("nan")
    return {"wait_s": round(wait, 3), "call_s": round(call, 3), "wait_in_calls": round(wait / call, 2)}


def cancel_flood(base: str, ids: list[str]) -> None:
    """Cancel what is left of the flood (concurrently), so that only the bulk backlog waits."""

    async def go() -> None:
        limits = httpx.Limits(max_connections=16)
        async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits, headers=AUTH) as ac:
            sem = asyncio.Semaphore(16)

            async def one(jid: str) -> None:
                async with sem:
                    await ac.post(f"/v1/jobs/{jid}/cancel")

            await asyncio.gather(*(one(j) for j in ids))

    asyncio.run(go())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--submits", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--input", choices=["photo", "flat"], default="photo")
    ap.add_argument("--bulk", type=int, default=2000, help="bulk jobs an interactive job waits behind")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / f"overhead-{datetime.now():%Y-%m-%d}"))
    args = ap.parse_args()

    with BenchStack(
        max_queued_jobs=1_000_000, max_queued_per_tenant=1_000_000, api_keys=f"bench:{BENCH_KEY},b:{B_KEY}"
    ) as st:
        run(st, args)


def run(st: BenchStack, args: argparse.Namespace) -> None:
    api = st.start_api()
    worker = st.start_worker()
    image, mask, nbytes = inputs(kind=args.input)
    body = {"prompt": "a bowl of fruit", "image": image, "mask": mask, "num_inference_steps": args.steps, "seed": 1}
    base = st.base

    # 1. overhead, one job at a time
    overheads: list[float] = []
    inference: list[float] = []
    parts: dict[str, list[float]] = {"api": [], "queue": [], "worker": []}
    with httpx.Client(base_url=base, timeout=90, headers=AUTH) as c:
        for i in range(args.jobs + 3):
            t0 = time.time()
            # Waits inside the request (`Prefer: wait`) as an interactive client does, rather than
            # polling: a client polling every 10 ms would take CPU from the worker it measures.
            job = c.post("/v1/jobs", json=body, headers={"Prefer": "wait=60"}).json()
            while job["status"] not in ("succeeded", "failed", "canceled"):
                time.sleep(0.01)
                job = c.get(f"/v1/jobs/{job['id']}").json()
            assert job["status"] == "succeeded", job
            created, started, finished = (stamp(job, k) for k in ("created_at", "started_at", "finished_at"))
            infer = job["metrics"]["inference_s"]
            if i >= 3:  # the first jobs warm caches and connections
                overheads.append((finished - t0 - infer) * 1000)
                inference.append(infer * 1000)
                # where it goes: request handling, broker to worker, worker around the pipeline call
                parts["api"].append((created - t0) * 1000)
                parts["queue"].append((started - created) * 1000)
                parts["worker"].append((finished - started - infer) * 1000)
    stop_process(worker, 30)

    # 2. submit throughput, concurrent clients, worker stopped
    flooded: list[str] = []

    unanswered: dict[str, int] = {}  # requests that got no HTTP answer at all, by error: counted, never fatal

    async def flood() -> tuple[int, int, float]:
        ok = bad = 0
        sem = asyncio.Semaphore(args.concurrency)
        limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
        async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits, headers=AUTH) as ac:

            async def one() -> None:
                nonlocal ok, bad
                async with sem:
                    try:
                        r = await ac.post("/v1/jobs", json=body)
                    except httpx.TransportError as exc:
                        unanswered[type(exc).__name__] = unanswered.get(type(exc).__name__, 0) + 1
                        return
                    if r.status_code == 202:
                        ok += 1
                        flooded.append(r.json()["id"])
                    else:
                        bad += 1

            await asyncio.gather(*(one() for _ in range(50)))  # warm-up
            ok = bad = 0
            unanswered.clear()
            t = time.perf_counter()
            await asyncio.gather(*(one() for _ in range(args.submits)))
            return ok, bad, time.perf_counter() - t

    watched = {"api": api.pid, "s3": st.s3.proc.pid, "redis": st.redis.proc.pid, "bench_client": os.getpid()}  # type: ignore[union-attr]

    def cpu() -> dict[str, float]:
        out = {}
        for name, pid in watched.items():
            t = psutil.Process(pid).cpu_times()
            out[name] = t.user + t.system + getattr(t, "children_user", 0) + getattr(t, "children_system", 0)
        return out

    before = cpu()
    ok, bad, elapsed = asyncio.run(flood())
    after = cpu()
    cpu_ms_per_submit = {k: (after[k] - before[k]) * 1000 / max(ok, 1) for k in watched}

    # 3. fairness: the flood's jobs wait (tenant bench); a worker comes back; tenant b submits one
    st.start_worker("worker2")
    time.sleep(2)  # the worker is busy with bench's backlog
    fair_tenant = wait_in_calls(base, B_KEY, body, flooded)
    bulk_ids = []
    with httpx.Client(base_url=base, timeout=60, headers=AUTH) as c:
        for _ in range(args.bulk):
            bulk_ids.append(c.post("/v1/jobs", json={**body, "priority": "bulk"}).json()["id"])
    cancel_flood(base, flooded)  # only bulk work waits now, then one interactive job of the same tenant
    time.sleep(2)
    fair_bulk = wait_in_calls(base, BENCH_KEY, body, bulk_ids)
    result = {
        "machine": machine(),
        "date": datetime.now().isoformat(timespec="seconds"),
        "model": "tiny-random",
        "input": f"512x512 PNG image ({args.input}) + mask",
        "client": "one job at a time, POST with Prefer: wait=60 (no polling)",
        "request_body_bytes": nbytes,
        "jobs": len(overheads),
        "overhead_ms": {
            "p50": percentile(overheads, 50),
            "p90": percentile(overheads, 90),
            "p99": percentile(overheads, 99),
            "mean": statistics.fmean(overheads),
        },
        "inference_ms_p50": percentile(inference, 50),
        "overhead_breakdown_ms_p50": {k: percentile(v, 50) for k, v in parts.items()},
        "submits": {
            "accepted": ok,
            "refused": bad,
            "unanswered": unanswered,
            "seconds": elapsed,
            "concurrency": args.concurrency,
        },
        "submit_jobs_per_s": ok / elapsed,
        "submit_cpu_ms_per_job": cpu_ms_per_submit,
        "fairness": {
            "other_tenant_behind_backlog": {"backlog_jobs": len(flooded), **fair_tenant},
            "interactive_behind_bulk": {"bulk_jobs": len(bulk_ids), **fair_bulk},
        },
    }
    out = Path(args.out if args.out.endswith(".json") else f"{args.out}-{args.input}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    print(
        f"overhead_p50_ms={result['overhead_ms']['p50']:.1f} overhead_p99_ms={result['overhead_ms']['p99']:.1f} "
        f"submit_jobs_per_s={result['submit_jobs_per_s']:.0f} "
        f"other_tenant_wait_calls={fair_tenant['wait_in_calls']} interactive_behind_bulk_calls={fair_bulk['wait_in_calls']}"
    )


if __name__ == "__main__":
    main()
