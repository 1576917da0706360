"""Lost replies against the whole service: the API, two inference workers and the I/O worker reach Redis
through a proxy that lets Redis run a chosen step and then loses its reply (tests/lostreply.py). For each
step that changes state, its reply is lost once; then many jobs from both tenants while a share of every
script's replies is lost. Each job must end exactly once: its outputs download, its manifest says how it
ended, one terminal webhook; a batch finishes with the right counts; the queue keeps serving both
priorities and every tenant."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from shared import keys
from shared.batches.store import _RECORD_ROW
from shared.config import Settings
from shared.jobs import erasure, scripts
from shared.jobs.deliveries import _BEGIN, _CLAIM_DUE, _FINISH, _RETRY, _SCHEDULE_END
from shared.jobs.view import manifest_key
from shared.storage import job_prefix
from tests.conftest import Receiver, auth, job_body
from tests.faultstack import TERMINAL, Stack, terminal_hooks, wait_end
from tests.lostreply import LostReplies, evalsha, sha

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory, settings: Settings) -> Iterator[tuple[Stack, LostReplies]]:
    proxies: list[LostReplies] = []

    def through(port: int) -> str:
        proxies.append(LostReplies(port, seed=7))
        return proxies[0].url

    s = Stack(tmp_path_factory.mktemp("lost"), settings, through=through, webhook_retry_schedule_s="0.5,0.5,0.5")
    s.add_worker("a")
    s.add_worker("b")
    s.wait_workers(2)
    yield s, proxies[0]
    s.stop()
    proxies[0].stop()


@pytest.fixture(scope="module")
def stack(proxied: tuple[Stack, LostReplies]) -> Stack:
    return proxied[0]


@pytest.fixture
def proxy(proxied: tuple[Stack, LostReplies]) -> Iterator[LostReplies]:
    proxied[1].clear()
    yield proxied[1]
    proxied[1].clear()


def post(api: TestClient, path: str, body: dict[str, Any], tenant: str = "alice", key: str | None = None) -> Any:
    """A client that retries a 503 with its Idempotency-Key, as clients of the service should."""
    headers = {**auth(tenant), "Idempotency-Key": key or f"k{random.random()}"}
    for _ in range(10):
        r = api.post(path, headers=headers, json=body)
        if r.status_code != 503:
            return r
        time.sleep(0.5)
    return r


def submit(api: TestClient, tenant: str = "alice", **params: Any) -> str:
    r = post(api, "/v1/jobs", job_body(**params), tenant)
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def complete_once(
    stack: Stack, api: TestClient, receiver: Receiver, path: str, jid: str, tenant: str = "alice"
) -> dict:
    """The job ended once: its manifest, one terminal webhook at `path`, every output downloadable."""
    job = _ended(api, jid, tenant)
    deadline = time.monotonic() + 30
    while (doc := stack.storage.get_json(manifest_key(tenant, jid))) is None:
        assert time.monotonic() < deadline, f"no manifest for {jid}"
        time.sleep(0.1)
    assert doc["status"] == job["status"], doc
    receiver.wait(path, 1, timeout=30)
    time.sleep(1.0)  # a second terminal delivery, if there were one, would be here by now
    hooks = [h for h in terminal_hooks(receiver, path) if h["data"]["id"] == jid]
    assert [h["type"] for h in hooks] == [f"job.{job['status']}"], hooks
    for out in job["outputs"]:
        assert httpx.get(out["url"], timeout=10).status_code == 200, out
    return job


def _ended(api: TestClient, jid: str, tenant: str = "alice", timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        r = api.get(f"/v1/jobs/{jid}", headers=auth(tenant))
        if r.status_code == 200 and r.json()["status"] in TERMINAL:
            return dict(r.json())
        assert time.monotonic() < deadline, r.text
        time.sleep(0.1)


def lost_once(rule: Any) -> None:
    assert len(rule.lost) == 1, "no reply was lost: the test tested nothing"


@pytest.mark.parametrize(
    "step, match",
    [
        ("create", evalsha(scripts.CREATE)),
        ("claim", evalsha(scripts.CLAIM)),
        ("renew", evalsha(scripts.PROGRESS)),
        ("end", evalsha(scripts.TRANSITION)),
        ("schedule-webhook", evalsha(_SCHEDULE_END)),
        ("begin-delivery", evalsha(_BEGIN)),
        ("finish-delivery", evalsha(_FINISH)),
        ("idempotency", lambda g: any(c[0].upper() == b"SET" and c[1].startswith(b"inpaint:idem:") for c in g)),
    ],
)
def test_one_lost_reply_at_each_step_of_a_job(stack, api, receiver, proxy, step, match):
    rule = proxy.lose(match)
    jid = submit(api, webhook=receiver.url(f"/step-{step}"))
    job = complete_once(stack, api, receiver, f"/step-{step}", jid)
    assert job["status"] == "succeeded" and job["attempts"] == 1, job
    lost_once(rule)


def test_a_lost_reply_to_a_cancel_and_to_a_delete(stack, api, receiver, proxy):
    busy = [submit(api, prompt="__fault:sleep:4__", guidance_scale=g) for g in (5.0, 6.0)]
    stack.wait_running(*busy)
    jid = submit(api, webhook=receiver.url("/cancel"))
    rule = proxy.lose(evalsha(scripts.CANCEL))
    r = api.post(f"/v1/jobs/{jid}/cancel", headers=auth())
    assert r.status_code == 200 and r.json()["status"] == "canceled", r.text
    lost_once(rule)
    complete_once(stack, api, receiver, "/cancel", jid)
    rule = proxy.lose(evalsha(erasure._MARK))
    assert api.delete(f"/v1/jobs/{jid}", headers=auth()).status_code == 204
    lost_once(rule)
    assert api.get(f"/v1/jobs/{jid}", headers=auth()).status_code == 404
    assert stack.storage.list_keys(job_prefix("alice", jid)) == []
    for b in busy:
        assert wait_end(api, b)["status"] == "succeeded"


def test_a_lost_reply_while_a_delivery_is_retried(stack, api, receiver, proxy):
    receiver.scripts["/retried"] = [500, 200]
    rules = [proxy.lose(evalsha(_RETRY)), proxy.lose(evalsha(_CLAIM_DUE))]
    jid = submit(api, webhook=receiver.url("/retried"))
    _ended(api, jid)
    receiver.wait("/retried", 2, timeout=30)
    time.sleep(2)
    assert [json.loads(h["body"])["type"] for h in receiver.at("/retried")] == ["job.succeeded"] * 2  # 500, then 200
    for rule in rules:
        lost_once(rule)


def test_a_lost_reply_while_a_batch_records_its_rows(stack, api, proxy):
    rule = proxy.lose(evalsha(_RECORD_ROW))
    row = {"image": job_body()["image"], "mask_image": job_body()["mask"]}
    body = {
        "input_data": {"data": [{"prompt": f"row {i}", **row} for i in range(3)]},
        "parameters": {"num_inference_steps": 3},
    }
    r = post(api, "/v1/batches", body)
    assert r.status_code == 202, r.text
    bid = r.json()["id"]
    deadline = time.monotonic() + 90
    while (b := api.get(f"/v1/batches/{bid}", headers=auth()).json())["status"] not in (
        "succeeded",
        "failed",
        "canceled",
    ):
        assert time.monotonic() < deadline, b
        time.sleep(0.2)
    assert b["status"] == "succeeded" and len(b["jobs"]) == 3, b
    lost_once(rule)


def test_many_jobs_while_a_share_of_every_scripts_replies_is_lost(stack, api, receiver, proxy):
    """Both tenants, both priorities, webhooks, cancels: 2 % of every script's replies lost (with the
    client's one re-send sometimes lost too, so callers' own retries and 503s are exercised)."""
    rule = proxy.lose(evalsha_any, times=10_000, share=0.02)
    jobs: list[tuple[str, str, str]] = []
    for i in range(40):
        tenant = ("alice", "bob")[i % 2]
        path = f"/random-{i}"
        jobs.append(
            (
                submit(api, tenant, priority=("interactive", "bulk")[i % 3 == 0], seed=i, webhook=receiver.url(path)),
                tenant,
                path,
            )
        )
    for jid, tenant, _path in jobs[::7]:
        api.post(f"/v1/jobs/{jid}/cancel", headers=auth(tenant))  # queued, running or ended: each its own answer
    for jid, tenant, path in jobs:
        job = complete_once(stack, api, receiver, path, jid, tenant)
        assert job["status"] in ("succeeded", "canceled"), job
    proxy.clear()
    assert len(rule.lost) >= 5, f"only {len(rule.lost)} replies were lost"
    print(f"lost replies: {len(rule.lost)}, of scripts: {sorted({script_name(g) for g in rule.lost})}")
    # The queue still serves both priorities and both tenants.
    after = [submit(api, t, priority=p) for t in ("alice", "bob") for p in ("interactive", "bulk")]
    for jid, t in zip(after, ["alice", "alice", "bob", "bob"], strict=True):
        assert _ended(api, jid, t, timeout=60)["status"] == "succeeded"
    r = stack.store.r
    assert r.zcard(keys.waiting()) == 0 and r.zcard(keys.ready("interactive")) == 0 and r.zcard(keys.ready("bulk")) == 0


def script_name(group: list[list[bytes]]) -> str:
    from shared.batches import store as batches
    from shared.jobs import deliveries, idempotency, leases, registry

    named = {
        sha(v): k
        for m in (scripts, batches, deliveries, idempotency, erasure, leases, registry)
        for k, v in vars(m).items()
        if isinstance(v, str) and "redis.call" in v
    }
    return next((named.get(c[1], "?") for c in group if c[0].upper() == b"EVALSHA"), "?")


def evalsha_any(group: list[list[bytes]]) -> bool:
    return any(c and c[0].upper() in (b"EVALSHA", b"EVAL") for c in group)
