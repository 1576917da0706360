"""Webhook deliveries, signed per Standard Webhooks.

Each delivery keeps its `webhook-id` across retries; each attempt gets a fresh timestamp and
signature. The address is resolved and checked again at delivery and the connection goes to that
checked address (no DNS rebinding).
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

from shared import outbound
from shared.jobs.deliveries import Delivery, event_data, log_attempt
from shared.jobs.record import rfc3339
from shared.jobs.view import find_job
from shared.metrics import WEBHOOK_ATTEMPTS, count
from shared.netguard import DnsUnavailable, Rules, UrlForbidden, check_url, webhook_rules
from shared.services import Services

log = logging.getLogger(__name__)


def sign_headers(secrets: list[str], msg_id: str, body: str, now: datetime) -> dict[str, str]:
    """Standard Webhooks headers; several secrets (during a rotation) give several signatures."""
    sigs = [Webhook(s).sign(msg_id, now, body) for s in secrets]
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": " ".join(sigs),
        "content-type": "application/json",
        "user-agent": "inpaint-webhooks/1",
    }


_http: httpx.Client | None = None


def _client(timeout_s: float) -> httpx.Client:
    """One client per process: building one loads the CA bundle, far dearer than a request."""
    global _http
    if _http is None:
        _http = outbound.client(op_timeout_s=timeout_s)
    return _http


def attempt_delivery(
    url: str,
    headers: dict[str, str],
    body: str,
    timeout_s: float,
    allow_private: bool,
    *,
    tenant: str | None = None,
    rules: Rules | None = None,
) -> int:
    """POST once to the checked address, all of it within `timeout_s`; returns the status code, raises
    on network errors. The reply's body is never read: its status is all a delivery needs, and a body
    (or a compressed bomb) would only cost memory."""
    target = check_url(url, allow_private, tenant=tenant, rules=rules)
    with outbound.call(
        _client(timeout_s), "POST", url, target, deadline_s=timeout_s, headers=headers, content=body.encode()
    ) as resp:
        return resp.status_code


def deliver(svc: Services, d: Delivery) -> float | None:
    """One attempt, logged; the delay before the next one, or None when there is none (delivered,
    410 Gone, a forbidden address, or the retry schedule is used up)."""
    retries_done = d.retries
    settings = svc.settings
    data = d.data
    if data is None:
        rec = find_job(svc.jobs, svc.storage, d.tenant, d.job_id)
        if rec is None:
            log.warning("webhook %s: job %s is gone; not delivered", d.msg_id, d.job_id)
            return None
        data = event_data(rec, svc.storage, settings.public_url)
    if d.event_type.startswith("prediction."):  # Replicate's webhooks carry the prediction object alone
        body = json.dumps(data, separators=(",", ":"))
    else:
        body = json.dumps({"type": d.event_type, "timestamp": d.at, "data": data}, separators=(",", ":"))
    headers = sign_headers(svc.webhook_secrets.signing(d.tenant), d.msg_id, body, datetime.now(UTC))
    entry: dict[str, Any] = {
        "delivery": d.msg_id, "event": d.event_type, "timestamp": d.at, "attempt": retries_done + 1,
        "at": rfc3339(time.time()),
    }  # fmt: skip
    retry = True
    try:
        code = attempt_delivery(
            d.url, headers, body, settings.webhook_timeout_s, settings.webhook_allow_private,
            tenant=d.tenant, rules=webhook_rules(settings),
        )  # fmt: skip
        entry["status_code"] = code
        ok = 200 <= code < 300
        retry = not ok and code != 410  # 410 Gone: the receiver asked us to stop
    except UrlForbidden as exc:
        entry["error"] = f"forbidden: {exc}"
        ok, retry = False, False
    except DnsUnavailable as exc:  # the name did not resolve in time: retried on the schedule
        entry["error"] = f"dns: {exc}"[:300]
        ok = False
    except httpx.HTTPError as exc:
        entry["error"] = f"{type(exc).__name__}: {exc}"[:300]
        ok = False
    except Exception as exc:  # noqa: BLE001 - a URL httpx cannot send: never retried, always logged
        log.warning("webhook %s: cannot be sent (%r)", d.msg_id, exc)
        entry["error"] = f"unsendable: {type(exc).__name__}: {exc}"[:300]
        ok, retry = False, False
    schedule = settings.retry_schedule()
    delay = None
    if not ok and retry and retries_done < len(schedule):
        delay = schedule[retries_done] * random.uniform(0.8, 1.2)
        entry["next_retry_at"] = rfc3339(time.time() + delay)
    entry["outcome"] = "delivered" if ok else ("retrying" if delay is not None else "gave_up")
    WEBHOOK_ATTEMPTS.labels(entry["outcome"]).inc()
    count(svc.r, f"webhook:{entry['outcome']}")
    try:
        log_attempt(svc.r, d.job_id, entry, svc.jobs.ttl_s)
    except Exception:
        log.warning("could not log webhook attempt", exc_info=True)
    return delay
