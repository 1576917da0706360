"""Checking a webhook delivery: Standard Webhooks signatures (HMAC-SHA256 over `id.timestamp.body`)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any

TOLERANCE_S = 300  # a delivery older (or further ahead) than five minutes is refused: no replays


class WebhookVerificationError(Exception):
    """The delivery's signature or timestamp does not check out: do not trust its body."""


def _key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix("whsec_"))


def verify_webhook(headers: Mapping[str, str], body: str | bytes, secret: str, now: float | None = None) -> Any:
    """The delivery's payload if its signature and timestamp check out.

    `secret` is your tenant's secret (`client.webhook_secret()`); it may hold several space-separated
    secrets (before and after a rotation): any one of them verifies. Raises `WebhookVerificationError`
    for a forged, altered or replayed delivery.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    msg_id, stamp, signatures = (lowered.get(k, "") for k in ("webhook-id", "webhook-timestamp", "webhook-signature"))
    if not (msg_id and stamp and signatures):
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature")
    try:
        sent = int(stamp)
    except ValueError:
        raise WebhookVerificationError("webhook-timestamp is not a number") from None
    if abs((now if now is not None else time.time()) - sent) > TOLERANCE_S:
        raise WebhookVerificationError("the delivery is too old or from the future")
    raw = body if isinstance(body, bytes) else body.encode()
    signed = f"{msg_id}.{stamp}.".encode() + raw
    given = {sig.partition(",")[2] for sig in signatures.split() if sig.startswith("v1,")}
    for secret_ in secret.split():
        expected = base64.b64encode(hmac.new(_key(secret_), signed, hashlib.sha256).digest()).decode()
        if any(hmac.compare_digest(expected, g) for g in given):
            return json.loads(raw)
    raise WebhookVerificationError("the signature matches none of the secrets")
