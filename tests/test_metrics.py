"""Prometheus metrics scraped after real jobs: the API's service-wide counts and the worker's own."""

from __future__ import annotations

import time
from typing import Any

import httpx
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from api.app import create_app
from shared.jobs.record import new_job_id
from shared.schemas import JobInput
from tests.conftest import auth, isolated, job_body, wait_for


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m: dict[Any, float], name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def api_metrics(client: Any) -> dict[Any, float]:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return scrape(r.text)


def test_counts_after_real_jobs(client, worker, store, storage, settings):
    before = api_metrics(client)
    ok = [client.post("/v1/jobs", headers=auth(), json=job_body(64, 64, seed=i)).json()["id"] for i in range(3)]
    bad = client.post("/v1/jobs", headers=auth(), json=job_body(64, 64)).json()["id"]
    storage.put(store.get(bad).image_key, b"garbage", "image/png")  # fails invalid_input in the worker
    for j in [*ok, bad]:
        wait_for(client, j)
    after = api_metrics(client)
    assert value(after, "inpaint_jobs_submitted_total") - value(before, "inpaint_jobs_submitted_total") == 4
    d = lambda name, **kw: value(after, name, **kw) - value(before, name, **kw)  # noqa: E731
    assert d("inpaint_jobs_finished_total", status="succeeded", code="") == 3
    assert d("inpaint_jobs_finished_total", status="failed", code="invalid_input") == 1
    assert value(after, "inpaint_workers_ready") >= 1
    assert ("inpaint_queue_messages", (("queue", "inpaint"),)) in after

    # A job's counters move just after its end is visible (its manifest and webhook come first).
    deadline = time.monotonic() + 10
    while value(w := scrape(httpx.get(f"http://127.0.0.1:{settings.worker_metrics_port}/metrics").text),
                "inpaint_worker_images_total") < 3:  # fmt: skip
        assert time.monotonic() < deadline, "the worker counted fewer than 3 images"
        time.sleep(0.1)
    assert value(w, "inpaint_worker_batch_size_count") >= 1
    assert value(w, "inpaint_worker_inference_seconds_count") >= 1
    assert value(w, "inpaint_worker_queue_wait_seconds_count") >= 4
    assert value(w, "inpaint_worker_jobs_finished_total", status="failed", code="invalid_input") >= 1


def test_queue_depth_and_oldest_age(settings):
    """A job recorded without its turn, on a database no worker serves, waits for ever: the gauges see
    it until it is canceled."""
    with TestClient(create_app(isolated(settings, 10))) as client:
        store = client.app.state.services.jobs  # type: ignore[attr-defined]
        rec = store.create(new_job_id(), "alice", JobInput(prompt="waits", num_inference_steps=2), "k", "k", "")
        time.sleep(0.3)
        m = api_metrics(client)
        assert value(m, "inpaint_queue_jobs_waiting") == 1
        assert value(m, "inpaint_queue_oldest_age_seconds") >= 0.3
        before = value(m, "inpaint_jobs_finished_total", status="canceled", code="")
        assert store.request_cancel(rec) == "canceled"
        m = api_metrics(client)
        assert value(m, "inpaint_jobs_finished_total", status="canceled", code="") == before + 1
        assert value(m, "inpaint_queue_jobs_waiting") == 0


def test_webhook_deliveries_are_counted(client, worker, webhook_worker, receiver, settings):
    before = api_metrics(client)
    jid = client.post("/v1/jobs", headers=auth(), json=job_body(64, 64, webhook=receiver.url("/m"))).json()["id"]
    wait_for(client, jid)
    receiver.wait("/m", 1)
    deadline = time.monotonic() + 10
    while True:
        after = api_metrics(client)
        delivered = value(after, "inpaint_webhook_deliveries_total", outcome="delivered") - value(
            before, "inpaint_webhook_deliveries_total", outcome="delivered"
        )
        if delivered >= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert delivered >= 1
    hooks = scrape(httpx.get(f"http://127.0.0.1:{settings.webhooks_metrics_port}/metrics").text)
    assert value(hooks, "inpaint_webhook_attempts_total", outcome="delivered") >= 1
