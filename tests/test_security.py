"""Tenants that cannot forge, open or starve each other, tried the way a hostile tenant would."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from pydantic import ValidationError
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from api.app import create_app
from api.limits import LARGE_BODY_ROUTES
from shared import keys
from shared.config import Settings
from shared.jobs.record import new_job_id
from shared.jobs.view import manifest_key
from shared.schemas import JobInput
from shared.services import build_services
from shared.storage import job_prefix
from tests.conftest import (
    KEYS,
    ROOT,
    auth,
    b64,
    isolated,
    job_body,
    make_pair,
    png_bytes,
    serve,
    settings_env,
    wait_for,
)  # fmt: skip


def secret_of(client: TestClient, tenant: str) -> str:
    r = client.get("/v1/webhooks/default/secret", headers=auth(tenant))
    assert r.status_code == 200, r.text
    key = r.json()["key"]
    assert key.startswith("whsec_")
    return str(key)


# 1. Webhooks can be forged across tenants


def test_each_tenant_signs_with_its_own_secret(client, worker, webhook_worker, receiver, svc):
    alice, bob = secret_of(client, "alice"), secret_of(client, "bob")
    assert alice != bob and secret_of(client, "alice") == alice  # made on first use, then kept
    r = client.post("/v1/jobs", headers=auth("bob"), json=job_body(webhook=receiver.url("/bob")))
    wait_for(client, r.json()["id"], "bob")
    hit = receiver.wait("/bob", 1)[0]
    assert Webhook(bob).verify(hit["body"], hit["headers"])["data"]["id"] == r.json()["id"]
    with pytest.raises(WebhookVerificationError):  # alice's secret cannot sign what bob's receiver accepts
        Webhook(alice).verify(hit["body"], hit["headers"])
    # A dump of Redis alone does not reveal a secret.
    dump = [str(svc.r.dump(k)) for k in svc.r.scan_iter("inpaint:*")]
    assert not any(bob.removeprefix("whsec_") in d or alice.removeprefix("whsec_") in d for d in dump)


def test_rotation_keeps_the_previous_secret_signing_for_the_overlap(client, worker, webhook_worker, receiver):
    old = secret_of(client, "bob")
    r = client.post("/v1/webhooks/default/secret/rotate", headers=auth("bob"))
    assert r.status_code == 200, r.text
    new = r.json()["key"]
    assert new != old and secret_of(client, "bob") == new
    job = client.post("/v1/jobs", headers=auth("bob"), json=job_body(webhook=receiver.url("/rotated"))).json()
    wait_for(client, job["id"], "bob")
    hit = receiver.wait("/rotated", 1)[0]
    assert len(hit["headers"]["webhook-signature"].split()) == 2
    for secret in (old, new):
        Webhook(secret).verify(hit["body"], hit["headers"])


def test_the_previous_secret_stops_signing_after_the_overlap(settings, svc):
    from shared.webhook_secrets import WebhookSecrets

    secrets_ = WebhookSecrets(svc.r, settings.model_copy(update={"webhook_rotation_overlap_s": 1}))
    tenant = f"t-{new_job_id()}"
    old = secrets_.current(tenant)
    new = secrets_.rotate(tenant)
    assert secrets_.signing(tenant) == [new, old] and new != old
    time.sleep(1.2)
    assert secrets_.signing(tenant) == [new]


# 2. Auth fails open


@pytest.fixture(scope="module")
def keyless(settings):
    """An API with no key in its environment, in the default (keys) mode."""
    s = settings.model_copy(update={"api_keys": "", "redis_url": settings.redis_url.rsplit("/", 1)[0] + "/5"})
    with TestClient(create_app(s)) as c:
        c.app.state.services.r.flushdb()  # type: ignore[attr-defined]
        yield c


def test_no_key_anywhere_lets_nobody_in(keyless):
    for path in ("/v1/jobs", "/v1/webhooks/default/secret"):
        r = keyless.get(path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", r.text
    assert keyless.post("/v1/jobs", json=job_body()).status_code == 401


def test_open_mode_is_explicit_and_refused_in_production(settings):
    s = settings.model_copy(update={"api_keys": "", "auth": "none"})
    with TestClient(create_app(s)) as c:
        assert c.get("/v1/jobs").status_code == 200  # everyone is tenant `default`
        assert c.get("/readyz").json()["auth"] == "none"
    with pytest.raises(ValidationError, match="INPAINT_AUTH=none"):
        Settings(environment="production", auth="none", **PRODUCTION, _env_file=None)  # type: ignore[call-arg]


def inpaint(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stack.cli", *args], env=settings_env(settings), cwd=ROOT,
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_keys_have_ids_and_revoking_one_is_seen_within_two_seconds(keyless, settings):
    s = settings.model_copy(update={"redis_url": settings.redis_url.rsplit("/", 1)[0] + "/5"})
    made = inpaint(s, "keys", "create", "--tenant", "carol")
    assert made.returncode == 0, made.stderr
    fields = dict(line.split(": ", 1) for line in made.stdout.strip().splitlines())
    key_id, key = fields["id"], fields["key"]
    headers = {"Authorization": f"Bearer {key}"}
    assert keyless.get("/v1/jobs", headers=headers).status_code == 200
    listed = inpaint(s, "keys", "list", "--tenant", "carol")
    assert key_id in listed.stdout and "carol" in listed.stdout and key not in listed.stdout
    assert inpaint(s, "keys", "revoke", key_id).returncode == 0
    time.sleep(2.0)
    assert keyless.get("/v1/jobs", headers=headers).status_code == 401
    assert inpaint(s, "keys", "revoke", key_id).returncode == 1  # no such key any more


# 3. Work before auth


def raw_post(base: str, path: str, length: int, headers: str = "") -> tuple[float, bytes]:
    """Send only the headers of a large POST; seconds until the server answered, and its answer."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        start = time.monotonic()
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{headers}"
            f"Content-Length: {length}\r\n\r\n".encode()
        )
        sock.sendall(b'{"input_data": {"data": [')  # and no more: the body never completes
        answer = sock.recv(4096)
        return time.monotonic() - start, answer


