"""Webhook deliveries under hostile receivers: each attempt's steps fenced by its claim (a stale attempt
changes nothing of a newer one's, and no step leaves a record that never expires), and one tenant's
hanging receivers hold only its share of the I/O worker's threads."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from shared import keys
from shared.config import Settings
from shared.jobs.deliveries import _DEFER, CLAIM_LEASE_S, Delivery
from shared.services import Services, build_services
from tests.conftest import Receiver, WorkerProcess, isolated, job_body
from tests.hostile import Hostile
from tests.lostreply import LostReplies, evalsha

DB = 12  # no session worker serves it


@pytest.fixture
def svc(settings: Settings) -> Iterator[Services]:
    s = build_services(isolated(settings, DB))
    yield s
    s.r.close()


def _scheduled(svc: Services) -> tuple[str, str]:
    svc.deliveries.schedule(Delivery("j1", "alice", "http://127.0.0.1:9/", "msg_1", "job.progress", "now", {"x": 1}))
    series = svc.r.zrange(keys.deliveries_due(), 0, 0)[0]
    return series, svc.r.hget(keys.delivery(series), "claim")


def _lapse(svc: Services, series: str) -> str:
    """The attempt under way outlives its lease: the delivery is claimed again; the new claim's token."""
    svc.r.zadd(keys.deliveries_due(), {series: time.time() - 1})
    claimed = dict(svc.deliveries.claim_due())
    assert series in claimed
    return claimed[series]


def _no_record_without_ttl(svc: Services) -> None:
    for key in svc.r.scan_iter(keys.delivery("*")):
        assert svc.r.ttl(key) > 0, f"{key} never expires: {svc.r.hgetall(key)}"


def test_a_stale_attempt_changes_nothing_of_a_newer_ones(svc: Services) -> None:
    series, token = _scheduled(svc)
    stale = svc.deliveries.begin(series, token)
    assert stale is not None
    fresh = svc.deliveries.begin(series, _lapse(svc, series))
    assert fresh is not None
    svc.deliveries.retry(stale, 0.0)  # the stale attempt failed: the newer one still holds the delivery
    assert svc.deliveries.claim_due() == [], "a stale attempt's retry handed out a delivery a newer one holds"
    assert json.loads(svc.r.hget(keys.delivery(series), "retries")) == 0
    svc.deliveries.finish(fresh.series)
    svc.deliveries.retry(stale, 0.0)  # after the finish: nothing is made again
    svc.deliveries.defer(stale, 0.0)
    assert not svc.r.exists(keys.delivery(series))
    assert svc.deliveries.claim_due() == []
    _no_record_without_ttl(svc)


def test_a_stale_finish_after_a_new_claim_ends_the_delivery(svc: Services) -> None:
    series, token = _scheduled(svc)
    stale = svc.deliveries.begin(series, token)
    assert stale is not None
    again = _lapse(svc, series)
    svc.deliveries.finish(stale.series)  # sent, late: nothing more is due, not even the newer claim's send
    assert svc.deliveries.begin(series, again) is None
    svc.deliveries.retry(stale, 0.0)
    assert svc.deliveries.claim_due() == [] and not svc.r.exists(keys.delivery(series))
    _no_record_without_ttl(svc)


def test_a_delivery_whose_record_ran_out_is_dropped_not_made_again(svc: Services) -> None:
    series, _ = _scheduled(svc)
    svc.r.delete(keys.delivery(series))  # its TTL ran out while its next attempt was due
    svc.r.zadd(keys.deliveries_due(), {series: time.time() - 1})
    assert svc.deliveries.claim_due() == [], "a delivery with no record was handed out"
    _no_record_without_ttl(svc)
    assert svc.r.zscore(keys.deliveries_due(), series) is None, "it would come due again every lease"


def _bound(field: str) -> float:
    return next(m.le for m in Settings.model_fields[field].metadata if hasattr(m, "le"))


def test_an_attempt_ends_well_inside_its_claims_lease() -> None:
    # An attempt resolves the receiver's name (its own deadline), then posts (the webhook deadline); past
    # the lease a second attempt sends the same message. Ten seconds are left for the job read and Redis.
    longest = _bound("dns_timeout_s") + _bound("webhook_timeout_s")
    assert longest + 10 <= CLAIM_LEASE_S, f"an attempt may take {longest} s of a {CLAIM_LEASE_S} s lease"


