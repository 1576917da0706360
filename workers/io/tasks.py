"""Celery tasks of the I/O worker: thin adapters over webhook delivery and scoring-batch steps."""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery import Task

from shared.batches.expander import advance, stalled
from shared.logs import job_context
from shared.queue import BATCH_STEP_TASK, DELIVER_TASK
from shared.services import process_services
from workers.app import app
from workers.io.webhooks import Delivery, deliver

log = logging.getLogger(__name__)

# What to do after a batch step: step again now, shortly, or not until one of its jobs ends.
_NEXT = {"more": 0.0, "wait": 2.0, "busy": 1.0}


@app.task(bind=True, name=DELIVER_TASK, max_retries=None, acks_late=True)
def deliver_webhook(
    self: Task, job_id: str, tenant: str, url: str, msg_id: str, event_type: str, at: str, data: Any
) -> None:
    """One attempt; retried on non-2xx (but 410), timeouts and connection errors along the schedule."""
    d = Delivery(job_id, tenant, url, msg_id, event_type, at, data)
    with job_context(job_id):
        delay = deliver(process_services(), d, self.request.retries)
    if delay is not None:
        raise self.retry(countdown=delay, args=[job_id, tenant, url, msg_id, event_type, at, data])


@app.task(name=BATCH_STEP_TASK, ignore_result=True)
def batch_step(batch_id: str) -> str:
    """A scoring batch's next step (`shared.batches.expander.advance`), and the one after it."""
    svc = process_services()
    try:
        outcome = advance(svc, batch_id)
    except Exception:  # a bug or an outage must not strand the batch, nor retry it for ever
        log.exception("batch %s: step failed", batch_id)
        try:
            outcome = stalled(svc, batch_id)
        except redis.RedisError:  # Redis itself is away: try again later
            outcome = "error"
        svc.queue.send_batch_step(batch_id, 10.0 if outcome in ("wait", "error") else None)
        return outcome
    if outcome in _NEXT:
        svc.queue.send_batch_step(batch_id, _NEXT[outcome] or None)
    return outcome
