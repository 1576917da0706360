"""Several hosts, partitions and heals: the service spread over a network test bed (tests/fleet.py).

Each scenario cuts real links or paths between Linux network namespaces, so packets vanish as they
do in a real partition (no refused connections, only silence), then heals them.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from shared import keys
from shared.config import Settings
from shared.storage import job_prefix
from stack.netbed import available
from tests.conftest import job_body
from tests.fleet import Fleet, StatusLog

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, settings: Settings) -> Iterator[Fleet]:
    why = available()
    if why:  # CI runs as root: these tests must run there, so say why they cannot, loudly
        pytest.fail(f"the network test bed {why}")
    f = Fleet(tmp_path_factory.mktemp("fleet"), settings)
    try:
        f.wait_ready(f.add_worker("w1", 11), f.add_worker("w2", 12))
        yield f
    finally:
        f.stop()


def terminal_hooks(fleet: Fleet, path: str, job_id: str) -> list[dict[str, Any]]:
    bodies = [json.loads(h["body"]) for h in fleet.receiver.at(path)]
    return [
        b for b in bodies if b["data"]["id"] == job_id and b["type"] in ("job.succeeded", "job.failed", "job.canceled")
    ]


def outputs(fleet: Fleet, job_id: str) -> dict[str, float]:
    return fleet.svc.storage.modified(job_prefix("alice", job_id) + "outputs/")


def test_a_stale_worker_neither_deletes_nor_overwrites_the_winners_outputs(fleet):
    """A worker cut off from Redis mid-job, past its lease and the visibility timeout: another worker
    finishes the job; the stale one wakes, computes and uploads, and its end is refused after the heal."""
    log = StatusLog(fleet)
    try:
        jid = fleet.submit(
            prompt="__fault:sleep-first:6__", num_inference_steps=3, webhook=fleet.receiver.url("/stale")
        )
        stale = fleet.host_of(fleet.wait_status(jid, "running")["owner"])
        assert stale is not None
        deadline = time.monotonic() + 30
        while fleet.svc.r.get(keys.fault_runs(jid)) is None:  # past its claim and micro-batch: in its stall
            assert time.monotonic() < deadline
            time.sleep(0.02)
        stale.cut_path(fleet.redis_host)
        try:
            job = fleet.wait_end(jid, timeout=90)  # the other worker took the redelivered message
            assert job["status"] == "succeeded" and job["attempts"] == 2, job
            won = outputs(fleet, jid)
            assert len(won) == 1
            # The stale worker wakes, runs (its progress writes fail) and uploads: S3 is still reachable.
            deadline = time.monotonic() + 120
            while outputs(fleet, jid) == won:
                assert time.monotonic() < deadline, fleet.tail(stale.name)
                time.sleep(0.2)
        finally:
            stale.heal_path(fleet.redis_host)
        # Healed: its status change is refused and it removes what it uploaded, nothing else.
        deadline = time.monotonic() + 60
        while set(outputs(fleet, jid)) != set(won):
            assert time.monotonic() < deadline, (outputs(fleet, jid), won)
            time.sleep(0.2)
        time.sleep(1.0)
        assert outputs(fleet, jid) == won  # the winner's objects, untouched since it wrote them
        job = fleet.job(jid)
        assert job["status"] == "succeeded" and job["attempts"] == 2
        for out in job["outputs"]:
            assert httpx.get(out["url"]).status_code == 200
        fleet.receiver.wait("/stale", 1)
        time.sleep(1.0)
        assert [h["type"] for h in terminal_hooks(fleet, "/stale", jid)] == ["job.succeeded"]
        log.forward_only(jid)
    finally:
        log.close()


def broker_copies(fleet: Fleet, job_id: str) -> int:
    """Delivery messages of `job_id` held by the broker: queued, or handed out and not acknowledged."""
    r = fleet.svc.r
    return sum(job_id in m for m in [*r.lrange("webhooks", 0, -1), *r.hvals("unacked")])  # type: ignore[union-attr]


def test_a_receiver_down_longer_than_the_visibility_timeout_gets_each_event_once(fleet):
    """Retries due 1, 4 and 8 s after failures (± 20 %), the broker's visibility timeout 3 s."""
    fleet.receiver.scripts["/down"] = [503, 503, 503, 200]
    jid = fleet.submit(webhook=fleet.receiver.url("/down"))
    assert fleet.wait_end(jid)["status"] == "succeeded"
    most = 0
    deadline = time.monotonic() + 40
    while len(fleet.receiver.at("/down")) < 4:
        most = max(most, broker_copies(fleet, jid))
        assert time.monotonic() < deadline, len(fleet.receiver.at("/down"))
        time.sleep(0.1)
    time.sleep(12)  # any copy of a retry would have come by now
    hits = fleet.receiver.at("/down")
    assert len(hits) == 4, [h["at"] for h in hits]  # three failures, one success, no duplicate
    assert len({h["headers"]["webhook-id"] for h in hits}) == 1
    gaps = [b["at"] - a["at"] for a, b in itertools.pairwise(hits)]
    for gap, due in zip(gaps, (1, 4, 8), strict=True):
        assert 0.8 * due - 0.2 <= gap <= 1.2 * due + 1.0, gaps
    assert most <= 1 and broker_copies(fleet, jid) == 0  # nothing waits in the broker, nothing piles up
    log = fleet.http.get(f"/v1/jobs/{jid}/webhook-deliveries").json()["data"]
    assert [e["outcome"] for e in log] == ["retrying", "retrying", "retrying", "delivered"]