def test_a_deferral_whose_reply_was_lost_puts_the_attempt_back_once(settings: Settings, redis_server) -> None:
    proxy = LostReplies(redis_server.port, db=DB)
    svc = build_services(isolated(settings, DB).model_copy(update={"redis_url": proxy.url}))
    try:
        series, token = _scheduled(svc)
        attempt = svc.deliveries.begin(series, token)
        assert attempt is not None
        rule = proxy.lose(evalsha(_DEFER))
        svc.deliveries.defer(attempt, 0.0)
        assert len(rule.lost) == 1, "no reply was lost: the test tested nothing"
        assert dict(svc.deliveries.claim_due()).keys() == {series}, "the deferred attempt never comes back"
        assert json.loads(svc.r.hget(keys.delivery(series), "retries")) == 0, "a deferral counted as a retry"
        _no_record_without_ttl(svc)
    finally:
        svc.r.close()
        proxy.stop()


# --- one tenant's hanging receivers against another tenant's delivery -----------------------------------

THREADS, SHARE, HANGING, TIMEOUT_S = 4, 0.5, 8, 4.0
TENANTS = {"hostile": "key-hostile-0123456789", "good": "key-good-0123456789"}


@pytest.fixture
def shared_worker(settings: Settings, tmp_path: Path) -> Iterator[tuple[Settings, TestClient]]:
    """An API and an I/O worker of `THREADS` threads on a database of their own, with two tenants and no
    inference worker: a queued job canceled is ended by the API, which schedules its terminal webhook."""
    from api.app import create_app

    s = isolated(settings, DB + 1).model_copy(
        update={
            "api_keys": ",".join(f"{t}:{k}" for t, k in TENANTS.items()),
            "webhook_timeout_s": TIMEOUT_S,
            "webhook_retry_schedule_s": "0.2",
            "webhooks_metrics_port": 0,
        }
    )
    hooks = WorkerProcess(
        s, tmp_path / "webhooks.log", "webhooks", "--concurrency", str(THREADS),
        env={"INPAINT_WEBHOOK_TENANT_SHARE": str(SHARE)},
    ).start()  # fmt: skip
    try:
        with TestClient(create_app(s)) as api:
            time.sleep(3)  # the worker consumes
            assert hooks.proc is not None and hooks.proc.poll() is None, hooks.log_tail()
            yield s, api
    finally:
        hooks.stop(10)


def _canceled_with_webhook(api: TestClient, tenant: str, url: str) -> tuple[str, float]:
    head = {"Authorization": f"Bearer {TENANTS[tenant]}"}
    r = api.post("/v1/jobs", headers=head, json=job_body(webhook=url))
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert api.post(f"/v1/jobs/{job_id}/cancel", headers=head).status_code == 200
    return job_id, time.time()


def test_one_tenants_hanging_receivers_hold_only_its_share_of_the_webhook_worker(shared_worker) -> None:
    s, api = shared_worker
    good, silent = Receiver(), Hostile("silent")
    try:
        job_id, ended = _canceled_with_webhook(api, "good", good.url("/hook"))
        arrived = good.arrival("/hook", job_id)
        assert arrived is not None
        alone = arrived - ended
        hostile = [_canceled_with_webhook(api, "hostile", silent.url("/hook"))[0] for _ in range(HANGING)]
        time.sleep(1)  # the hostile deliveries hold what they may of the threads
        job_id, ended = _canceled_with_webhook(api, "good", good.url("/hook"))
        arrived = good.arrival("/hook", job_id)
        delay = None if arrived is None else arrived - ended
        print(f"good tenant's webhook: {alone:.2f} s alone, {delay} s beside {HANGING} hanging deliveries")
        # Behind the hostile attempts it would wait for at least one of them to time out.
        assert delay is not None and delay < alone + TIMEOUT_S * 0.75, (alone, delay)
        svc = build_services(s)
        deadline = time.monotonic() + 40
        while not all(svc.r.llen(keys.deliveries(j)) for j in hostile):  # each attempted, none dropped
            assert time.monotonic() < deadline, [svc.r.llen(keys.deliveries(j)) for j in hostile]
            time.sleep(0.2)
        logged = [json.loads(e) for j in hostile for e in svc.r.lrange(keys.deliveries(j), 0, -1)]
        assert all(e.get("error") for e in logged), logged  # real attempts only: a deferral is not logged
        svc.r.close()
    finally:
        silent.stop()
        good.server.shutdown()
        good.server.server_close()
