"""Exactly once without anything running once: processes killed between a job's status change and the
end of its conclusion, turns that Celery drops, a DELETE racing a job's ending, a slow start, a parent's
late kill. Real workers of the fault stack (tests/faultstack.py), faults at the points where the races are.
"""

from __future__ import annotations

import time

import httpx
import pytest

from shared import keys
from shared.jobs import inputs
from shared.jobs.lifecycle import CONCLUDE_AFTER_S
from shared.jobs.record import new_job_id
from shared.schemas import JobInput, Status
from shared.storage import job_prefix
from tests.conftest import auth, make_pair, png_bytes
from tests.faultstack import ended_once, manifest_of, outputs_in_s3, submit, wait_end

pytestmark = pytest.mark.slow

# The sweeper takes an ending this long after its status change at the latest (it looks every 2 s).
CONCLUDED_WITHIN_S = CONCLUDE_AFTER_S + 10


def downloads(api, job: dict) -> None:
    assert job["outputs"], job
    for out in job["outputs"]:
        assert httpx.get(out["url"], timeout=10).status_code == 200, out


@pytest.mark.parametrize("point", ["ended", "manifest", "webhook"])
def test_a_child_killed_between_the_status_change_and_the_end_of_its_conclusion(stack, api, receiver, point):
    path = f"/die-after-{point}"
    jid = submit(api, prompt=f"__fault:die-after-{point}__", webhook=receiver.url(path))
    job = wait_end(api, jid)
    assert job["status"] == "succeeded" and job["attempts"] == 1, job
    manifest_of(stack, jid, timeout=CONCLUDED_WITHIN_S)
    ended_once(stack, receiver, path, jid, "succeeded")
    downloads(api, wait_end(api, jid))
    deadline = time.monotonic() + CONCLUDED_WITHIN_S
    while stack.store.r.zscore(keys.concluding(), jid) is not None:  # the sweeper finishes what was left
        assert time.monotonic() < deadline, "its ending was never concluded"
        time.sleep(0.2)
    stack.wait_workers(2)  # the killed child was replaced


def test_a_whole_worker_lost_between_the_status_change_and_its_conclusion(stack, api, receiver):
    jid = submit(api, prompt="__fault:die-all-after-ended__", webhook=receiver.url("/die-all"))
    job = wait_end(api, jid)
    assert job["status"] == "succeeded", job
    manifest_of(stack, jid, timeout=CONCLUDED_WITHIN_S)
    ended_once(stack, receiver, "/die-all", jid, "succeeded")
    downloads(api, wait_end(api, jid))
    dead = [w for w in stack.workers if w.proc is not None and w.proc.poll() is not None]
    assert len(dead) == 1, "the fault was to kill one worker's parent"
    for w in dead:
        w.stop(1)
        stack.workers.remove(w)
        stack.add_worker(f"replaces-{len(stack.workers)}")
    stack.wait_workers(2)


def _job_without_its_turn(stack) -> str:
    """A queued job whose turn never reached the broker: as if Celery had dropped its message."""
    img, mask = make_pair()
    job_id = new_job_id()
    key = job_prefix("alice", job_id) + "inputs"
    stack.storage.put(key, inputs.pack(png_bytes(img), png_bytes(mask)), inputs.CONTENT_TYPE)
    stack.store.create(
        job_id, "alice", JobInput(prompt="no turn", num_inference_steps=3, seed=1), key, key, "k", turn=""
    )
    return job_id


def test_a_queued_job_whose_turn_was_deleted_still_runs(stack, api):
    started = time.monotonic()
    jid = _job_without_its_turn(stack)
    # Two checks of the heartbeat, one lease apart each, then a free worker: the bound docs/reliability.md gives.
    assert wait_end(api, jid, timeout=30)["status"] == "succeeded"
    assert time.monotonic() - started < 3 * max(2.0, 4 * stack.settings.worker_heartbeat_s) + 10


def test_a_turn_that_raises_before_its_claim_loses_no_job(stack, api):
    stack.store.r.set(keys.fault_failing_turns(), 1)
    jid = submit(api)
    deadline = time.monotonic() + 10
    while stack.store.r.get(keys.fault_failing_turns()) != "0":  # its turn raised, and Celery dropped it
        assert time.monotonic() < deadline, "no turn raised: the fault did not happen"
        time.sleep(0.05)
    assert wait_end(api, jid, timeout=30)["status"] == "succeeded"
    stack.store.r.delete(keys.fault_failing_turns())


def test_delete_while_the_ending_is_concluded_is_final(stack, api, receiver):
    # Its conclusion pauses once it has read the record: the DELETE comes between that read and the manifest.
    jid = submit(api, prompt="__fault:pause-after-read:3__", webhook=receiver.url("/deleted"))
    deadline = time.monotonic() + 60
    while stack.store.r.hget(keys.job(jid), "status") != "succeeded":  # ended, its conclusion paused
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert api.delete(f"/v1/jobs/{jid}", headers=auth()).status_code == 204
    deleted_at = time.time()
    assert api.get(f"/v1/jobs/{jid}", headers=auth()).status_code == 404
    assert jid not in [j["id"] for j in api.get("/v1/jobs?limit=100", headers=auth()).json()["data"]]
    time.sleep(6)  # the paused conclusion resumes: manifest, webhook, then it finds the job deleted
    assert api.get(f"/v1/jobs/{jid}", headers=auth()).status_code == 404
    deadline = time.monotonic() + CONCLUDED_WITHIN_S
    while left := stack.storage.list_keys(job_prefix("alice", jid)):
        assert time.monotonic() < deadline, f"objects of a deleted job remain: {left}"
        time.sleep(0.2)
    late = [h for h in receiver.at("/deleted") if h["at"] > deleted_at and b'"job.started"' not in h["body"]]
    assert not late, "a webhook sent after the 204"
    assert not stack.store.r.exists(keys.job(jid))


def test_the_lease_runs_from_the_claim_through_a_slow_start(stack, api):
    stack.wait_workers(2)  # the other worker is there to take the job, were its lease to lapse
    lease_s = max(2.0, 4 * stack.settings.worker_heartbeat_s)
    jid = submit(api, prompt=f"__fault:slow-start:{lease_s * 2:g}__")
    job = wait_end(api, jid, timeout=60)
    assert job["status"] == "succeeded" and job["attempts"] == 1, job
    assert int(stack.store.r.get(keys.fault_runs(jid))) == 1, "another worker ran it while it started"
    assert len(outputs_in_s3(stack, jid)) == 1


def test_a_late_hard_limit_kill_does_not_end_a_job_another_worker_holds(stack, api):
    jid = submit(api, prompt="__fault:hang__")
    stack.wait_running(jid, timeout=30)
    r = stack.store.r
    # A partition, as the job store saw it: another worker re-claimed the job while this child hung.
    r.hset(keys.job(jid), mapping={"owner": "elsewhere/1", "lease_until": repr(time.time() + 60)})
    r.zadd(keys.running(), {jid: time.time() + 60})
    time.sleep(stack.settings.job_time_limit_s + 4)  # the hard limit kills the hung child meanwhile
    rec = stack.store.get(jid)
    assert rec.status is Status.running and rec.fields["owner"] == "elsewhere/1", rec.fields
    assert stack.store.transition(rec, Status.canceled, "elsewhere/1")[0]  # the other worker's end
    stack.wait_workers(2)