@pytest.mark.parametrize(
    "path", [*sorted(path for _, path in LARGE_BODY_ROUTES), "/v1/models/inpaint/tiny-random/predictions"]
)
def test_no_route_reads_a_body_before_the_key_is_checked(http_api, path):
    """Every route that takes a large body (`api.limits.LARGE_BODY_ROUTES`, and one of the patterns)."""
    took, answer = raw_post(http_api, path, 10_000_000)
    assert answer.startswith(b"HTTP/1.1 401") and took < 2.0, (took, answer[:200])


def test_small_routes_take_small_bodies(http_api):
    _, answer = raw_post(
        http_api, f"/v1/jobs/{'a' * 32}/cancel", 1_000_000, f"Authorization: Bearer {KEYS['alice']}\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


# 4. One tenant can exhaust what all share


def test_every_key_a_batch_creates_expires(client, worker, webhook_worker, svc):
    # Rows that become jobs and rows that are rejected: every key a batch can make is made.
    rows = [row(), row(), {"prompt": "x", "image": "%%%", "mask_image": "%%%"}]
    bid = client.post("/v1/batches", headers=auth(), json={"input_data": {"data": rows}}).json()["id"]
    deadline = time.monotonic() + 60
    while client.get(f"/v1/batches/{bid}", headers=auth()).json()["status"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    made = [k for k in svc.r.scan_iter(f"*{bid}*")]
    assert {keys.batch(bid), keys.batch_jobs(bid), keys.batch_rejected(bid)} <= set(made), made
    assert all(svc.r.ttl(k) > 0 for k in made), {k: svc.r.ttl(k) for k in made}


@pytest.fixture(scope="module")
def capped(settings) -> Iterator[httpx.Client]:
    """The API on uvicorn (streams stay open) over a Redis database no worker consumes, with low caps."""
    s = settings.model_copy(
        update={
            "redis_url": settings.redis_url.rsplit("/", 1)[0] + "/6",
            "max_open_batches_per_tenant": 1,
            "max_batch_rows": 3,
            "max_streams_per_tenant": 2,
            "max_redeliveries_per_minute": 2,
        }
    )
    app = create_app(s)
    app.state.services.r.flushdb()
    with serve(app) as base, httpx.Client(base_url=base, timeout=30) as c:
        yield c


def row() -> dict[str, Any]:
    img, mask = make_pair(64, 64)
    return {"prompt": "x", "image": b64(png_bytes(img)), "mask_image": b64(png_bytes(mask))}


def test_per_tenant_caps_answer_429_with_retry_after(capped):
    r = capped.post("/v1/batches", headers=auth(), json={"input_data": {"data": [row()] * 4}})
    assert r.status_code == 413 and r.json()["error"]["code"] == "batch_too_large", r.text
    assert capped.post("/v1/batches", headers=auth(), json={"input_data": {"data": [row()]}}).status_code == 202
    r = capped.post("/v1/batches", headers=auth(), json={"input_data": {"data": [row()]}})
    assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_batches" and r.headers["Retry-After"]
    assert capped.post("/v1/batches", headers=auth("bob"), json={"input_data": {"data": [row()]}}).status_code == 202


def test_concurrent_event_streams_are_capped_per_tenant(capped):
    ids = [capped.post("/v1/jobs", headers=auth(), json=job_body()).json()["id"] for _ in range(3)]
    bobs = capped.post("/v1/jobs", headers=auth("bob"), json=job_body()).json()["id"]
    with capped.stream("GET", f"/v1/jobs/{ids[0]}/events", headers=auth()) as a:
        with capped.stream("GET", f"/v1/jobs/{ids[1]}/events", headers=auth()) as b:
            assert a.status_code == b.status_code == 200
            r = capped.get(f"/v1/jobs/{ids[2]}/events", headers=auth())
            assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_streams" and r.headers["Retry-After"]
            with capped.stream("GET", f"/v1/jobs/{bobs}/events", headers=auth("bob")) as other:
                assert other.status_code == 200  # another tenant's cap
    with capped.stream("GET", f"/v1/jobs/{ids[2]}/events", headers=auth()) as c:
        assert c.status_code == 200  # a closed stream frees its place


def test_redeliveries_are_capped_per_minute(capped, settings):
    r6 = redis.Redis.from_url(settings.redis_url.rsplit("/", 1)[0] + "/6")
    job = capped.post("/v1/jobs", headers=auth(), json=job_body(webhook="http://127.0.0.1:9/hook")).json()
    r6.rpush(keys.deliveries(job["id"]), json.dumps({"delivery": "msg_1", "event": "job.started", "attempt": 1}))
    path = f"/v1/jobs/{job['id']}/webhook-deliveries/msg_1/redeliver"
    if (left := 60 - time.time() % 60) < 10:  # the cap counts per clock minute: all three in one minute
        time.sleep(left + 0.1)
    assert [capped.post(path, headers=auth()).status_code for _ in range(2)] == [202, 202]
    r = capped.post(path, headers=auth())
    assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_redeliveries" and r.headers["Retry-After"]


def test_all_event_streams_of_a_process_share_one_redis_subscription(capped, svc):
    ids = [capped.post("/v1/jobs", headers=auth(t), json=job_body()).json()["id"] for t in ("alice", "bob")]
    before = len(svc.r.client_list(_type="pubsub"))
    with ExitStack() as stack:
        for jid, tenant in zip(ids, ("alice", "bob"), strict=True):
            for _ in range(2):
                assert (
                    stack.enter_context(
                        capped.stream("GET", f"/v1/jobs/{jid}/events", headers=auth(tenant))
                    ).status_code
                    == 200
                )
        time.sleep(0.5)
        assert len(svc.r.client_list(_type="pubsub")) <= before + 1


def test_slow_dns_for_a_webhook_cannot_starve_the_api(client, monkeypatch):
    real = socket.getaddrinfo

    def slow(host: Any, *args: Any, **kw: Any) -> Any:
        if host == "slow.example":
            time.sleep(6)
        return real(host, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", slow)
    body = job_body(webhook="http://slow.example/hook")
    with ThreadPoolExecutor(60) as pool:
        started = time.monotonic()
        slow_ones = [pool.submit(client.post, "/v1/jobs", headers=auth(), json=body) for _ in range(50)]
        time.sleep(0.5)
        quick = client.get("/v1/jobs?limit=1", headers=auth())
        assert quick.status_code == 200 and time.monotonic() - started < 5
        answers = [f.result(timeout=30) for f in slow_ones]
    # Retryable: a stalled lookup (or a full share of the resolver) is not the URL's fault.
    assert {a.status_code for a in answers} == {503}
    assert {a.json()["error"]["code"] for a in answers} == {"dns_unavailable"}
    assert time.monotonic() - started < 15
    time.sleep(max(0.0, started + 7 - time.monotonic()))  # the lookups that did start are over: later tests resolve


def test_a_batch_whose_input_vanished_or_cannot_be_read_fails_instead_of_retrying_for_ever(settings):
    """The batch's steps run here, on a Redis database no I/O worker consumes."""
    from shared.batches.expander import advance, stalled

    svc = build_services(settings.model_copy(update={"redis_url": settings.redis_url.rsplit("/", 1)[0] + "/7"}))
    key = f"tenants/alice/uploads/{new_job_id()}.jsonl"
    svc.storage.put(key, (json.dumps(row()) + "\n").encode(), "application/x-ndjson")
    gone, stuck = new_job_id(), new_job_id()
    for bid in (gone, stuck):
        svc.batches.create(bid, "alice", key, "jsonl", {}, -1)
    svc.storage.delete([key])
    assert advance(svc, gone) == "more"
    b = svc.batches.get(gone)
    assert b is not None and b.status == "failed" and "gone" in b.fields["error"]
    # Storage or Redis failing step after step: retried, then failed, never for ever.
    outcomes = [stalled(svc, stuck) for _ in range(settings.batch_max_step_errors)]
    assert outcomes == ["wait"] * (settings.batch_max_step_errors - 1) + ["more"]
    b = svc.batches.get(stuck)
    assert b is not None and b.status == "failed" and "failed in a row" in b.fields["error"]


# 5. Manifests are trusted blindly


def test_a_planted_manifest_cannot_point_at_another_tenants_outputs(client, worker, storage, store):
    bobs = wait_for(client, client.post("/v1/jobs", headers=auth("bob"), json=job_body()).json()["id"], "bob")
    bob_key = next(o.key for o in store.get(bobs["id"]).outputs)
    fake = new_job_id()
    planted = {
        "id": fake, "tenant": "alice", "status": "succeeded", "created_at": str(time.time()),
        "input": JobInput(prompt="x").model_dump_json(), "image_key": "x", "mask_key": "x",
        "outputs": json.dumps([{"key": bob_key, "content_type": "image/png", "width": 64, "height": 48}]),
    }  # fmt: skip
    storage.put_json(manifest_key("alice", fake), planted)
    r = client.get(f"/v1/jobs/{fake}", headers=auth())
    assert r.status_code == 200 and r.json()["outputs"] == [], r.text
    assert bob_key not in r.text
    # Nor through Replicate's routes, which serve outputs' bytes themselves.
    prediction = client.get(f"/v1/predictions/{fake}", headers=auth())
    assert prediction.status_code == 200 and prediction.json()["output"] == [], prediction.text
    assert client.get(f"/v1/predictions/{fake}/outputs/0", headers=auth()).status_code == 404


# 6. Test and toy modes reachable in a deployment

PRODUCTION = {
    "s3_secret_access_key": "a-real-long-secret-0123456789",
    "webhook_secret": "whsec_" + "A" * 43 + "=",
    "secrets_key": "b" * 43 + "=",
    "model": "sd2-inpainting",
}


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"fault_injection": True}, "FAULT_INJECTION"),
        ({"model": "tiny-random"}, "toy"),
        ({"model": "classical"}, "toy"),
        ({"model": "sim"}, "toy"),
        ({"model": "inpaint/tiny-random"}, "toy"),  # by its id too
        ({"models": "sd2-inpainting,inpaint/tiny-random-sdxl"}, "toy"),
        ({"safety": "flag", "safety_checker": "tiny-random"}, "toy"),
        ({"s3_secret_access_key": "CHANGE-a-long-random-secret"}, "placeholder"),
        ({"webhook_secret": "whsec_CHANGE"}, "placeholder"),
        ({"api_keys": "acme:CHANGE-a-long-random-key"}, "placeholder"),
    ],
)
def test_production_refuses_toys_and_placeholders(change, match):
    Settings(environment="production", **PRODUCTION, _env_file=None)  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match=match):
        Settings(environment="production", **{**PRODUCTION, **change}, _env_file=None)  # type: ignore[call-arg]


