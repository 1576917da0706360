"""What a micro-batch costs the worker around its pipeline call: the mates' inputs fetched and decoded
before it, then each job's output encoded and uploaded and the job ended after it. The next call
waits for all of that, so on a GPU it is lost throughput.

A real stack on loopback (redis-server, SeaweedFS, one API, one worker with tiny-random and micro-batches
of up to 8 rows). Each round submits a long job (6 steps), then, while it runs, 8 compatible 2-step jobs
that the worker runs as one micro-batch; reported (p50 over the rounds): the micro-batch's time around
its call (the first claim to the last job's end, less the call), and the spread of its jobs' finish
times (first to last). The last line is `batch_overhead_ms=… ending_spread_ms=…`.

    python benchmarks/batch_ending.py [--rounds 10] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.overhead import AUTH, BENCH_KEY, env_for, inputs, stamp  # noqa: E402
from shared.config import Settings  # noqa: E402
from shared.db import connect  # noqa: E402
from shared.jobs.registry import Registry  # noqa: E402
from shared.storage import Storage  # noqa: E402
from stack.services import Redis, SeaweedS3, free_port, stop_process, wait_port, wait_s3  # noqa: E402

MATES = 8


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="inpaint-bench-"))
    redis = Redis(free_port(), tmp / "redis").start()
    s3 = SeaweedS3(tmp / "s3", "benchaccess", "benchsecret-0123456789").start()
    api_port = free_port()
    settings = Settings(
        data_dir=tmp / "data", redis_url=redis.url, s3_endpoint_url=s3.endpoint, s3_access_key_id=s3.access_key,
        s3_secret_access_key=s3.secret_key, model="tiny-random", device="cpu", api_port=api_port,
        batch_max_size=MATES, api_keys=f"bench:{BENCH_KEY}",
    )  # fmt: skip
    wait_s3(Storage(settings), 90)
    env = env_for(settings)
    procs: list[subprocess.Popen[bytes]] = []
    for name, cmd in (("api", ["api", "--port", str(api_port)]), ("worker", ["worker"])):
        with open(tmp / f"{name}.log", "ab") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "stack.cli", *cmd, "--log-level", "warning"],
                                          env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))  # fmt: skip
    try:
        wait_port(api_port, 60, procs[0])
        registry = Registry(connect(settings.redis_url))
        deadline = time.monotonic() + 180
        while not registry.ready():
            assert time.monotonic() < deadline and procs[1].poll() is None, (tmp / "worker.log").read_text()[-3000:]
            time.sleep(0.2)
        image, mask, _ = inputs()
        body = {"prompt": "a bowl of fruit", "image": image, "mask": mask, "num_inference_steps": 2, "seed": 1}
        spreads: list[float] = []
        around: list[float] = []
        sizes: list[int] = []
        with (
            httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=60, headers=AUTH) as c,
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
        spreads, around = spreads[1:], around[1:]  # the first round warms connections and code paths
        assert spreads, f"no round ran its {MATES} jobs as one micro-batch (batch sizes seen: {sizes})"
        p50 = statistics.median(spreads)
        around_p50 = statistics.median(around)
        result = {
            "machine": f"{platform.node()} ({os.cpu_count()} CPUs, {platform.processor() or platform.machine()})",
            "date": datetime.now().isoformat(timespec="seconds"),
            "model": "tiny-random",
            "input": "512x512 PNG image (photo) + mask, outputs PNG",
            "micro_batch_jobs": MATES,
            "rounds": len(spreads),
            "batch_overhead_ms": {"p50": around_p50, "min": min(around), "max": max(around)},
            "ending_spread_ms": {"p50": p50, "min": min(spreads), "max": max(spreads)},
        }
        print(json.dumps(result, indent=1))
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"batch_overhead_ms={around_p50:.1f} ending_spread_ms={p50:.1f}")
    finally:
        for p in procs:
            stop_process(p, 20)
        s3.stop()
        redis.stop()


if __name__ == "__main__":
    main()
