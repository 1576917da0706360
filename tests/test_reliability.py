"""No job lost, none run twice: real faults against real processes (the fault stack, tests/faultstack.py)."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from shared import keys
from shared.jobs.view import manifest_key
from shared.queue import INFERENCE_QUEUE, RUN_TASK, make_celery
from shared.storage import Storage
from stack.services import wait_s3
from tests.conftest import at, auth, job_body
from tests.faultstack import TERMINAL, Stack, outputs_in_s3, submit, terminal_hooks, wait_end

pytestmark = pytest.mark.slow


def test_worker_killed_mid_job_job_completes_once_elsewhere(stack, api, receiver):
    jid = submit(api, prompt="__fault:kill-once__", num_outputs=2, webhook=receiver.url("/kill-once"))
    job = wait_end(api, jid)
    assert job["status"] == "succeeded" and job["attempts"] == 2
    assert len(outputs_in_s3(stack, jid)) == 2
    time.sleep(1.5)
    hooks = terminal_hooks(receiver, "/kill-once")
    assert [h["type"] for h in hooks] == ["job.succeeded"]
    stack.wait_workers(2)  # the killed process was replaced


def test_job_longer_than_visibility_timeout_runs_once(stack, api):
    # Visibility timeout 3 s, job 5 s: the broker hands the message out again while it runs.
    jid = submit(api, prompt="__fault:sleep:5__")
    job = wait_end(api, jid, timeout=60)
    time.sleep(2)
    assert job["status"] == "succeeded" and job["attempts"] == 1
    assert int(stack.store.r.get(keys.fault_runs(jid))) == 1
    assert len(outputs_in_s3(stack, jid)) == 1


def broker_copies(stack: Stack, job_id: str) -> int:
    """Messages for `job_id` in the broker: waiting in the queue or handed out and not yet acknowledged."""
    r = stack.store.r
    return sum(job_id in m for m in [*r.lrange("inpaint", 0, -1), *r.hvals("unacked")])  # type: ignore[union-attr]


def test_copies_of_a_running_jobs_message_wait_as_one_and_do_not_multiply(stack, api):
    # The broker hands out again any message held past its visibility timeout (3 s here), also one
    # that waits for its countdown. Every copy that found its job running elsewhere used to wait and
    # retry by itself, so copies doubled each round (a retry storm). One waits per job; the rest end.
    jid = submit(api, prompt="__fault:sleep:6__")
    stack.wait_running(jid, timeout=30)
    app = make_celery(stack.settings)
    for _ in range(6):
        app.send_task(RUN_TASK, args=[jid], queue=INFERENCE_QUEUE)
    time.sleep(3)
    assert broker_copies(stack, jid) <= 3  # its own message, the one waiter, perhaps a copy of the waiter
    job = wait_end(api, jid, timeout=60)
    assert job["status"] == "succeeded" and job["attempts"] == 1
    deadline = time.monotonic() + 30
    while broker_copies(stack, jid):
        assert time.monotonic() < deadline, broker_copies(stack, jid)
        time.sleep(0.2)
    assert int(stack.store.r.get(keys.fault_runs(jid))) == 1


def queue_behind_busy_workers(stack: Stack, api: TestClient, culprit: str) -> tuple[str, list[str]]:
    """Both workers busy (other batch keys; one for much longer), then a misbehaving job and two
    compatible jobs queued together: the first worker to free up takes all three as one batch."""
    blockers = [submit(api, prompt=f"__fault:sleep:{s}__", guidance_scale=g) for s, g in ((3, 5.0), (14, 6.0))]
    stack.wait_running(*blockers)
    return submit(api, prompt=culprit), [submit(api, seed=s) for s in (1, 2)]


@pytest.mark.parametrize("culprit", ["__fault:hang__", "__fault:sleep:10__"])
def test_a_job_that_breaks_its_batch_fails_alone_and_its_mates_succeed(stack, api, culprit):
    # hang: ignores the soft limit, so the hard limit kills the batch's process; sleep: the soft limit
    # interrupts the batch's call. Either way the batch runs again job by job.
    bad, mates = queue_behind_busy_workers(stack, api, culprit)
    owners: set[str] = set()  # the processes that ran the culprit

    def note_owner() -> None:
        if owner := stack.store.r.hget(keys.job(bad), "owner"):
            owners.add(str(owner).split("/")[0])

    job = wait_end(api, bad, timeout=120, every=0.02, meanwhile=note_owner)
    assert job["status"] == "failed" and job["error"]["code"] == "timeout", job
    if culprit == "__fault:hang__":
        # Each process the hard limit killed has left the ready workers by the time the job reads failed.
        ready = {e["name"] for e in stack.svc.registry.ready()}
        assert owners and not owners & ready, (owners, ready)
    for jid in mates:
        mate = wait_end(api, jid, timeout=120)
        assert mate["status"] == "succeeded" and mate["metrics"]["batch_size"] == 1 and mate["attempts"] == 2, mate
        assert len(outputs_in_s3(stack, jid)) == 1
    assert int(stack.store.r.get(keys.fault_runs(bad))) == 2  # in the batch, then alone
    stack.wait_workers(2)


def test_sigterm_mid_job_finishes_it(stack, api):
    jid = submit(api, prompt="__fault:sleep:3__")
    deadline = time.monotonic() + 30
    while not (owner := stack.store.r.hget(keys.job(jid), "owner")):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child_pid = int(str(owner).split("/")[0].rsplit(":", 1)[1])
    parent = psutil.Process(child_pid).parent()
    assert parent is not None
    target = next(w for w in stack.workers if w.proc is not None and w.proc.pid == parent.pid)
    os.kill(parent.pid, signal.SIGTERM)  # a rolling deploy: warm shutdown
    job = wait_end(api, jid, timeout=60)
    assert job["status"] == "succeeded" and job["attempts"] == 1
    assert target.proc is not None and target.proc.wait(timeout=60) is not None
    stack.workers.remove(target)
    stack.add_worker(f"r{len(stack.workers)}")
    stack.wait_workers(2)


def test_the_next_call_runs_while_the_last_micro_batch_uploads(stack, api):
    """A worker's jobs end (encode, upload, end) behind its next pipeline call: both workers' uploads
    stall for 4 s, yet the jobs queued behind them start meanwhile. (Their own ending waits for the
    stalled one: at most one micro-batch ends behind a call.)"""
    # Two compatibility keys: two calls, one per worker (or one worker's two, the other free).
    slow = [submit(api, prompt="__fault:pause-before-upload:4__", guidance_scale=g) for g in (5.0, 6.0)]
    stack.wait_running(*slow)
    time.sleep(0.5)  # their calls (64×48, 2 steps) are over: each worker is in its stalled upload
    quick = [wait_end(api, j) for j in [submit(api) for _ in range(2)]]
    slow_jobs = [wait_end(api, j) for j in slow]
    assert all(j["status"] == "succeeded" and j["attempts"] == 1 for j in [*slow_jobs, *quick]), slow_jobs
    assert max(at(j["started_at"]) for j in quick) + 2 < min(at(j["finished_at"]) for j in slow_jobs)
    for jid in slow:
        assert len(outputs_in_s3(stack, jid)) == 1


def test_sigterm_while_jobs_end_behind_the_call_ends_them_once(stack, api):
    """A warm shutdown lets the jobs still ending behind the last call end, once, in the process that
    ran them: not left to their leases to run again."""
    jid = submit(api, prompt="__fault:pause-before-upload:3__")
    deadline = time.monotonic() + 30
    while not stack.store.r.get(keys.fault_runs(jid)):  # its call has begun
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)  # and ended: the job is uploading, its message acknowledged
    owner = stack.store.r.hget(keys.job(jid), "owner")
    parent = psutil.Process(int(str(owner).split("/")[0].rsplit(":", 1)[1])).parent()
    assert parent is not None
    target = next(w for w in stack.workers if w.proc is not None and w.proc.pid == parent.pid)
    os.kill(parent.pid, signal.SIGTERM)
    job = wait_end(api, jid, timeout=60)
    assert job["status"] == "succeeded" and job["attempts"] == 1, job
    assert int(stack.store.r.get(keys.fault_runs(jid))) == 1 and len(outputs_in_s3(stack, jid)) == 1
    assert target.proc is not None and target.proc.wait(timeout=60) is not None
    stack.workers.remove(target)
    stack.add_worker(f"r{len(stack.workers)}")
    stack.wait_workers(2)


def test_a_child_killed_mid_call_frees_the_jobs_it_was_ending_behind_at_once(settings, tmp_path):
    """A child dies (SIGKILL) while its last micro-batch still uploads behind the call it runs: the
    parent drops those jobs' leases with the current call's, so they run again as soon as a process
    is free, not once their leases lapse (40 s here: a heartbeat of 10 s)."""
    own = Stack(tmp_path, settings, worker_heartbeat_s=10.0)
    try:
        own.add_worker("solo")
        own.wait_workers(1)
        with TestClient(create_app(own.settings)) as api:
            behind = submit(api, prompt="__fault:pause-before-upload:6__")
            deadline = time.monotonic() + 60
            while not own.store.r.get(keys.fault_runs(behind)):  # its call has begun
                assert time.monotonic() < deadline
                time.sleep(0.05)
            time.sleep(0.5)  # and ended: it uploads behind the next call
            current = submit(api, prompt="__fault:sleep-first:6__")
            own.wait_running(current)
            owner = str(own.store.r.hget(keys.job(current), "owner"))
            assert str(own.store.r.hget(keys.job(behind), "status")) == "running"
            assert str(own.store.r.hget(keys.job(behind), "owner")).split("/")[0] == owner.split("/")[0]
            os.kill(int(owner.split("/")[0].rsplit(":", 1)[1]), signal.SIGKILL)
            killed = time.monotonic()
            while int(own.store.r.get(keys.fault_runs(behind)) or 0) < 2:  # its second call has begun
                assert time.monotonic() - killed < 20, "the job waited for its lease to lapse"
                time.sleep(0.1)
            for jid in (behind, current):
                job = wait_end(api, jid, timeout=90)
                assert job["status"] == "succeeded" and job["attempts"] == 2, job
                assert len(outputs_in_s3(own, jid)) == 1
    finally:
        own.stop()


def test_whole_worker_killed_job_completes_when_a_worker_comes_back(stack, api):
    for w in list(stack.workers):
        w.stop(10)
        stack.workers.remove(w)
    jid = submit(api, prompt="__fault:sleep:2__")
    w = stack.add_worker("solo")
    stack.wait_running(jid, timeout=120)
    for p in [*psutil.Process(w.proc.pid).children(recursive=True), psutil.Process(w.proc.pid)]:  # type: ignore[union-attr]
        p.kill()  # the whole worker at once: a lost machine
    w.proc.wait()  # type: ignore[union-attr]
    stack.workers.remove(w)
    time.sleep(1)
    assert api.get(f"/v1/jobs/{jid}", headers=auth()).json()["status"] == "running"
    stack.add_worker("back")
    job = wait_end(api, jid, timeout=120)
    assert job["status"] == "succeeded" and job["attempts"] == 2
    assert len(outputs_in_s3(stack, jid)) == 1
    stack.add_worker("back2")
    stack.wait_workers(2)


def test_redis_restart_mid_queue_loses_nothing_and_workers_stay_up(stack, api, receiver):
    # Each worker holds a job while Redis is away (different guidance: two batches, not one): one before
    # its pipeline call, one after it, about to upload and end.
    hook = receiver.url("/restart")
    busy = [
        submit(api, prompt="__fault:sleep:4__", guidance_scale=5.0, webhook=hook),
        submit(api, prompt="__fault:pause-before-upload:3__", guidance_scale=6.0, webhook=hook),
    ]
    ids = [submit(api, num_inference_steps=4, webhook=hook) for _ in range(12)]
    stack.wait_running(*busy)
    time.sleep(1.2)  # AOF fsyncs every second
    stack.redis.stop()
    r = api.get(f"/v1/jobs/{ids[0]}", headers=auth())
    assert r.status_code == 503 and r.json()["error"]["code"] == "service_unavailable" and r.headers["Retry-After"]
    r = api.post("/v1/jobs", headers=auth(), json=job_body())
    assert r.status_code == 503
    time.sleep(2)
    stack.redis.start()
    for jid in [*busy, *ids]:
        job = wait_end(api, jid, timeout=120)
        assert job["status"] == "succeeded", jid
        assert len(outputs_in_s3(stack, jid)) == 1, jid
        # An ending whose conclusion met the restart is concluded by the sweeper (CONCLUDE_AFTER_S later).
        deadline = time.monotonic() + 30
        while not stack.storage.get_json(manifest_key("alice", jid)):
            assert time.monotonic() < deadline, jid
            time.sleep(0.2)
    receiver.wait("/restart", len(busy) + len(ids), timeout=60)
    ended = sorted(h["data"]["id"] for h in terminal_hooks(receiver, "/restart"))
    assert ended == sorted([*busy, *ids]), "each job's terminal webhook, once"
    # kombu could not put back a lost connection's messages and the worker died of it (shared/queue.py)
    assert all(w.proc is not None and w.proc.poll() is None for w in stack.workers)
    stack.wait_workers(2)
    assert wait_end(api, submit(api))["status"] == "succeeded"


def test_s3_down_during_upload_fails_storage_unavailable(stack, api):
    jid = submit(api, prompt="__fault:pause-before-upload:2__")
    stack.wait_running(jid, timeout=30)
    assert stack.s3.proc is not None
    stack.s3.proc.kill()  # gone at once, mid-job
    stack.s3.proc.wait()
    try:
        deadline = time.monotonic() + 120
        while (st := stack.store.r.hget(keys.job(jid), "status")) not in TERMINAL:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        rec = stack.store.get(jid)
        assert st == "failed" and rec is not None and rec.error is not None
        assert rec.error.code == "storage_unavailable" and rec.outputs == []
    finally:
        stack.s3.start()
        wait_s3(Storage(stack.settings), 90)
    assert wait_end(api, submit(api))["status"] == "succeeded"


def test_redis_data_loss_jobs_still_answered_from_s3(stack, api):
    ids = [submit(api) for _ in range(3)]
    for jid in ids:
        wait_end(api, jid)
    # Each manifest is written right after its job's terminal status, which the poll may see first.
    deadline = time.monotonic() + 10
    while any(stack.storage.get_json(manifest_key("alice", j)) is None for j in ids):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    stack.store.r.flushall()
    for jid in ids:
        r = api.get(f"/v1/jobs/{jid}", headers=auth())
        assert r.status_code == 200 and r.json()["status"] == "succeeded" and r.json()["outputs"]
    assert api.get(f"/v1/jobs/{ids[0]}", headers=auth("bob")).status_code == 404


def test_tenant_queue_limit_is_a_429_for_that_tenant_only(stack):
    for w in list(stack.workers):  # nothing consumes: jobs stay queued
        w.stop(10)
        stack.workers.remove(w)
    limit = stack.store.waiting_counts("alice")[1] + 2  # anything still queued from earlier tests counts too
    s = stack.settings.model_copy(update={"max_queued_per_tenant": limit})
    with TestClient(create_app(s)) as c:
        ids = [submit(c) for _ in range(2)]
        r = c.post("/v1/jobs", headers=auth(), json=job_body())
        assert r.status_code == 429 and r.json()["error"]["code"] == "tenant_queue_full" and r.headers["Retry-After"]
        assert c.post("/v1/jobs", headers=auth("bob"), json=job_body()).status_code == 202
        c.post(f"/v1/jobs/{ids[0]}/cancel", headers=auth())
        assert c.post("/v1/jobs", headers=auth(), json=job_body()).status_code == 202
    stack.add_worker("c")
    stack.add_worker("d")
    stack.wait_workers(2)