def job_keys(fleet: Fleet) -> set[str]:
    return set(fleet.svc.r.scan_iter(keys.job("*")))


def inputs(fleet: Fleet) -> set[str]:
    return {k for k in fleet.svc.storage.list_keys("tenants/alice/jobs/") if k.endswith("/inputs")}


@pytest.mark.parametrize("peer", ["redis", "s3"])
def test_the_api_cut_off_from_a_dependency_answers_503_fast_and_heals(fleet, peer):
    target = fleet.redis_host if peer == "redis" else fleet.s3_host
    code = "service_unavailable" if peer == "redis" else "storage_unavailable"
    jobs_before, inputs_before = job_keys(fleet), inputs(fleet)
    assert inputs_before, "no job's inputs found: the check below would see nothing"
    fleet.api_host.cut_path(target)
    try:
        for _ in range(2):  # a fresh connection, then one the first attempt may have left behind
            started = time.monotonic()
            r = fleet.http.post("/v1/jobs", json=job_body())
            took = time.monotonic() - started
            assert r.status_code == 503 and r.json()["error"]["code"] == code, r.text
            assert r.headers["Retry-After"] and took < 5.0, took
    finally:
        fleet.api_host.heal_path(target)
    assert job_keys(fleet) == jobs_before  # no half-created job
    deadline = time.monotonic() + 10
    while inputs(fleet) != inputs_before:  # inputs written for a refused submit are removed
        assert time.monotonic() < deadline, inputs(fleet) - inputs_before
        time.sleep(0.2)
    deadline = time.monotonic() + 15
    while (r := fleet.http.post("/v1/jobs", json=job_body())).status_code != 202:  # healed, no restart
        assert time.monotonic() < deadline, r.text
        time.sleep(0.5)
    assert fleet.wait_end(r.json()["id"])["status"] == "succeeded"


def test_a_worker_cut_off_from_s3_during_its_upload_never_succeeds_with_an_output_missing(fleet):
    jid = fleet.submit(prompt="__fault:pause-before-upload:3__", num_outputs=2)
    host = fleet.host_of(fleet.wait_status(jid, "running")["owner"])
    assert host is not None
    host.cut_path(fleet.s3_host)
    try:
        time.sleep(8)
    finally:
        host.heal_path(fleet.s3_host)
    job = fleet.wait_end(jid, timeout=150)
    if job["status"] == "succeeded":
        assert len(job["outputs"]) == 2
        assert all(httpx.get(o["url"]).status_code == 200 for o in job["outputs"])
    else:
        assert job["error"]["code"] == "storage_unavailable" and job["outputs"] == []
        assert outputs(fleet, jid) == {}