def test_fault_prompts_are_plain_prompts_outside_the_test_environment(settings):
    from workers.gpu.context import WorkerContext
    from workers.gpu.runner import process_job
    from workers.models.loading import load_pipeline

    s = isolated(settings, 12).model_copy(update={"environment": "development", "fault_injection": True})
    svc = build_services(s)
    ctx = WorkerContext(svc, load_pipeline(s), "test:faults")
    img, mask = make_pair(64, 64)
    job_id = new_job_id()
    prefix = job_prefix("alice", job_id)
    svc.storage.put(prefix + "input/image", png_bytes(img), "image/png")
    svc.storage.put(prefix + "input/mask", png_bytes(mask), "image/png")
    svc.jobs.create(job_id, "alice", JobInput(prompt="__fault:oom__", num_inference_steps=2), prefix + "input/image",
                    prefix + "input/mask", "never-batched")  # fmt: skip
    process_job(ctx, job_id)
    assert svc.jobs.get(job_id).status.value == "succeeded"


def test_docs_come_from_this_origin_and_the_page_has_a_csp(client):
    docs = client.get("/docs")
    assert docs.status_code == 200 and "cdn." not in docs.text and "/static/" in docs.text
    csp = client.get("/").headers["content-security-policy"]
    assert "script-src 'self'" in csp and "object-src 'none'" in csp
    assert "content-security-policy" in docs.headers


# 7. Odd webhook URLs vanish silently


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/a\x00b", "http://127.0.0.1:9/a b", "http://127.0.0.1:9/\r\nX: y"])
def test_webhook_urls_that_cannot_be_sent_are_refused_at_submit(client, url):
    r = client.post("/v1/jobs", headers=auth(), json=job_body(webhook=url))
    assert r.status_code == 422 and r.json()["error"]["code"] == "webhook_url_forbidden", r.text


def test_any_delivery_error_is_logged_as_an_attempt(svc):
    from shared.jobs.deliveries import Delivery
    from workers.io.webhooks import deliver

    job_id = new_job_id()
    d = Delivery(job_id, "alice", "http://127.0.0.1:9/a\x00b", "msg_x", "job.started", "now", {"id": job_id})
    assert deliver(svc, d) is None
    log = [json.loads(e) for e in svc.r.lrange(keys.deliveries(job_id), 0, -1)]
    assert log and log[-1]["outcome"] == "gave_up" and log[-1]["error"]
