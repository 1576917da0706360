"""How far one control plane goes: one Redis, one API process, and N simulated GPU workers.

A simulated worker (`INPAINT_MODEL=sim`, `workers.models.sim`) is a real `inpaint worker` whose
pipeline call computes nothing and holds the worker for `--call-ms` per micro-batch; everything around
the call (claims, leases, inputs from S3, outputs to S3, progress, the ending) is the service's own.
So one machine hosts many workers, and what is measured is the control plane. On loopback: redis-server,
SeaweedFS, `inpaint api`, `inpaint webhooks` and the workers, each a process of its own.

Phases:
1. **API cost**: with no worker, `--submits` jobs with a 512×512 photo-like PNG (`overhead.inputs`)
   from 8 client threads: the API process's CPU per submit, and Redis' commands and CPU per submit.
2. **Scaling**, for each N of `--workers`: N workers ready, then stopped (SIGSTOP) while
   `--jobs-per-worker` × N small jobs are submitted, then resumed: jobs/s from the resume to the last
   job's end, and the efficiency jobs/s ÷ (N × the 1-worker jobs/s). Over the same drain: Redis
   commands per job (`INFO commandstats`: each command a client sent plus each one a script ran),
   client round trips per job (`total_commands_processed`), Redis CPU per job (`INFO cpu`), the
   workers' CPU per job (outside the call: the call itself sleeps), the I/O worker's CPU per job.
3. **Memory**: workers stopped, `--backlog` queued jobs made by the job store's own create step (no S3
   put: the record, its fair-queue entries and its broker turn are what Redis holds): Redis
   `used_memory` per queued job for the first 1,000 and for the whole backlog.

Usage: python benchmarks/fleet.py [--workers 1,2,4,8,16,32] [--jobs-per-worker 30] [--call-ms 1000]
       [--submits 300] [--backlog 100000] [--out FILE] [--tiny]
Results JSON: benchmarks/results/fleet-<date>-<host>.json; the last line is a summary.
"""

from __future__ import annotations

import argparse
import json
import platform
import signal
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.benchstack import BenchStack, machine  # noqa: E402
from benchmarks.overhead import inputs  # noqa: E402
from shared import keys  # noqa: E402
from shared.db import connect  # noqa: E402
from shared.jobs.store import JobStore  # noqa: E402
from shared.queue import Queue, make_celery  # noqa: E402
from shared.schemas import JobInput  # noqa: E402

KEY = "fleet-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


class RedisMeter:
    """Deltas of what Redis says of itself: commands by name, client commands, CPU, memory."""

    def __init__(self, url: str):
        self.r = connect(url)

    def snapshot(self) -> dict[str, Any]:
        stats = self.r.info("commandstats")
        cpu = self.r.info("cpu")
        return {
            "calls": {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()},
            "cpu_s": float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
            "memory": int(self.r.info("memory")["used_memory"]),
        }

    @staticmethod
    def per(before: dict[str, Any], after: dict[str, Any], n: int) -> dict[str, Any]:
        names = set(before["calls"]) | set(after["calls"])
        calls = {c: after["calls"].get(c, 0) - before["calls"].get(c, 0) for c in names}
        calls = {c: round(v / n, 2) for c, v in sorted(calls.items(), key=lambda kv: -kv[1]) if v}
        return {
            # INFO and the meter's own reads are the benchmark's, not the service's
            "commands_per_job": round(sum(v for c, v in calls.items() if c not in ("info",)), 2),
            "cpu_ms_per_job": round((after["cpu_s"] - before["cpu_s"]) * 1000 / n, 3),
            "by_command": calls,
        }


def cpu_s(*procs: psutil.Process) -> float:
    """User + system CPU of the processes and all their children."""
    total = 0.0
    for p in procs:
        for q in [p, *p.children(recursive=True)]:
            try:
                t = q.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
    return total


def signal_all(procs: list[psutil.Process], sig: int) -> None:
    for p in procs:
        for q in [p, *p.children(recursive=True)]:
            try:
                q.send_signal(sig)
            except psutil.NoSuchProcess:
                pass


def submit_all(base: str, body: dict[str, Any], n: int, threads: int) -> list[str]:
    def one(_: int) -> str:
        with httpx.Client(base_url=base, headers=AUTH, timeout=60) as c:
            r = c.post("/v1/jobs", json=body)
            if r.status_code != 202:
                raise RuntimeError(f"submit answered {r.status_code}: {r.text[:200]}")
            return str(r.json()["id"])

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, range(n)))


