"""The job store's guarantees, against a real redis-server."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from pydantic import ValidationError

from shared import keys
from shared.config import Settings
from shared.db import connect
from shared.jobs.leases import Leases
from shared.jobs.record import JobRecord, new_job_id
from shared.jobs.store import JobStore
from shared.schemas import JobInput, Status
from tests.conftest import isolated


@pytest.fixture()
def js(settings) -> Iterator[JobStore]:
    """A Redis database of its own: these records have no turn, and `next_job` sees all of them."""
    store = JobStore(connect(isolated(settings, 9).redis_url), ttl_s=60)
    yield store
    store.r.flushdb()


@pytest.fixture()
def leases(js) -> Leases:
    return Leases(js.r, ttl_s=60, max_attempts=2)


def _new(js: JobStore, tenant: str = "t-store", batch_id: str = "") -> JobRecord:
    return js.create(new_job_id(), tenant, JobInput(prompt="p", num_inference_steps=10), "img", "mask", "k", batch_id)


def test_status_only_moves_forward(js):
    rec = _new(js)
    assert js.transition(rec, Status.running)[0]
    assert not js.transition(rec, Status.queued)[0]
    assert js.transition(rec, Status.succeeded)[0]
    for s in Status:
        moved, before = js.transition(rec, s)
        assert not moved and before is Status.succeeded
    assert js.get(rec.id).status is Status.succeeded
    assert 0 < js.r.ttl(keys.job(rec.id)) <= 60  # finished jobs expire from Redis


def test_concurrent_writers_end_a_job_once(js):
    rec = _new(js)
    js.transition(rec, Status.running)
    wins: list[Status] = []
    barrier = threading.Barrier(9)

    def end(status: Status) -> None:
        barrier.wait()
        if js.transition(rec, status, error={"code": status.value, "message": "x"})[0]:
            wins.append(status)

    threads = [threading.Thread(target=end, args=(s,)) for s in [Status.succeeded, Status.failed, Status.canceled] * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and js.get(rec.id).status is wins[0]


def test_claim_lease_and_attempts(js, leases):
    rec = _new(js)
    assert js.queue_position(rec) is not None
    got = leases.claim(rec, "w1", lease_s=30)
    assert (got.outcome, got.value) == ("claimed", 1.0) and got.rec is not None and got.rec.owner == "w1"
    assert js.queue_position(rec) is None  # no longer waiting
    assert js.r.zscore(keys.tenant_waiting("t-store"), rec.id) is None
    assert js.r.zscore(keys.compatible_waiting("k"), rec.id) is None
    got = leases.claim(rec, "w2", lease_s=30)
    assert got.outcome == "owned" and 0 < got.value <= 30  # a live lease keeps a second worker out
    assert leases.report(rec.id, "w2", 30, 1, 10) == -1  # and its progress is ignored
    assert leases.report(rec.id, "w1", 30, 1, 10) == 0
    assert not leases.release(rec.id, "w2")  # only the owner's lease
    assert leases.release(rec.id, "w1")  # the worker died: the job may be claimed again at once
    assert leases.claim(rec, "w2", lease_s=30).outcome == "claimed"
    assert not js.transition(rec, Status.succeeded, owner="w1")[0]  # the old owner cannot end it
    leases.release(rec.id)
    assert leases.claim(rec, "w3", lease_s=30).outcome == "exhausted"  # max_attempts=2: it fails
    ended = js.get(rec.id)
    assert ended.status is Status.failed and ended.error.code == "worker_lost"
    assert leases.claim(rec, "w4", 30).outcome == "terminal"
    assert not leases.release(rec.id)  # an ended job has no lease to drop


def test_expired_lease_can_be_reclaimed(js, leases):
    rec = _new(js)
    leases.claim(rec, "w1", lease_s=0.2)
    time.sleep(0.3)
    assert leases.claim(rec, "w2", lease_s=30).outcome == "claimed"


def test_cancel_queued_running_and_ended(js, leases):
    q = _new(js)
    assert js.request_cancel(q) == "canceled" and js.get(q.id).status is Status.canceled
    r = _new(js)
    leases.claim(r, "w", 30)
    assert js.request_cancel(r) == "requested"
    assert leases.report(r.id, "w", 30, 2, 10) == 1  # the worker sees the request at its next step
    assert js.request_cancel(q) == "ended"  # already canceled: stays so, and says so
    assert js.request_cancel(JobRecord({"id": "nope", "tenant": "t", "bkey": ""})) == "missing"


def test_queue_position_counts_jobs_ahead(js):
    recs = [_new(js, "t-q") for _ in range(3)]
    positions = [js.queue_position(r) for r in recs]
    assert positions == sorted(positions) and positions[1] == positions[0] + 1
    js.request_cancel(recs[0])
    assert js.queue_position(recs[1]) == positions[0]


def test_a_batch_rows_end_is_counted_with_its_status_once(js, leases):
    batch = f"b{new_job_id()}"
    js.r.hset(keys.batch(batch), "id", batch)
    done, failed, canceled = (_new(js, batch_id=batch) for _ in range(3))
    leases.claim(done, "w", 30)
    assert js.transition(done, Status.succeeded, "w")[0]
    assert not js.transition(done, Status.failed)[0]  # a refused change counts nothing
    leases.claim(failed, "w", 30)
    js.transition(failed, Status.failed, "w", error={"code": "internal", "message": "x"})
    js.request_cancel(canceled)
    js.request_cancel(canceled)
    assert js.r.hmget(keys.batch(batch), ["ended", "failed"]) == ["3", "1"]
    js.r.delete(keys.batch(batch))
    # A batch that expired is not revived by its last rows' ends (it would come back with no TTL).
    late = _new(js, batch_id=batch)
    js.request_cancel(late)
    assert not js.r.exists(keys.batch(batch))


def test_run_alone_and_micro_batch_membership(js, leases):
    lead, mate = _new(js), _new(js)
    leases.claim(lead, "w/a", 30)
    leases.claim(mate, "w/b", 30)
    leases.set_members(lead.id, [(mate.id, "w/b")], 60)
    assert leases.members(lead.id) == [(mate.id, "w/b")]
    assert leases.break_micro_batch(lead.id, "w/a")
    for rec in (js.get(lead.id), js.get(mate.id)):
        assert rec.solo and rec.fields["lease_until"] == "0"
    assert leases.members(lead.id) == [] and not leases.break_micro_batch(lead.id, "w/a")


# The run order: fair queuing per class, interactive before bulk, lapsed leases first.


@pytest.fixture()
def fair(js) -> tuple[JobStore, Leases]:
    return js, Leases(js.r, ttl_s=60, max_attempts=3)


def queue(js: JobStore, tenant: str, n: int, weight: float = 1.0, priority: str = "interactive") -> list[str]:
    params = JobInput(prompt=tenant, num_inference_steps=10, priority=priority)  # type: ignore[arg-type]
    return [js.create(new_job_id(), tenant, params, "i", "m", "k", weight=weight).id for _ in range(n)]


def drain(js: JobStore, leases: Leases) -> list[str]:
    """Tenants in the order free workers would run their jobs (each job claimed, then ended)."""
    order = []
    while (jid := leases.next_job()) is not None:
        got = leases.claim(js.get(jid), "w", 30)
        assert got.outcome == "claimed" and got.rec is not None
        order.append(got.rec.tenant)
        js.transition(got.rec, Status.succeeded, "w")
    return order


def test_tenants_take_turns_however_many_jobs_one_queued(fair):
    js, leases = fair
    queue(js, "a", 6)
    queue(js, "b", 2)
    late = queue(js, "c", 1)  # queued last, behind 8 jobs in submit order
    assert js.queue_position(js.get(late[0])) == 2  # after one job each of a and b
    assert drain(js, leases) == ["a", "b", "c", "a", "b", "a", "a", "a", "a"]


def test_weights_are_shares_of_the_turns(fair):
    js, leases = fair
    queue(js, "heavy", 6, weight=2.0)
    queue(js, "light", 3)
    assert drain(js, leases) == ["heavy", "light", "heavy", "heavy", "light", "heavy", "heavy", "light", "heavy"]


def test_bulk_runs_when_no_interactive_job_waits_and_is_never_starved_after(fair):
    js, leases = fair
    bulk = queue(js, "a", 3, priority="bulk")
    queue(js, "b", 2)
    assert js.queue_position(js.get(bulk[0])) == 2  # behind both interactive jobs, though older
    assert drain(js, leases) == ["b", "b", "a", "a", "a"]
    # interactive traffic that stops lets bulk run at once
    queue(js, "a", 2, priority="bulk")
    queue(js, "b", 1)
    first = leases.next_job()
    assert first is not None and js.get(first).tenant == "b"
    assert drain(js, leases) == ["b", "a", "a"]


def test_a_job_whose_worker_vanished_runs_before_waiting_work(fair):
    js, leases = fair
    (lost,) = queue(js, "a", 1)
    assert leases.claim(js.get(lost), "gone", lease_s=0.2).outcome == "claimed"
    queue(js, "b", 2)
    time.sleep(0.3)  # its lease lapses: the worker is gone
    assert leases.next_job() == lost
    got = leases.claim(js.get(lost), "w", 30)
    assert got.outcome == "claimed" and got.value == 2.0  # its second attempt


@pytest.mark.parametrize("bad", ["heavy:x", "heavy:0", "heavy:-1", "heavy", ":2"])
def test_a_tenant_weight_that_is_not_a_positive_number_is_refused_at_start(bad: str) -> None:
    # Before: accepted here, then every submit of that tenant failed with a 500 (float('x'), or / 0).
    with pytest.raises(ValidationError, match="INPAINT_TENANT_WEIGHTS"):
        Settings(tenant_weights=f"light:0.5,{bad}", _env_file=None)  # type: ignore[call-arg]
    ok = Settings(tenant_weights="heavy:2, light:0.5", _env_file=None)  # type: ignore[call-arg]
    assert (ok.weight_of("heavy"), ok.weight_of("light"), ok.weight_of("other")) == (2.0, 0.5, 1.0)