def test_scaling_out_and_in_while_a_backlog_drains(fleet):
    """200 jobs; a third worker host joins and takes work within 10 s of being ready; a worker host
    sent SIGTERM finishes its running job and takes no other. None lost, none run twice."""
    log = StatusLog(fleet)
    try:
        with ThreadPoolExecutor(8) as pool:
            ids = list(pool.map(lambda i: fleet.submit(seed=i, num_inference_steps=30, webhook=fleet.receiver.url("/scale")),
                                range(200)))  # fmt: skip
        w3 = fleet.add_worker("w3", 13)
        fleet.wait_ready(w3)
        ready_at = time.time()
        assert fleet.svc.jobs.waiting_counts("alice")[0] > 20, "the backlog drained before the new worker was up"
        first = None
        deadline = time.monotonic() + 30
        while first is None:
            for rec in fleet.svc.jobs.get_many(ids):
                if rec is not None and rec.owner and fleet.host_of(rec.owner) is w3 and rec.started_at:
                    first = rec.started_at if first is None else min(first, rec.started_at)
            assert time.monotonic() < deadline, "the new worker took no job"
            time.sleep(0.1)
        assert first - ready_at < 10.0, first - ready_at
        # Scale in: w2 gets SIGTERM (a rolling deploy), in the middle of a job.
        w2 = fleet.workers["w2"]
        deadline = time.monotonic() + 30
        while not (running := [r for r in fleet.svc.jobs.get_many(ids) if r and r.status.value == "running"
                               and fleet.host_of(r.owner) is w2]):  # fmt: skip
            assert time.monotonic() < deadline
            time.sleep(0.02)
        w2_pids = fleet.children(w2)
        for proc in w2.procs:
            os.kill(proc.pid, signal.SIGTERM)
        stopped_at = time.time()
        for proc in w2.procs:
            assert proc.wait(60) is not None
        for jid in ids:
            assert fleet.wait_end(jid, timeout=300)["status"] == "succeeded", jid
        records = {r.id: r for r in fleet.svc.jobs.get_many(ids) if r is not None}
        assert records[running[0].id].attempts == 1  # finished where it ran, not again elsewhere
        on_w2 = [r for r in records.values() if int(r.owner.split("/")[0].rsplit(":", 1)[1]) in w2_pids]
        late = [r.id for r in on_w2 if (r.started_at or 0) > stopped_at + 0.5]
        assert late == [], late  # w2 took nothing new after its SIGTERM
        assert all(r.attempts == 1 for r in records.values()), [r.id for r in records.values() if r.attempts != 1]
        fleet.receiver.wait("/scale", 200, timeout=60)
        time.sleep(1.0)
        done = [json.loads(h["body"])["data"]["id"] for h in fleet.receiver.at("/scale")]
        assert sorted(done) == sorted(ids)  # one terminal webhook per job
        for jid in ids:
            log.forward_only(jid)
    finally:
        log.close()
    fleet.workers.pop("w2")


def test_redis_killed_and_restarted_from_its_aof_keeps_what_it_acknowledged(fleet):
    """`appendfsync everysec` (the default): what was acknowledged a second before the crash is kept.
    `always`: what was acknowledged at all is kept, at the cost of an fsync per write."""
    for fsync, settle in (("everysec", 1.5), ("always", 0.0)):
        if fleet.redis.appendfsync != fsync:
            fleet.redis.stop()
            fleet.redis.appendfsync = fsync
            fleet.redis.start()
        ids = [fleet.submit(seed=i, num_inference_steps=2) for i in range(20)]
        time.sleep(settle)
        fleet.redis.kill()  # -9: no shutdown save, only what the AOF holds
        fleet.redis.start()
        for jid in ids:
            assert fleet.wait_end(jid, timeout=180)["status"] == "succeeded", (fsync, jid)
