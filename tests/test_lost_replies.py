"""Every step that changes state, run twice: Redis runs it, its reply is lost (tests/lostreply.py), the
client sends it again. Each step must answer as its first run did and change nothing more."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from shared import keys
from shared.batches.store import _ADMIT, _RECORD_ROW
from shared.config import Settings
from shared.jobs import idempotency, lifecycle, scripts
from shared.jobs.deliveries import _BEGIN, _CLAIM_DUE, _RETRY, Delivery
from shared.jobs.view import manifest_key
from shared.queue import INFERENCE_QUEUE
from shared.schemas import JobInput, Status
from shared.services import Services, build_services
from shared.storage import job_prefix
from tests.conftest import auth, isolated, job_body
from tests.lostreply import LostReplies, command, evalsha


@pytest.fixture(scope="module")
def proxy(settings: Settings, redis_server) -> Iterator[LostReplies]:
    p = LostReplies(redis_server.port, db=13)
    yield p
    p.stop()


@pytest.fixture
def lossy(settings: Settings, proxy: LostReplies) -> Iterator[Services]:
    """Services over the proxy, on a database of their own (no worker serves it)."""
    s = isolated(settings, 13)
    proxy.clear()
    svc = build_services(s.model_copy(update={"redis_url": proxy.url}))
    yield svc
    proxy.clear()
    svc.r.close()


def _job(svc: Services, **params: object):
    from shared.jobs.record import new_job_id

    job_id = new_job_id()
    key = job_prefix("alice", job_id) + "inputs"
    return svc.jobs.create(job_id, "alice", JobInput(prompt="x", **params), key, key, "k", turn="t")


def _lost(proxy: LostReplies, rule) -> None:
    assert rule.times == 0 and len(rule.lost) == 1, "the reply was not lost: the test tested nothing"


def test_a_create_run_twice_makes_one_job_with_one_turn(lossy: Services, proxy: LostReplies) -> None:
    rule = proxy.lose(evalsha(scripts.CREATE))
    rec = _job(lossy)
    _lost(proxy, rule)
    r = lossy.r
    assert r.zcard(keys.ready("interactive")) == 1 and r.zcard(keys.waiting()) == 1
    assert r.llen(keys.broker_list(INFERENCE_QUEUE)) == 1, "a second turn for one job"
    assert r.get(keys.sequence()) == "1" and r.hget(keys.stats(), "submitted") == "1"
    assert lossy.leases.next_job() == rec.id


def test_a_claim_run_twice_is_still_ours_and_uses_one_attempt(lossy: Services, proxy: LostReplies) -> None:
    rec = _job(lossy)
    rule = proxy.lose(evalsha(scripts.CLAIM))
    got = lossy.leases.claim(rec, "w/1", 30)
    _lost(proxy, rule)
    assert got.outcome == "claimed" and got.rec is not None and got.rec.attempts == 1
    assert lossy.jobs.get(rec.id).fields["owner"] == "w/1"


def test_an_end_run_twice_is_not_taken_for_a_refusal(lossy: Services, proxy: LostReplies) -> None:
    rec = _job(lossy)
    got = lossy.leases.claim(rec, "w/1", 30)
    out = job_prefix("alice", rec.id) + "outputs/1/0.png"
    lossy.storage.put(out, b"png", "image/png")
    rule = proxy.lose(evalsha(scripts.TRANSITION))
    outputs = [{"key": out, "content_type": "image/png", "width": 1, "height": 1}]
    assert lifecycle.end(lossy, got.rec, Status.succeeded, "w/1", uploaded=[out], outputs=outputs)
    _lost(proxy, rule)
    assert lossy.storage.get(out) == b"png", "the ending deleted the outputs of a job that succeeded"
    assert lossy.storage.get_json(manifest_key("alice", rec.id))["status"] == "succeeded"
    assert lossy.r.zscore(keys.concluding(), rec.id) is None
    assert lossy.r.hget(keys.stats(), "finished:succeeded:") == "1"


def test_a_cancel_run_twice_still_cancels_and_concludes(lossy: Services, proxy: LostReplies) -> None:
    rec = _job(lossy)
    rule = proxy.lose(evalsha(scripts.CANCEL))
    assert lifecycle.cancel(lossy, rec) == "canceled"
    _lost(proxy, rule)
    assert lossy.storage.get_json(manifest_key("alice", rec.id))["status"] == "canceled"
    assert lossy.r.hget(keys.stats(), "finished:canceled:") == "1"


def test_a_batch_row_recorded_twice_counts_once(lossy: Services, proxy: LostReplies) -> None:
    lossy.batches.create("b1", "alice", "in", "jsonl", {}, -1)
    rule = proxy.lose(evalsha(_RECORD_ROW))
    lossy.batches.record_row("b1", 0, 10, "j0")
    _lost(proxy, rule)
    b = lossy.batches.get("b1")
    assert (b.jobs, b.rows_submitted, lossy.batches.job_ids("b1")) == (1, 1, ["j0"])


def test_a_batch_admitted_twice_is_admitted(lossy: Services, proxy: LostReplies) -> None:
    lossy.batches.max_open = 1
    rule = proxy.lose(evalsha(_ADMIT))
    assert lossy.batches.admit("alice", "b1")
    _lost(proxy, rule)


def test_an_idempotency_reservation_run_twice_is_ours(lossy: Services, proxy: LostReplies) -> None:
    rkey = keys.idempotency("alice", "k1").encode()
    rule = proxy.lose(command("SET", rkey))
    began = time.monotonic()
    held, existing = idempotency.reserve(lossy.r, "alice", "k1", "fp")
    _lost(proxy, rule)
    assert held is not None and existing is None and time.monotonic() - began < 5


def test_the_steps_of_a_delivery_run_twice_each_happen_once(lossy: Services, proxy: LostReplies) -> None:
    d = Delivery("j1", "alice", "http://127.0.0.1:9/", "msg_1", "job.progress", "now", {"x": 1})
    lossy.deliveries.schedule(d)
    series = lossy.r.zrange(keys.deliveries_due(), 0, 0)[0]
    token = json.loads(json.dumps(lossy.r.hget(keys.delivery(series), "claim")))
    rule = proxy.lose(evalsha(_BEGIN))
    attempt = lossy.deliveries.begin(series, token)
    assert attempt is not None, "the attempt was lost with the reply"
    _lost(proxy, rule)
    rule = proxy.lose(evalsha(_RETRY))
    lossy.deliveries.retry(attempt, 0.0)
    _lost(proxy, rule)
    assert json.loads(lossy.r.hget(keys.delivery(series), "retries")) == 1, "one failed attempt counted twice"
    rule = proxy.lose(evalsha(_CLAIM_DUE))
    claimed = lossy.deliveries.claim_due()
    _lost(proxy, rule)
    assert [s for s, _ in claimed] == [series], "a due delivery claimed but handed to nobody"


def test_a_terminal_webhook_is_scheduled_once_however_often_the_ending_is_concluded(lossy: Services) -> None:
    rec = _job(lossy, webhook="http://127.0.0.1:9/hook")
    got = lossy.leases.claim(rec, "w/1", 30)
    assert lossy.jobs.transition(got.rec, Status.failed, "w/1", error={"code": "internal", "message": "x"})[0]
    for _ in range(3):
        lifecycle.conclude(lossy, rec.id)
    ends = [s for s in lossy.r.zrange(keys.deliveries_due(), 0, -1) if lossy.r.exists(keys.delivery(s))]
    assert len(ends) == 1


def test_a_submit_with_an_idempotency_key_whose_create_reply_was_lost_makes_one_job(
    settings: Settings, proxy: LostReplies
) -> None:
    from api.app import create_app

    s = isolated(settings, 13).model_copy(update={"redis_url": proxy.url})
    proxy.clear()
    with TestClient(create_app(s)) as api:
        rule = proxy.lose(evalsha(scripts.CREATE), times=2)  # redis-py's one re-send is lost too
        headers = {**auth(), "Idempotency-Key": "once"}
        first = api.post("/v1/jobs", headers=headers, json=job_body())
        _ = rule
        again = api.post("/v1/jobs", headers=headers, json=job_body())
        assert again.status_code == 202, again.text
        if first.status_code == 202:
            assert first.json()["id"] == again.json()["id"]
        else:
            assert first.status_code == 503, first.text
        svc = api.app.state.services
        assert svc.r.zcard(keys.waiting()) == 1, "the client's retry made a second job"
        job_id = again.json()["id"]
        assert svc.storage.get(job_prefix("alice", job_id) + "inputs"), "the inputs of a job that exists were deleted"
    proxy.clear()


def test_a_reservation_left_by_a_request_that_died_frees_the_key(lossy: Services, monkeypatch) -> None:
    monkeypatch.setattr(idempotency, "RESERVE_TTL_S", 1)
    held, _ = idempotency.reserve(lossy.r, "alice", "k2", "fp")
    assert held is not None  # ... and the request dies here: no job, no release
    time.sleep(1.2)
    began = time.monotonic()
    again, existing = idempotency.reserve(lossy.r, "alice", "k2", "fp")
    assert again is not None and existing is None and time.monotonic() - began < 1
