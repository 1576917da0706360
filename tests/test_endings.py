"""Every way a job ends leaves the same traces, once: its manifest in S3 and one terminal webhook.

One test per ending path, each through the real API, workers, S3 and webhook worker of the fault
stack (tests/faultstack.py). Whoever ends a job (a worker, a worker's parent, the API, a batch, a
claim) goes through `shared.jobs.lifecycle`, and these tests hold every path to it.
"""

from __future__ import annotations

import json
import time

import psutil
import pytest

from shared import keys
from tests.conftest import auth, job_body
from tests.faultstack import ended_once, manifest_of, outputs_in_s3, submit, wait_end

pytestmark = pytest.mark.slow


def test_succeeded(stack, api, receiver):
    jid = submit(api, webhook=receiver.url("/ok"))
    assert wait_end(api, jid)["status"] == "succeeded"
    ended_once(stack, receiver, "/ok", jid, "succeeded")
    assert len(outputs_in_s3(stack, jid)) == 1


def test_failed_out_of_memory_and_the_next_job_runs(stack, api, receiver):
    jid = submit(api, prompt="__fault:oom__", webhook=receiver.url("/oom"))
    job = wait_end(api, jid)
    assert job["status"] == "failed" and job["error"]["code"] == "out_of_memory"
    ended_once(stack, receiver, "/oom", jid, "failed", "out_of_memory")
    assert outputs_in_s3(stack, jid) == []
    assert wait_end(api, submit(api))["status"] == "succeeded"


def busy_workers(stack, api) -> None:
    """Both workers busy for a few seconds (two compatibility keys: two calls, not one)."""
    stack.wait_running(*[submit(api, prompt="__fault:sleep:6__", guidance_scale=g) for g in (5.0, 6.0)])


def test_a_micro_batch_whose_call_fails_as_a_whole_reruns_its_jobs_one_by_one(stack, api, receiver):
    """Out of memory in a call of three jobs (the fault raises only when a call has more than one row):
    each job runs again alone, under the same claim, and ends once, succeeded. The other worker stays
    busy far longer, so the first one free gathers all three."""
    stack.wait_running(
        *[submit(api, prompt=f"__fault:sleep:{s}__", guidance_scale=g) for s, g in ((5, 5.0), (25, 6.0))]
    )
    ids = [submit(api, prompt="__fault:oom-in-batch__ a"), submit(api, seed=42), submit(api, seed=43)]
    jobs = [wait_end(api, j) for j in ids]
    assert [j["status"] for j in jobs] == ["succeeded"] * 3, jobs
    assert [j["metrics"]["batch_size"] for j in jobs] == [1, 1, 1]  # the call failed; each ran alone
    assert all(j["attempts"] == 1 for j in jobs)
    logs = "".join(w.log_path.read_text(errors="replace") for w in stack.workers)
    assert "a micro-batch of 3 failed (OutOfMemoryError); running its jobs one by one" in logs


def test_canceled_while_queued(stack, api, receiver):
    busy_workers(stack, api)
    jid = submit(api, webhook=receiver.url("/queued"))
    r = api.post(f"/v1/jobs/{jid}/cancel", headers=auth())
    assert r.status_code == 200 and r.json()["status"] == "canceled", r.text
    ended_once(stack, receiver, "/queued", jid, "canceled")
    time.sleep(7)  # the workers free up and its message arrives: it finds the job ended
    assert wait_end(api, jid)["attempts"] == 0 and outputs_in_s3(stack, jid) == []
    assert api.post(f"/v1/jobs/{jid}/cancel", headers=auth()).status_code == 409


