"""Signed webhooks through a real receiver on loopback, SSRF refusals, SSE progress, queue ETA."""

from __future__ import annotations

import base64
import itertools
import json
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from api.app import create_app
from tests.conftest import auth, job_body, wait_for
from workers.io.webhooks import sign_headers

pytestmark = pytest.mark.usefixtures("worker", "webhook_worker")


def test_retries_until_2xx_with_one_id_and_valid_signatures(client, receiver, settings):
    receiver.scripts["/flaky"] = [500, 500, 200]
    job = client.post("/v1/jobs", headers=auth(), json=job_body(webhook=receiver.url("/flaky"))).json()
    wait_for(client, job["id"])
    hits = receiver.wait("/flaky", 3)
    time.sleep(1.0)
    assert len(receiver.at("/flaky")) == 3  # no fourth attempt after the 200
    ids = {h["headers"]["webhook-id"] for h in hits}
    assert len(ids) == 1
    wh = Webhook(client.get("/v1/webhooks/default/secret", headers=auth()).json()["key"])
    for h in hits:
        payload = wh.verify(h["body"], h["headers"])
        assert payload["type"] == "job.succeeded" and payload["data"]["id"] == job["id"]
        assert payload["data"]["status"] == "succeeded" and payload["data"]["outputs"]
    tampered = hits[-1]["body"].replace(b"succeeded", b"failed")
    with pytest.raises(WebhookVerificationError):
        wh.verify(tampered, hits[-1]["headers"])

    log = client.get(f"/v1/jobs/{job['id']}/webhook-deliveries", headers=auth()).json()["data"]
    assert [e["attempt"] for e in log] == [1, 2, 3]
    assert [e.get("status_code") for e in log] == [500, 500, 200]
    assert log[0]["next_retry_at"] and log[-1]["outcome"] == "delivered"
    assert client.get(f"/v1/jobs/{job['id']}/webhook-deliveries", headers=auth("bob")).status_code == 404

    # Redelivery sends the same message id again.
    r = client.post(f"/v1/jobs/{job['id']}/webhook-deliveries/{log[0]['delivery']}/redeliver", headers=auth())
    assert r.status_code == 202
    again = receiver.wait("/flaky", 4)[-1]
    assert again["headers"]["webhook-id"] == log[0]["delivery"] and wh.verify(again["body"], again["headers"])


def test_410_stops_and_redirects_are_failures_not_followed(client, receiver):
    receiver.scripts["/gone"] = [410]
    receiver.scripts["/moved"] = [302]
    a = client.post("/v1/jobs", headers=auth(), json=job_body(webhook=receiver.url("/gone"))).json()
    b = client.post("/v1/jobs", headers=auth(), json=job_body(webhook=receiver.url("/moved"))).json()
    wait_for(client, a["id"])
    wait_for(client, b["id"])
    receiver.wait("/moved", 5)  # the first try and the 4 retries of the test schedule
    time.sleep(1.0)
    assert len(receiver.at("/gone")) == 1
    assert len(receiver.at("/moved")) == 5 and receiver.at("/redirected") == []
    log = client.get(f"/v1/jobs/{b['id']}/webhook-deliveries", headers=auth()).json()["data"]
    assert log[-1]["outcome"] == "gave_up"


def test_event_filter_started_progress_completed(client, receiver):
    body = job_body(
        num_inference_steps=20, webhook=receiver.url("/all"), webhook_events=["started", "progress", "completed"]
    )
    job = wait_for(client, client.post("/v1/jobs", headers=auth(), json=body).json()["id"])
    hits = receiver.wait("/all", 2)
    time.sleep(1.0)
    types = [json.loads(h["body"])["type"] for h in receiver.at("/all")]
    assert "job.started" in types and types.count("job.succeeded") == 1
    # progress at most once per 500 ms, each a delivery of its own
    progress_times = sorted(
        json.loads(h["body"])["timestamp"] for h in receiver.at("/all") if b"job.progress" in h["body"]
    )
    stamps = [datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp() for t in progress_times]
    assert all(b - a >= 0.45 for a, b in itertools.pairwise(stamps))
    assert len({h["headers"]["webhook-id"] for h in hits}) == len(hits)
    assert job["status"] == "succeeded"
    only_done = client.post("/v1/jobs", headers=auth(), json=job_body(webhook=receiver.url("/done"))).json()
    wait_for(client, only_done["id"])
    receiver.wait("/done", 1)
    time.sleep(0.5)
    assert [json.loads(h["body"])["type"] for h in receiver.at("/done")] == ["job.succeeded"]


