"""What a micro-batch costs the worker around its pipeline call: the mates' inputs fetched and decoded
before it, then each job's output encoded and uploaded and the job ended after it. The next call
waits for all of that, so on a GPU it is lost throughput.

A real stack on loopback (redis-server, SeaweedFS, one API, one worker with tiny-random and micro-batches
of up to 8 rows). Each round submits a long job (6 steps), then, while it runs, 8 compatible 2-step jobs
that the worker runs as one micro-batch; reported (p50 over the rounds): the micro-batch's time around
its call (the first claim to the last job's end, less the call), and the spread of its jobs' finish
times (first to last).

Then back to back: behind a long job, `--calls` micro-batches of 8 wait at once, and the worker runs
them one after another. Reported: jobs per second from the first claim to the last end, and the
worker's time per call beyond the call itself (`gap_ms_per_call`: what a GPU would sit idle). A worker
whose jobs end behind its next call (the Celery worker's) overlaps each micro-batch's endings with the
next one's start and call: where cores are to spare (a GPU machine), the gap is the longer of the two,
not their sum; on a 2-core machine both are CPU work on the same two cores, and the gap stays.
The last line is `batch_overhead_ms=… ending_spread_ms=… back_to_back_jobs_per_s=… gap_ms_per_call=…`.

    python benchmarks/batch_ending.py [--rounds 10] [--calls 6] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.benchstack import BenchStack, machine  # noqa: E402
from benchmarks.overhead import AUTH, BENCH_KEY, inputs, stamp  # noqa: E402

MATES = 8


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--calls", type=int, default=6)
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    with BenchStack(batch_max_size=MATES, api_keys=f"bench:{BENCH_KEY}") as st:
        st.start_api()
        st.start_worker()
        image, mask, _ = inputs()
        body = {"prompt": "a bowl of fruit", "image": image, "mask": mask, "num_inference_steps": 2, "seed": 1}
        spreads: list[float] = []
        around: list[float] = []
        sizes: list[int] = []
        with (
            httpx.Client(base_url=st.base, timeout=60, headers=AUTH) as c,
            ThreadPoolExecutor(MATES) as pool,
        ):
            for _ in range(args.rounds + 1):
                blocker = c.post("/v1/jobs", json={**body, "num_inference_steps": 6}).json()["id"]
                ids = list(pool.map(lambda _: c.post("/v1/jobs", json=body).json()["id"], range(MATES)))
                jobs = []
                for jid in [blocker, *ids]:
                    while (job := c.get(f"/v1/jobs/{jid}").json())["status"] not in ("succeeded", "failed"):
                        time.sleep(0.1)
                    assert job["status"] == "succeeded", job
                    jobs.append(job)
                mates = jobs[1:]
                sizes.append(max(j["metrics"]["batch_size"] for j in mates))
                batch = [j for j in mates if j["metrics"]["batch_size"] == MATES]
                if len(batch) == MATES:
                    finished = [stamp(j, "finished_at") for j in batch]
                    claimed = min(stamp(j, "started_at") for j in batch)
                    spreads.append((max(finished) - min(finished)) * 1000)
                    around.append((max(finished) - claimed - batch[0]["metrics"]["inference_s"]) * 1000)
            flow = back_to_back(c, pool, body, args.calls)
        spreads, around = spreads[1:], around[1:]  # the first round warms connections and code paths
        assert spreads, f"no round ran its {MATES} jobs as one micro-batch (batch sizes seen: {sizes})"
        p50 = statistics.median(spreads)
        around_p50 = statistics.median(around)
        result = {
            "machine": machine(),
            "date": datetime.now().isoformat(timespec="seconds"),
            "model": "tiny-random",
            "input": "512x512 PNG image (photo) + mask, outputs PNG",
            "micro_batch_jobs": MATES,
            "rounds": len(spreads),
            "batch_overhead_ms": {"p50": around_p50, "min": min(around), "max": max(around)},
            "ending_spread_ms": {"p50": p50, "min": min(spreads), "max": max(spreads)},
            "back_to_back": flow,
        }
        print(json.dumps(result, indent=1))
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))
        print(
            f"batch_overhead_ms={around_p50:.1f} ending_spread_ms={p50:.1f} "
            f"back_to_back_jobs_per_s={flow['jobs_per_s']:.2f} gap_ms_per_call={flow['gap_ms_per_call']:.1f}"
        )


def back_to_back(c: httpx.Client, pool: ThreadPoolExecutor, body: dict[str, Any], calls: int) -> dict[str, Any]:
    """`calls` micro-batches of MATES queued at once behind a long job, run one after another."""
    c.post("/v1/jobs", json={**body, "num_inference_steps": 6})
    time.sleep(0.3)  # the long job is running: the rest waits, and is claimed in micro-batches
    ids = list(pool.map(lambda _: c.post("/v1/jobs", json=body).json()["id"], range(calls * MATES)))
    jobs = []
    for jid in ids:
        while (job := c.get(f"/v1/jobs/{jid}").json())["status"] not in ("succeeded", "failed"):
            time.sleep(0.1)
        assert job["status"] == "succeeded", job
        jobs.append(job)
    # A call's jobs share its inference time and batch size: a call of b jobs is b of them (two calls
    # may share a time to the 0.1 ms, so count jobs, not distinct times).
    per_key: dict[tuple[int, float], int] = {}
    for j in jobs:
        key = (j["metrics"]["batch_size"], j["metrics"]["inference_s"])
        per_key[key] = per_key.get(key, 0) + 1
    calls = sum(n / b for (b, _), n in per_key.items())
    busy = sum(s * n / b for (b, s), n in per_key.items())
    first = min(stamp(j, "started_at") for j in jobs)
    wall = max(stamp(j, "finished_at") for j in jobs) - first
    return {
        "jobs": len(jobs),
        "calls": calls,
        "batch_sizes": sorted(b for b, _ in per_key),
        "wall_s": round(wall, 3),
        "jobs_per_s": len(jobs) / wall,
        "call_s_mean": busy / calls,
        "gap_ms_per_call": (wall - busy) * 1000 / calls,
    }


if __name__ == "__main__":
    main()
