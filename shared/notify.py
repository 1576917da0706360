"""Turning job events into webhook deliveries on the `webhooks` queue (the API and workers both emit)."""

from __future__ import annotations

import time
import uuid

from celery import Celery

from shared.jobstore import JobRecord, JobStore, rfc3339
from shared.jobview import to_job
from shared.queue import DELIVER_TASK
from shared.storage import Storage

PROGRESS_MIN_INTERVAL_S = 0.5


class Notifier:
    """Enqueues one delivery per event the job subscribed to; progress at most every 500 ms per job."""

    def __init__(self, store: JobStore, storage: Storage, celery: Celery):
        self.store, self.storage, self.celery = store, storage, celery
        self._last_progress: dict[str, float] = {}

    def __call__(self, rec: JobRecord, event: str) -> None:
        params = rec.input
        if not params.webhook or event not in params.webhook_events:
            return
        if event == "progress":
            now = time.monotonic()
            if now - self._last_progress.get(rec.id, 0.0) < PROGRESS_MIN_INTERVAL_S:
                return
            self._last_progress[rec.id] = now
        fresh = self.store.get(rec.id) or rec
        if event == "completed":
            self._last_progress.pop(rec.id, None)
            event_type = f"job.{fresh.status.value}"
            data = None  # an ended job never changes: rebuilt at each attempt so output URLs stay fresh
        else:
            event_type = f"job.{event}"
            data = to_job(fresh, self.storage).model_dump(mode="json")
        self.enqueue(
            rec.id, rec.tenant, params.webhook, f"msg_{uuid.uuid4().hex}", event_type, rfc3339(time.time()), data
        )

    def enqueue(
        self, job_id: str, tenant: str, url: str, msg_id: str, event_type: str, at: str | None, data: object
    ) -> None:
        self.celery.send_task(DELIVER_TASK, args=[job_id, tenant, url, msg_id, event_type, at, data])