def test_a_receiver_that_never_answers_costs_the_gpu_nothing(client, receiver):
    """Deliveries wait on their own worker; the inference worker only enqueues them. Measured against a
    receiver that answers at once (the same deliveries enqueued), in alternating rounds, so that what is
    compared is the hang alone. Not equality: this machine's two cores also run the webhook worker, the
    receiver and the test itself."""
    receiver.scripts["/hang"] = [0]
    events = ["started", "progress", "completed"]

    def run(n: int, **extra: Any) -> float:
        t = time.monotonic()
        ids = [client.post("/v1/jobs", headers=auth(), json=job_body(**extra)).json()["id"] for _ in range(n)]
        for jid in ids:
            assert wait_for(client, jid)["status"] == "succeeded"
        return time.monotonic() - t

    run(2, webhook=receiver.url("/ok"), webhook_events=events)  # warm
    answered = hung = 0.0
    for _ in range(3):
        answered += run(5, webhook=receiver.url("/ok"), webhook_events=events)
        hung += run(5, webhook=receiver.url("/hang"), webhook_events=events)
    print(f"15 jobs in {answered:.2f} s with a receiver that answers, {hung:.2f} s with one that never does")
    assert receiver.at("/hang"), "the hanging receiver was called"
    assert hung <= answered / 0.75


SSRF = [
    "http://127.0.0.1/hook", "http://localhost/hook", "http://2130706433/hook", "http://0x7f000001/hook",
    "http://0177.0.0.1/hook", "http://[::1]/hook", "http://[::ffff:127.0.0.1]/hook",
    "http://169.254.169.254/latest/meta-data/", "http://10.0.0.5/hook", "http://192.168.1.1/hook",
    "http://172.16.0.1/hook", "http://0.0.0.0/hook", "http://224.0.0.1/hook", "http://[fe80::1]/hook",
    "ftp://example.com/hook", "http://user:pw@93.184.216.34/hook", "http://100.64.0.1/hook",
]  # fmt: skip


@pytest.fixture(scope="module")
def strict(settings):
    with TestClient(create_app(settings.model_copy(update={"webhook_allow_private": False}))) as c:
        yield c


@pytest.mark.parametrize("url", SSRF)
def test_private_and_odd_webhook_urls_are_refused(strict, url):
    r = strict.post("/v1/jobs", headers=auth(), json=job_body(webhook=url))
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "webhook_url_forbidden" and r.json()["error"]["param"] == "webhook"


def test_rotation_signs_with_every_secret():
    old = "whsec_" + base64.b64encode(b"o" * 32).decode()
    new = "whsec_" + base64.b64encode(b"n" * 32).decode()
    body = '{"type":"job.succeeded"}'
    headers = sign_headers([old, new], "msg_1", body, datetime.now(UTC))
    assert len(headers["webhook-signature"].split()) == 2
    for secret in (old, new):
        Webhook(secret).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + base64.b64encode(b"x" * 32).decode()).verify(body, headers)


def _read_events(resp) -> list[tuple[str, dict[str, Any]]]:
    events, name, data = [], None, None
    for line in resp.iter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data = json.loads(line[6:])
        elif line == "" and name:
            events.append((name, data))
            name = data = None
    return events


def test_sse_streams_progress_in_order_then_the_terminal_event(client):
    job = client.post("/v1/jobs", headers=auth(), json=job_body(num_inference_steps=25)).json()
    with client.stream("GET", f"/v1/jobs/{job['id']}/events", headers=auth()) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = _read_events(resp)
    names = [n for n, _ in events]
    assert names[-1] == "succeeded" and events[-1][1]["outputs"]
    steps = [d["step"] for n, d in events if n == "progress"]
    assert steps == sorted(set(steps)) and len(steps) >= 5
    assert "status" in names

    # A finished job answers its terminal event at once; another tenant gets 404.
    with client.stream("GET", f"/v1/jobs/{job['id']}/events", headers=auth()) as resp:
        assert [n for n, _ in _read_events(resp)] == ["succeeded"]
    assert client.get(f"/v1/jobs/{job['id']}/events", headers=auth("bob")).status_code == 404


def test_queued_jobs_show_position_and_eta(client):
    slow = client.post("/v1/jobs", headers=auth(), json=job_body(128, 128, num_inference_steps=60)).json()
    wait_for(client, slow["id"], until=lambda j: j["status"] == "running")
    waiting = client.post("/v1/jobs", headers=auth(), json=job_body()).json()
    assert waiting["status"] == "queued" and waiting["queue_position"] == 0
    assert waiting["eta_s"] is not None and waiting["eta_s"] > 0
    client.post(f"/v1/jobs/{slow['id']}/cancel", headers=auth())
    done = wait_for(client, waiting["id"])
    assert done["queue_position"] is None and done["eta_s"] is None
