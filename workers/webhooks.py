"""Webhook deliveries, signed per Standard Webhooks, sent by the `inpaint webhooks` worker.

The inference worker only enqueues a delivery (one Redis write); the webhooks worker does the
network I/O, so a slow or dead receiver never holds a GPU. Each delivery keeps its `webhook-id`
across retries; each attempt gets a fresh timestamp and signature. The address is resolved and
checked again at delivery and the connection goes to that checked address (no DNS rebinding).
"""

from __future__ import annotations

import json
import logging
import random
import time
from datetime import UTC, datetime
from typing import Any

import httpx
from standardwebhooks.webhooks import Webhook

from shared.config import get_settings
from shared.jobstore import JobStore, rfc3339
from shared.jobview import find_job, to_job
from shared.logs import job_context
from shared.metrics import WEBHOOK_ATTEMPTS, count
from shared.netguard import UrlForbidden, check_url
from shared.notify import Notifier
from shared.queue import DELIVER_TASK
from shared.storage import Storage
from workers.celery_app import app

log = logging.getLogger(__name__)
_services: tuple[JobStore, Storage] | None = None


def services() -> tuple[JobStore, Storage]:
    """This process's job store and storage, built once (the worker parent, the webhooks worker)."""
    global _services
    if _services is None:
        s = get_settings()
        _services = (JobStore(s.redis_url, s.job_ttl_s, s.job_max_attempts), Storage(s))
    return _services


_notifier: Notifier | None = None


def notify(rec: object, event: str) -> None:
    """The worker's notifier (one per process, so progress throttling sees every event)."""
    global _notifier
    if _notifier is None:
        _notifier = Notifier(*services(), app)
    _notifier(rec, event)  # type: ignore[arg-type]


def sign_headers(secret_setting: str, msg_id: str, body: str, now: datetime) -> dict[str, str]:
    """Standard Webhooks headers; several space-separated secrets (a rotation) give several signatures."""
    sigs = [Webhook(s).sign(msg_id, now, body) for s in secret_setting.split() if s]
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": " ".join(sigs),
        "content-type": "application/json",
        "user-agent": "inpaint-webhooks/1",
    }


def _log_attempt(store: JobStore, job_id: str, entry: dict[str, Any]) -> None:
    key = store.deliveries_key(job_id)
    pipe = store.r.pipeline()
    pipe.rpush(key, json.dumps(entry))
    pipe.ltrim(key, -500, -1)
    pipe.expire(key, store.ttl_s)
    pipe.execute()


_http: httpx.Client | None = None


def _client(timeout_s: float) -> httpx.Client:
    """One client per process: building one loads the CA bundle, far dearer than a request."""
    global _http
    if _http is None:
        _http = httpx.Client(
            timeout=timeout_s,
            follow_redirects=False,  # a 3xx is a failed attempt, never a hop to another host
            trust_env=False,
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
        )
    return _http


def attempt_delivery(url: str, headers: dict[str, str], body: str, timeout_s: float, allow_private: bool) -> int:
    """POST once to the checked address; returns the status code, raises on network errors."""
    target = check_url(url, allow_private)
    addr = target.addresses[0]
    # Connect to the address just checked, not to a second DNS answer (no rebinding window);
    # Host header and TLS SNI still name the host, so virtual hosts and certificates work.
    pinned = httpx.URL(url).copy_with(host=addr, port=target.port)
    default_port = 443 if target.scheme == "https" else 80
    host_header = target.host if target.port == default_port else f"{target.host}:{target.port}"
    resp = _client(timeout_s).post(
        pinned,
        content=body.encode(),
        headers={**headers, "host": host_header},
        extensions={"sni_hostname": target.host},
    )
    return resp.status_code


@app.task(bind=True, name=DELIVER_TASK, max_retries=None, acks_late=True)
def deliver(self: Any, job_id: str, tenant: str, url: str, msg_id: str, event_type: str, at: str, data: Any) -> None:
    """One attempt; retried on non-2xx (but 410), timeouts and connection errors along the schedule."""
    with job_context(job_id):
        _deliver(self, job_id, tenant, url, msg_id, event_type, at, data)


def _deliver(self: Any, job_id: str, tenant: str, url: str, msg_id: str, event_type: str, at: str, data: Any) -> None:
    settings = get_settings()
    store, storage = services()
    snapshot = data
    if data is None:
        rec = find_job(store, storage, tenant, job_id)
        if rec is None:
            log.warning("webhook %s: job %s is gone; not delivered", msg_id, job_id)
            return
        data = to_job(rec, storage).model_dump(mode="json")
    body = json.dumps({"type": event_type, "timestamp": at, "data": data}, separators=(",", ":"))
    now = datetime.now(UTC)
    headers = sign_headers(settings.resolved_webhook_secret(), msg_id, body, now)
    attempt = self.request.retries + 1
    entry: dict[str, Any] = {
        "delivery": msg_id, "event": event_type, "timestamp": at, "attempt": attempt, "at": rfc3339(time.time()),
    }  # fmt: skip
    retry = True
    try:
        code = attempt_delivery(url, headers, body, settings.webhook_timeout_s, settings.webhook_allow_private)
        entry["status_code"] = code
        ok = 200 <= code < 300
        retry = not ok and code != 410  # 410 Gone: the receiver asked us to stop
    except UrlForbidden as exc:
        entry["error"] = f"forbidden: {exc}"
        retry = False
        ok = False
    except httpx.HTTPError as exc:
        entry["error"] = f"{type(exc).__name__}: {exc}"[:300]
        ok = False
    schedule = settings.retry_schedule()
    delay = None
    if not ok and retry and self.request.retries < len(schedule):
        base = schedule[self.request.retries]
        delay = base * random.uniform(0.8, 1.2)
        entry["next_retry_at"] = rfc3339(time.time() + delay)
    entry["outcome"] = "delivered" if ok else ("retrying" if delay is not None else "gave_up")
    WEBHOOK_ATTEMPTS.labels(entry["outcome"]).inc()
    count(store.r, f"webhook:{entry['outcome']}")
    try:
        _log_attempt(store, job_id, entry)
    except Exception:
        log.warning("could not log webhook attempt", exc_info=True)
    if delay is not None:
        raise self.retry(countdown=delay, args=[job_id, tenant, url, msg_id, event_type, at, snapshot])