def succeeded(meter: RedisMeter) -> int:
    return int(meter.r.hget(keys.stats(), "finished:succeeded:") or 0)


IDLE_S = 10.0  # MONITOR first watches the idle fleet this long: what it does whatever the jobs


def whole_lives(
    st: BenchStack, roles: dict[str, psutil.Process], meter: RedisMeter, jobs: int, steps: int
) -> dict[str, Any]:
    """Every Redis command of `jobs` whole lives (submit to conclusion), seen by MONITOR: the commands
    clients send (EVALSHA is one; a pipeline of five is five), and the ones their scripts run, by
    process and by name. The idle fleet's own commands (heartbeats, sweeps, the broker's polls) are
    measured first and reported apart: per second, not per job."""
    import threading

    image, mask, _ = inputs(size=64, kind="flat")
    body = {"prompt": "a bowl of fruit", "image": image, "mask": mask, "num_inference_steps": steps}
    seen: list[tuple[float, str, int, str]] = []  # (time, client type, client port, command)
    ready = threading.Event()
    stop = threading.Event()

    def watch() -> None:
        client = connect(st.settings.redis_url)
        with client.monitor() as m:
            ready.set()
            for cmd in m.listen():
                if stop.is_set():
                    break
                name = str(cmd["command"]).split(" ", 1)[0].strip('"').lower()
                kind, port = str(cmd.get("client_type", "tcp")), int(cmd.get("client_port") or 0)
                seen.append((float(cmd["time"]), kind, port, name))

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    ready.wait(10)
    idle_from = time.time()
    time.sleep(IDLE_S)
    base = succeeded(meter)
    started, life_from = time.monotonic(), time.time()
    submit_all(st.base, body, jobs, 4)
    while succeeded(meter) - base < jobs:
        if time.monotonic() - started > 300:
            raise RuntimeError("the monitored jobs did not end")
        time.sleep(0.25)
    time.sleep(1.0)
    life_s = time.time() - life_from
    ports: dict[int, str] = {}
    for role, proc in roles.items():
        for q in [proc, *proc.children(recursive=True)]:
            try:
                for c in q.net_connections(kind="tcp"):
                    if c.raddr and c.raddr.port == meter.r.connection_pool.connection_kwargs["port"]:
                        ports[c.laddr.port] = role
            except psutil.NoSuchProcess:
                pass
    stop.set()
    meter.r.ping()  # one more line, so the watcher sees `stop`
    t.join(5)
    idle: dict[str, dict[str, int]] = {}
    busy: dict[str, dict[str, int]] = {}
    scripts = 0
    for at, kind, port, name in seen:
        window = idle if idle_from <= at < idle_from + IDLE_S else busy if at >= life_from else None
        if window is None:
            continue
        if kind == "lua":
            scripts += window is busy
            continue
        names = window.setdefault(ports.get(port, "benchmark"), {})
        names[name] = names.get(name, 0) + 1
    for window in (idle, busy):
        window.pop("benchmark", None)  # its own polls and MONITOR
    idle_rate = {r: {c: v / IDLE_S for c, v in names.items()} for r, names in idle.items()}
    # per job: what the lives sent, less what the idle fleet would have sent in that time
    net = {
        role: {c: max(0.0, v - idle_rate.get(role, {}).get(c, 0.0) * life_s) / jobs for c, v in names.items()}
        for role, names in busy.items()
    }
    net = {
        r: {c: round(v, 2) for c, v in sorted(n.items(), key=lambda kv: -kv[1]) if v >= 0.005} for r, n in net.items()
    }
    return {
        "jobs": jobs,
        "seconds": round(life_s, 1),
        "commands_per_job": round(sum(sum(v.values()) for v in net.values()), 2),
        "commands_per_job_by_process": {role: round(sum(v.values()), 2) for role, v in net.items()},
        "commands_per_job_with_idle": round(sum(sum(v.values()) for v in busy.values()) / jobs, 2),
        "idle_commands_per_s_by_process": {r: round(sum(n.values()), 2) for r, n in idle_rate.items()},
        "script_commands_per_job": round(scripts / jobs, 2),
        "by_process": net,
    }


