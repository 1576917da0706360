"""The job store's guarantees, against a real redis-server."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from shared.jobstore import JobStore, new_job_id
from shared.schemas import JobInput, Status


@pytest.fixture()
def js(settings) -> Iterator[JobStore]:
    store = JobStore(settings.redis_url, ttl_s=60, max_attempts=2)
    yield store
    # These records have no broker message: take them out of the shared queue order.
    if _created:
        store.r.zrem(store.queue_key(), *_created)
        _created.clear()


_created: list[str] = []


def _new(js: JobStore, tenant: str = "t-store") -> str:
    jid = new_job_id()
    js.create(jid, tenant, JobInput(prompt="p", num_inference_steps=10), "img", "mask")
    _created.append(jid)
    return jid


def test_status_only_moves_forward(js):
    jid = _new(js)
    assert js.transition(jid, Status.running)[0]
    assert not js.transition(jid, Status.queued)[0]
    assert js.transition(jid, Status.succeeded)[0]
    for s in Status:
        moved, before = js.transition(jid, s)
        assert not moved and before is Status.succeeded
    assert js.get(jid).status is Status.succeeded
    assert 0 < js.r.ttl(js.job_key(jid)) <= 60  # finished jobs expire from Redis


def test_concurrent_writers_end_a_job_once(js):
    jid = _new(js)
    js.transition(jid, Status.running)
    wins: list[Status] = []
    barrier = threading.Barrier(9)

    def end(status: Status) -> None:
        barrier.wait()
        if js.transition(jid, status, error={"code": status.value, "message": "x"})[0]:
            wins.append(status)

    threads = [threading.Thread(target=end, args=(s,)) for s in [Status.succeeded, Status.failed, Status.canceled] * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and js.get(jid).status is wins[0]


def test_claim_lease_and_attempts(js):
    jid = _new(js)
    assert js.queue_position(jid) is not None
    outcome, attempt = js.claim(jid, "w1", lease_s=30)
    assert (outcome, attempt) == ("claimed", 1.0)
    assert js.queue_position(jid) is None  # no longer waiting
    outcome, left = js.claim(jid, "w2", lease_s=30)
    assert outcome == "owned" and 0 < left <= 30  # a live lease keeps a second worker out
    assert js.report(jid, "w2", 30, 1, 10) == -1  # and its progress is ignored
    assert js.report(jid, "w1", 30, 1, 10) == 0
    js.release(jid, "w1")  # the worker died: the job may be claimed again at once
    assert js.claim(jid, "w2", lease_s=30) == ("claimed", 2.0)
    assert not js.transition(jid, Status.succeeded, owner="w1")[0]  # the old owner cannot end it
    js.release(jid)
    outcome, _ = js.claim(jid, "w3", lease_s=30)
    assert outcome == "exhausted"  # max_attempts=2: a job that keeps killing workers fails
    rec = js.get(jid)
    assert rec.status is Status.failed and rec.error.code == "worker_lost"
    assert js.claim(jid, "w4", 30)[0] == "terminal"


def test_expired_lease_can_be_reclaimed(js):
    jid = _new(js)
    js.claim(jid, "w1", lease_s=0.2)
    time.sleep(0.3)
    assert js.claim(jid, "w2", lease_s=30)[0] == "claimed"


def test_cancel_queued_running_and_ended(js):
    q = _new(js)
    assert js.request_cancel(q) == "canceled" and js.get(q).status is Status.canceled
    r = _new(js)
    js.claim(r, "w", 30)
    assert js.request_cancel(r) == "requested"
    assert js.report(r, "w", 30, 2, 10) == 1  # the worker sees the request at its next step
    assert js.request_cancel(q) == "canceled"  # already canceled: stays so
    assert js.request_cancel("nope") == "missing"


def test_queue_position_counts_jobs_ahead(js):
    ids = [_new(js, "t-q") for _ in range(3)]
    positions = [js.queue_position(i) for i in ids]
    assert positions == sorted(positions) and positions[1] == positions[0] + 1
    js.request_cancel(ids[0])
    assert js.queue_position(ids[1]) == positions[0]
