"""What grows with traffic is bounded or expires: Redis runs `noeviction`, and a process lives for weeks."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from shared import keys
from shared.config import Settings
from shared.jobs import erasure
from shared.jobs.deliveries import PROGRESS_TRACKED, Notifier
from shared.jobs.record import JobRecord, new_job_id
from shared.schemas import JobInput, Status
from shared.services import Services, build_services
from tests.conftest import isolated


@pytest.fixture
def own(settings: Settings) -> Iterator[Services]:
    svc = build_services(isolated(settings, 14).model_copy(update={"retention_s": 1}))
    yield svc
    svc.r.flushdb()
    svc.r.close()


def _job(svc: Services, tenant: str = "alice", **params: object) -> JobRecord:
    job_id = new_job_id()
    return svc.jobs.create(job_id, tenant, JobInput(prompt="x", **params), "k", "k", "c")


def test_a_processs_progress_throttle_forgets_jobs(own: Services) -> None:
    scheduled: list[str] = []

    class Deliveries:
        def schedule(self, d: object) -> None:
            scheduled.append("d")

    notify = Notifier(own.jobs, own.storage, Deliveries())  # type: ignore[arg-type]
    rec = _job(own, webhook="http://127.0.0.1:9/", webhook_events=["progress"])
    for i in range(3 * PROGRESS_TRACKED):  # jobs whose ending this process never saw (they ended elsewhere)
        notify(JobRecord({**rec.fields, "id": f"{i:032x}"}), "progress")
        if i % 1000 == 0:
            time.sleep(0.6)  # older than the throttle's interval: nothing left to remember of them
    assert len(scheduled) == 3 * PROGRESS_TRACKED
    assert len(notify._last_progress) <= PROGRESS_TRACKED + 1


def test_workers_that_died_without_a_word_leave_the_registry(own: Services) -> None:
    info = {"model": "m", "revision": "r", "device": "cpu"}
    for i in range(50):
        own.registry.alive(f"host:{i}", 0.01, info)  # crashed: never beats again
    time.sleep(1.1)
    own.registry.alive("host:live", 10, info)
    assert own.r.zrange(keys.workers(), 0, -1) == ["host:live"]


def test_the_fair_queue_remembers_only_tenants_with_recent_work(own: Services) -> None:
    for t in range(200):
        _job(own, f"tenant-{t}")
    while (job_id := own.leases.next_job()) is not None:
        rec = own.jobs.get(job_id)
        assert own.leases.claim(rec, "w/1", 30).outcome == "claimed"
        own.jobs.transition(rec, Status.succeeded, "w/1")
    assert own.r.zcard(keys.finish_tags("interactive")) <= 1  # the last one's finish is still ahead
    assert not [k for k in own.r.hkeys(keys.fair_queue("interactive")) if k.startswith("t:")]


def test_expiring_images_never_brings_back_a_record_that_expired(own: Services, monkeypatch) -> None:
    rec = _job(own)
    own.jobs.transition(rec, Status.canceled)
    stale = own.jobs.get(rec.id)
    erasure.note_ended(own, stale)
    own.r.delete(keys.job(rec.id))  # the record expired just after the sweeper read it
    monkeypatch.setattr(own.jobs, "get", lambda job_id: stale)
    time.sleep(1.1)
    assert erasure.expire_due(own) == 1
    assert not own.r.exists(keys.job(rec.id)), "a record without its TTL came back"


def test_deleting_a_job_whose_record_just_expired_brings_nothing_back(own: Services) -> None:
    rec = _job(own)
    own.r.delete(keys.job(rec.id))
    assert erasure.mark(own, rec) == "now"
    assert not own.r.exists(keys.job(rec.id))
    assert own.r.ttl(keys.erased(rec.id)) > 0  # the tombstone expires


def test_the_tenant_cap_holds_under_concurrent_submits(settings: Settings) -> None:
    """The caps are checked in the step that queues the job: submits racing for the last places cannot
    all pass a check made before any of them was recorded."""
    from concurrent.futures import ThreadPoolExecutor

    from shared.errors import Problem
    from shared.jobs.submit import submit_job
    from tests.conftest import make_pair, png_bytes

    svc = build_services(isolated(settings, 8).model_copy(update={"max_queued_per_tenant": 10}))
    img, mask = make_pair(64, 48)
    image, mask_png = png_bytes(img), png_bytes(mask)

    def one(_: int) -> str:
        try:
            submit_job(svc, "alice", JobInput(prompt="x", num_inference_steps=2), image, mask_png)
            return "accepted"
        except Problem as p:
            return p.code.value

    try:
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(one, range(48)))
        assert answers.count("accepted") == 10, answers  # 24 were, with the check made before the step
        assert answers.count("tenant_queue_full") == 38
        assert svc.jobs.waiting_counts("alice") == (10, 10)
    finally:
        svc.r.flushdb()