def api_cost(st: BenchStack, api: psutil.Process, meter: RedisMeter, submits: int) -> dict[str, Any]:
    image, mask, nbytes = inputs(kind="photo")
    body = {"prompt": "a bowl of fruit", "image": image, "mask": mask, "num_inference_steps": 4}
    submit_all(st.base, body, 16, 4)  # warm: connections, caches, the first request's imports
    before, cpu0, t0 = meter.snapshot(), cpu_s(api), time.perf_counter()
    submit_all(st.base, body, submits, 8)
    took = time.perf_counter() - t0
    after, cpu1 = meter.snapshot(), cpu_s(api)
    meter.r.flushdb()  # no worker ever runs them: the scaling phases start from an empty store
    return {
        "submits": submits,
        "body_bytes": nbytes,
        "api_cpu_ms_per_submit": round((cpu1 - cpu0) * 1000 / submits, 3),
        "submits_per_s": round(submits / took, 1),
        "redis": RedisMeter.per(before, after, submits),
    }


def ready_workers(st: BenchStack) -> int:
    return len(st.registry.ready())


def scale(st: BenchStack, workers: list[psutil.Process], io: psutil.Process, meter: RedisMeter, n: int,
          per_worker: int, call_s: float, steps: int) -> dict[str, Any]:  # fmt: skip
    image, mask, _ = inputs(size=64, kind="flat")
    body = {"prompt": "a bowl of fruit", "image": image, "mask": mask, "num_inference_steps": steps}
    jobs = per_worker * n
    signal_all(workers, signal.SIGSTOP)
    try:
        base = succeeded(meter)
        ids = submit_all(st.base, body, jobs, 8)
    finally:
        before, wcpu0, iocpu0 = meter.snapshot(), cpu_s(*workers), cpu_s(io)
        resumed = time.time()
        signal_all(workers, signal.SIGCONT)
    deadline = time.monotonic() + 120 + 4 * per_worker * call_s
    while succeeded(meter) - base < jobs:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{jobs - succeeded(meter) + base} of {jobs} jobs did not end")
        time.sleep(0.25)
    time.sleep(1.0)  # endings behind the status change (manifest, the webhook's scheduling) settle
    after, wcpu1, iocpu1 = meter.snapshot(), cpu_s(*workers), cpu_s(io)
    store = JobStore(meter.r, 3600)
    records = [r for r in store.get_many(ids) if r is not None]
    last = max(float(r.fields["finished_at"]) for r in records)
    attempts = sum(int(r.fields.get("attempts", "1")) for r in records)
    return {
        "workers": n,
        "jobs": jobs,
        "seconds": round(last - resumed, 2),
        "jobs_per_s": round(jobs / (last - resumed), 3),
        "attempts_per_job": round(attempts / len(records), 3),
        "worker_cpu_ms_per_job": round((wcpu1 - wcpu0) * 1000 / jobs, 2),
        "io_worker_cpu_ms_per_job": round((iocpu1 - iocpu0) * 1000 / jobs, 2),
        "redis": RedisMeter.per(before, after, jobs),
    }


