"""What high availability costs a submit: the job store's create step (the record, its place in the fair
queue, its broker turn) timed against one Redis, and against a Sentinel-managed primary with two
replicas, without and with the wait for a replica (`INPAINT_REDIS_WAIT_REPLICAS=1`). Everything on
loopback, so the figures are Redis' and the client's own, not a network's: add your network's round trip
between the primary and its nearest replica to the WAIT figure.

Usage: python benchmarks/redis_ha.py [--jobs 3000] [--threads 8] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.benchstack import machine  # noqa: E402
from shared.config import Settings  # noqa: E402
from shared.db import connect  # noqa: E402
from shared.jobs.store import JobStore  # noqa: E402
from shared.schemas import JobInput  # noqa: E402
from stack.services import Redis, Sentinel, free_port  # noqa: E402

PASSWORD = "bench0123456789"


def time_creates(settings: Settings, jobs: int, threads: int) -> dict[str, Any]:
    r = connect(settings)
    store = JobStore(r, 3600)
    params = JobInput(prompt="a bowl of fruit", num_inference_steps=30)
    turn = "x" * 900  # about a Celery turn's size

    def one(i: int) -> float:
        jid = uuid.uuid4().hex
        t = time.perf_counter()
        store.create(jid, f"t{i % 8}", params, "k", "k", "64x48:30:7.5:1.0", turn=turn)
        return time.perf_counter() - t

    for i in range(200):  # warm: connections, scripts
        one(i)
    lone = sorted(one(i) for i in range(jobs // 3))  # one client, one create at a time: the latency
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(jobs)))
    took = time.perf_counter() - started
    r.flushdb()
    return {
        "p50_ms": round(statistics.median(lone) * 1000, 3),
        "p99_ms": round(lone[int(len(lone) * 0.99)] * 1000, 3),
        "creates_per_s": round(jobs / took),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / f"redis-ha-{datetime.now():%Y-%m-%d}.json"))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="inpaint-ha-"))
    base = Settings(_env_file=None)  # type: ignore[call-arg]
    started: list[Any] = []
    try:
        p = free_port()
        primary = Redis(p, tmp / "primary", password=PASSWORD, min_replicas=1).start()
        started.append(primary)
        one = {"redis_url": primary.url}
        result: dict[str, Any] = {"machine": machine(), "date": datetime.now().isoformat(timespec="seconds")}
        # the primary alone first: no replica yet, so no min-replicas either
        primary.client().config_set("min-replicas-to-write", 0)
        result["one_redis"] = time_creates(base.model_copy(update=one), args.jobs, args.threads)
        primary.client().config_set("min-replicas-to-write", 1)
        for i in range(2):
            started.append(Redis(free_port(), tmp / f"replica{i}", password=PASSWORD, replica_of=f"127.0.0.1 {p}",
                                 min_replicas=1).start())  # fmt: skip
        for i in range(3):
            started.append(Sentinel(free_port(), tmp / f"sentinel{i}", f"127.0.0.1 {p}", password=PASSWORD).start())
        deadline = time.monotonic() + 30
        while primary.client().info("replication").get("min_slaves_good_slaves", 0) < 2:
            if time.monotonic() > deadline:
                raise RuntimeError("the replicas did not attach")
            time.sleep(0.1)
        ha = {
            "redis_url": f"redis://:{PASSWORD}@127.0.0.1:1/0",
            "redis_sentinels": ",".join(s.address for s in started if isinstance(s, Sentinel)),
        }
        result["sentinel_no_wait"] = time_creates(base.model_copy(update=ha), args.jobs, args.threads)
        result["sentinel_wait_1"] = time_creates(
            base.model_copy(update={**ha, "redis_wait_replicas": 1}), args.jobs, args.threads
        )
    finally:
        for s in reversed(started):
            s.stop()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