def test_canceled_while_queued_through_its_batch(stack, api, receiver):
    busy_workers(stack, api)
    row = {"image": job_body()["image"], "mask_image": job_body()["mask"]}
    params = {"num_inference_steps": 3, "webhook": receiver.url("/batch-cancel")}
    body = {"input_data": {"data": [{"prompt": f"row {i}", **row} for i in range(3)]}, "parameters": params}
    r = api.post("/v1/batches", headers=auth(), json=body)
    assert r.status_code == 202, r.text
    bid = r.json()["id"]
    deadline = time.monotonic() + 30
    while len(jobs := [j for j in api.get(f"/v1/batches/{bid}", headers=auth()).json()["jobs"] if j]) < 3:
        assert time.monotonic() < deadline, jobs
        time.sleep(0.1)
    assert api.post(f"/v1/batches/{bid}/cancel", headers=auth()).status_code == 202
    for jid in jobs:
        assert manifest_of(stack, jid)["status"] == "canceled"
    receiver.wait("/batch-cancel", 3)
    time.sleep(1.0)
    hooks = [json.loads(h["body"]) for h in receiver.at("/batch-cancel")]
    assert sorted(h["data"]["id"] for h in hooks) == sorted(jobs)
    assert {h["type"] for h in hooks} == {"job.canceled"}
    for jid in jobs:  # Redis lets the records go (their TTL): the manifests still answer
        stack.store.r.delete(keys.job(jid))
        assert api.get(f"/v1/jobs/{jid}", headers=auth()).json()["status"] == "canceled"
    deadline = time.monotonic() + 30
    while (b := api.get(f"/v1/batches/{bid}", headers=auth()).json())["manifest_url"] is None:
        assert time.monotonic() < deadline, b
        time.sleep(0.2)
    assert b["status"] == "canceled" and b["counts"]["canceled"] == 3 and b["counts"]["failed"] == 0, b["counts"]


def test_canceled_while_running(stack, api, receiver):
    jid = submit(api, num_inference_steps=150, webhook=receiver.url("/running"))
    deadline = time.monotonic() + 60
    while (job := api.get(f"/v1/jobs/{jid}", headers=auth()).json())["progress"]["step"] < 2:
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    assert api.post(f"/v1/jobs/{jid}/cancel", headers=auth()).status_code == 202
    assert wait_end(api, jid)["status"] == "canceled"
    ended_once(stack, receiver, "/running", jid, "canceled")
    assert outputs_in_s3(stack, jid) == []


def test_worker_lost_a_poison_job_is_not_redelivered_forever(stack, api, receiver):
    jid = submit(api, prompt="__fault:kill__", webhook=receiver.url("/poison"))
    job = wait_end(api, jid, timeout=150)
    assert job["status"] == "failed" and job["error"]["code"] == "worker_lost"
    assert int(stack.store.r.get(keys.fault_runs(jid))) == 3  # three attempts, then no more
    ended_once(stack, receiver, "/poison", jid, "failed", "worker_lost")
    assert outputs_in_s3(stack, jid) == []
    stack.wait_workers(2)
    assert wait_end(api, submit(api))["status"] == "succeeded"


def test_timeout_at_the_hard_limit_and_the_worker_serves_the_next(stack, api, receiver):
    # The job ignores the soft limit: the parent kills the child and ends the job itself.
    jid = submit(api, prompt="__fault:hang__", webhook=receiver.url("/hang"))
    job = wait_end(api, jid, timeout=60)
    assert job["status"] == "failed" and job["error"]["code"] == "timeout"
    ended_once(stack, receiver, "/hang", jid, "failed", "timeout")
    stack.wait_workers(2)
    assert wait_end(api, submit(api))["status"] == "succeeded"


def test_timeout_at_the_soft_limit(stack, api, receiver):
    jid = submit(api, prompt="__fault:sleep:10__", webhook=receiver.url("/soft"))
    job = wait_end(api, jid, timeout=60)
    assert job["status"] == "failed" and job["error"]["code"] == "timeout"
    # The soft path: the child ended its own job (the hard one says so) and lives on to serve the next.
    assert "hard" not in job["error"]["message"], job["error"]
    pid = int(stack.store.r.hget(keys.job(jid), "owner").split("/")[0].rsplit(":", 1)[1])
    assert psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    ended_once(stack, receiver, "/soft", jid, "failed", "timeout")
