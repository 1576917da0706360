"""Webhook deliveries of job events: which to send (`Notifier`) and what each attempt did (the log).

The API and the workers only enqueue a delivery; the I/O worker does the network work
(`workers/io/webhooks.py`), so a slow receiver never holds a GPU.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import redis

from shared import keys
from shared.jobs.record import JobRecord, rfc3339
from shared.jobs.store import JobStore
from shared.jobs.view import to_job
from shared.queue import Queue
from shared.storage import Storage

PROGRESS_MIN_INTERVAL_S = 0.5
TERMINAL_EVENTS = ("job.succeeded", "job.failed", "job.canceled")
_LOG_CAP = 500


class Notifier:
    """Enqueues one delivery per event the job subscribed to; progress at most every 500 ms per job."""

    def __init__(self, store: JobStore, storage: Storage, queue: Queue):
        self.store, self.storage, self.queue = store, storage, queue
        self._last_progress: dict[str, float] = {}

    def __call__(self, rec: JobRecord, event: str) -> None:
        """`event`: started, progress, or completed (any terminal status: the record says which)."""
        params = rec.input
        if not params.webhook or event not in params.webhook_events:
            return
        if event == "progress":
            now = time.monotonic()
            if now - self._last_progress.get(rec.id, 0.0) < PROGRESS_MIN_INTERVAL_S:
                return
            self._last_progress[rec.id] = now
        if event == "completed":
            self._last_progress.pop(rec.id, None)
            event_type = f"job.{rec.status.value}"
            data = None  # an ended job never changes: rebuilt at each attempt so output URLs stay fresh
        else:
            fresh = self.store.get(rec.id) or rec
            event_type = f"job.{event}"
            data = to_job(fresh, self.storage).model_dump(mode="json")
        self.queue.send_delivery(
            rec.id, rec.tenant, params.webhook, f"msg_{uuid.uuid4().hex}", event_type, rfc3339(time.time()) or "", data
        )

    def redeliver(self, rec: JobRecord, delivery: dict[str, Any]) -> None:
        """The same message again (same `webhook-id`, so receivers can de-duplicate), with fresh data."""
        event_type = delivery["event"]
        data = None if event_type in TERMINAL_EVENTS else to_job(rec, self.storage).model_dump(mode="json")
        at = delivery.get("timestamp") or rfc3339(time.time()) or ""
        assert rec.input.webhook
        self.queue.send_delivery(rec.id, rec.tenant, rec.input.webhook, delivery["delivery"], event_type, at, data)


def log_attempt(r: redis.Redis, job_id: str, entry: dict[str, Any], ttl_s: int) -> None:
    """Append one attempt to the job's delivery log (the last 500 are kept, as long as the job)."""
    key = keys.deliveries(job_id)
    pipe = r.pipeline()
    pipe.rpush(key, json.dumps(entry))
    pipe.ltrim(key, -_LOG_CAP, -1)
    pipe.expire(key, ttl_s)
    pipe.execute()


def attempts(r: redis.Redis, job_id: str) -> list[dict[str, Any]]:
    """Every logged attempt, oldest first."""
    return [json.loads(e) for e in r.lrange(keys.deliveries(job_id), 0, -1)]  # type: ignore[union-attr]
