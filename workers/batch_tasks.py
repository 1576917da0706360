"""The batch expander: a short task on the webhooks worker's queue that re-queues itself per chunk."""

from __future__ import annotations

import logging
from typing import Any

from shared.config import get_settings
from shared.queue import EXPAND_TASK, WEBHOOK_QUEUE
from workers.celery_app import app

_svc: Any = None
log = logging.getLogger(__name__)


def _services() -> Any:
    global _svc
    if _svc is None:
        from api.app import build_services

        _svc = build_services(get_settings())
    return _svc


@app.task(name=EXPAND_TASK, ignore_result=True)
def expand_batch(batch_id: str) -> str:
    from api.batches import expand_chunk

    try:
        outcome = expand_chunk(_services(), batch_id)
    except Exception:  # a bug or an outage must not strand the batch: try this chunk again later
        log.exception("expanding batch %s failed; retrying in 10s", batch_id)
        app.send_task(EXPAND_TASK, args=[batch_id], queue=WEBHOOK_QUEUE, countdown=10)
        return "error"
    if outcome == "more":
        app.send_task(EXPAND_TASK, args=[batch_id], queue=WEBHOOK_QUEUE)
    elif outcome == "wait":  # the job queue is full: rows wait for the GPUs, they are not rejected
        app.send_task(EXPAND_TASK, args=[batch_id], queue=WEBHOOK_QUEUE, countdown=2)
    return outcome