def memory(st: BenchStack, workers: list[psutil.Process], meter: RedisMeter, backlog: int) -> dict[str, Any]:
    """Redis memory per queued job, the jobs made by the store's own create step (8 threads)."""
    signal_all(workers, signal.SIGSTOP)
    try:
        meter.r.flushdb()
        store = JobStore(connect(st.settings), st.settings.job_ttl_s)
        queue = Queue(make_celery(st.settings))
        params = JobInput(prompt="a bowl of fruit", num_inference_steps=30)

        def make(i: int) -> None:
            jid = uuid.uuid4().hex
            key = f"inputs/bench/{jid}"
            store.create(jid, f"tenant{i % 8}", params, key, key, "64x48:30:7.5:1.0", turn=queue.turn_message(jid))

        base = meter.snapshot()["memory"]
        first = min(1000, backlog)
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(make, range(first)))
        at_first = meter.snapshot()["memory"]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(make, range(first, backlog)))
        total = meter.snapshot()["memory"]
        meter.r.flushdb()
    finally:
        signal_all(workers, signal.SIGCONT)
    return {
        "backlog": backlog,
        "bytes_per_job_first_1000": round((at_first - base) / first),
        "bytes_per_job_whole_backlog": round((total - base) / backlog),
        "used_memory_mb_at_backlog": round(total / 2**20, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", default="1,2,4,8,16,32")
    ap.add_argument("--jobs-per-worker", type=int, default=30)
    ap.add_argument("--call-ms", type=int, default=1000, help="device time of one micro-batch")
    ap.add_argument("--batch", type=int, default=1, help="rows per micro-batch (INPAINT_BATCH_MAX_SIZE)")
    ap.add_argument("--steps", type=int, default=4, help="denoising steps per job: one progress report each")
    ap.add_argument("--skip-api", action="store_true", help="no API cost phase (it does not depend on N)")
    ap.add_argument("--skip-memory", action="store_true", help="no backlog phase")
    ap.add_argument("--submits", type=int, default=300)
    ap.add_argument("--life-jobs", type=int, default=40, help="jobs whose every Redis command is counted")
    ap.add_argument("--backlog", type=int, default=100_000)
    ap.add_argument("--tiny", action="store_true", help="a quick check: 1 and 2 workers, few jobs")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.tiny:
        args.workers, args.jobs_per_worker, args.call_ms, args.submits, args.backlog = "1,2", 4, 200, 10, 500
        args.life_jobs = 5
    counts = sorted({int(x) for x in args.workers.split(",")})
    host = platform.node().split(".")[0] or "host"
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"fleet-{datetime.now():%Y-%m-%d}-{host}.json")
    settings = {
        "model": "sim", "sim_call_ms": args.call_ms, "batch_max_size": args.batch, "device": "cpu",
        "api_keys": f"bench:{KEY}", "max_queued_jobs": 10_000_000, "max_queued_per_tenant": 10_000_000,
        "worker_metrics_port": 0, "webhooks_metrics_port": 0,
    }  # fmt: skip
    result: dict[str, Any] = {"machine": machine(), "date": datetime.now().isoformat(timespec="seconds"),
                              "args": vars(args), "steps": []}  # fmt: skip
    with BenchStack(**settings) as st:
        api = psutil.Process(st.start_api().pid)
        io = psutil.Process(st.start("io", "webhooks").pid)
        meter = RedisMeter(st.settings.redis_url)
        if not args.skip_api:
            result["api"] = api_cost(st, api, meter, args.submits)
            print(json.dumps({"api": result["api"]}), flush=True)
        workers: list[psutil.Process] = []
        for n in counts:
            while len(workers) < n:
                workers.append(psutil.Process(st.start(f"w{len(workers)}", "worker", "--concurrency", "1").pid))
            deadline = time.monotonic() + 600
            while ready_workers(st) < n:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {ready_workers(st)} of {n} workers became ready")
                time.sleep(0.5)
            if "life" not in result:
                roles = {"api": api, "io": io, **{f"worker{i}": w for i, w in enumerate(workers)}}
                result["life"] = whole_lives(st, roles, meter, args.life_jobs, args.steps)
                print(json.dumps({"life": result["life"]}), flush=True)
            step = scale(st, workers, io, meter, n, args.jobs_per_worker, args.call_ms / 1000, args.steps)
            result["steps"].append(step)
            first = result["steps"][0]  # its rate per worker is the yardstick
            step["efficiency"] = round(step["jobs_per_s"] / (n * first["jobs_per_s"] / first["workers"]), 3)
            print(json.dumps({k: v for k, v in step.items() if k != "redis"} | {
                "redis_commands_per_job": step["redis"]["commands_per_job"],
                "redis_cpu_ms_per_job": step["redis"]["cpu_ms_per_job"]}), flush=True)  # fmt: skip
        if not args.skip_memory:
            result["memory"] = memory(st, workers, meter, args.backlog)
            print(json.dumps({"memory": result["memory"]}), flush=True)
        result["rss_mb_per_worker"] = round(
            sum(sum(q.memory_info().rss for q in [p, *p.children(recursive=True)]) for p in workers)
            / len(workers) / 2**20, 1)  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    last = result["steps"][-1]
    life = result["life"]["commands_per_job"]
    print(
        f"workers={last['workers']} jobs_per_s={last['jobs_per_s']} efficiency={last['efficiency']} "
        f"api_cpu_ms_per_submit={result.get('api', {}).get('api_cpu_ms_per_submit')} "
        f"redis_commands_per_job={life:.1f} "
        f"redis_bytes_per_queued_job={result.get('memory', {}).get('bytes_per_job_whole_backlog')} -> {out}"
    )


if __name__ == "__main__":
    main()
