"""1,000 jobs from 20 concurrent clients on 2 workers: none lost, none run twice.

Its own stack with production-like broker settings (the fault module shortens the visibility
timeout to provoke redeliveries; under load that would only measure the provocation).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import pytest

from shared.config import Settings
from shared.storage import job_prefix
from tests.conftest import auth, job_body
from tests.faultstack import Stack, wait_end

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, settings: Settings) -> Iterator[Stack]:
    s = Stack(
        tmp_path_factory.mktemp("load"), settings,
        fault_injection=False, broker_visibility_timeout_s=None, broker_restore_interval_s=10,
        job_soft_time_limit_s=120, job_time_limit_s=150, worker_heartbeat_s=2.0,
    )  # fmt: skip
    s.add_worker("a")
    s.add_worker("b")
    s.wait_workers(2)
    yield s
    s.stop()


@pytest.mark.timeout(1200)
def test_load_1000_jobs_20_clients_2_workers_none_lost_none_twice(stack, api, receiver):
    n, clients = 1000, 20
    events: dict[str, list[str]] = {}
    stop = threading.Event()
    sub = stack.store.r.pubsub()
    sub.psubscribe("inpaint:events:*")

    def listen() -> None:
        while not stop.is_set():
            try:
                msg = sub.get_message(ignore_subscribe_messages=True, timeout=0.5)
            except Exception:  # the module's Redis going away at teardown
                return
            if msg and msg["type"] == "pmessage":
                ev = json.loads(msg["data"])
                if ev["type"] == "status":
                    events.setdefault(msg["channel"].rsplit(":", 1)[1], []).append(ev["status"])

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    ids: list[str] = []
    lock = threading.Lock()
    started = time.monotonic()

    def client(k: int) -> None:
        for _ in range(n // clients):
            body = job_body(64, 64, num_inference_steps=1, webhook=receiver.url("/load"), prompt=f"load {k}")
            r = api.post("/v1/jobs", headers=auth(), json=body)
            assert r.status_code == 202, r.text
            jid = r.json()["id"]
            with lock:
                ids.append(jid)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    submitted = time.monotonic() - started
    latencies = []
    for jid in ids:
        job = wait_end(api, jid, timeout=600)
        assert job["status"] == "succeeded", job
        latencies.append(job["metrics"]["total_s"])
    elapsed = time.monotonic() - started
    time.sleep(3)
    stop.set()
    listener.join()
    sub.close()
    assert len(ids) == len(set(ids)) == n
    keys = stack.storage.list_keys("tenants/alice/jobs/")
    outputs = {k.split("/")[3] for k in keys if "/outputs/" in k}
    per_job = {jid: sum(1 for k in keys if k.startswith(job_prefix("alice", jid) + "outputs/")) for jid in ids}
    assert set(ids) <= outputs and all(c == 1 for c in per_job.values())  # every job one output, none twice
    hooks = [json.loads(h["body"]) for h in receiver.at("/load")]
    done = [h["data"]["id"] for h in hooks if h["type"] == "job.succeeded"]
    assert sorted(done) == sorted(ids)  # one terminal webhook per job
    rank = {"queued": 0, "running": 1, "succeeded": 2, "failed": 2, "canceled": 2}
    for jid in ids:
        seq = events.get(jid, [])
        assert seq == sorted(seq, key=rank.__getitem__) and seq.count("succeeded") == 1, (jid, seq)
    latencies.sort()
    print(
        f"\n{n} jobs, {clients} clients, 2 workers: submitted in {submitted:.1f}s, all done in {elapsed:.1f}s "
        f"({n / elapsed:.1f} jobs/s); latency p50 {latencies[n // 2]:.2f}s p90 {latencies[int(n * 0.9)]:.2f}s "
        f"p99 {latencies[int(n * 0.99)]:.2f}s max {latencies[-1]:.2f}s"
    )
