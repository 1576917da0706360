"""Celery tasks of the I/O worker: thin adapters over webhook delivery and scoring-batch steps, and
the loop that hands out deliveries as their retries come due (`shared.jobs.deliveries`). One tenant's
attempts hold at most its share of the process's threads (`INPAINT_WEBHOOK_TENANT_SHARE`)."""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Any

import redis
from celery import signals

from shared import keys, tracing
from shared.batches.expander import advance, stalled
from shared.jobs import lifecycle
from shared.jobs.deliveries import Attempt
from shared.jobs.erasure import expire_due
from shared.jobs.lifecycle import durably
from shared.logs import job_context
from shared.queue import BATCH_STEP_TASK, DELIVER_TASK
from shared.services import Services, process_services
from shared.shares import Shares
from workers.app import app
from workers.io.webhooks import deliver

log = logging.getLogger(__name__)

# What to do after a batch step: step again now, shortly, or not until one of its jobs ends.
_NEXT = {"more": 0.0, "wait": 2.0, "busy": 1.0}
DUE_POLL_S = 0.2
RETENTION_SWEEP_S = 10.0
CONCLUDE_SWEEP_S = 2.0
DEFER_S = (0.5, 1.5)  # an attempt past its tenant's share is due again this much later (spread)


_shares = Shares()  # the threads each tenant's attempts hold
_threads = 1  # this worker's concurrency (`--concurrency`), known once Celery builds the worker


def share_size(threads: int, share: float) -> int:
    """A tenant's share of `threads`: at least one, so every tenant's deliveries go out."""
    return max(1, int(threads * share))


@app.task(name=DELIVER_TASK, acks_late=True, ignore_result=True)
def deliver_webhook(series: str, token: str) -> None:
    """One attempt of a delivery under its claim; a failure schedules the next attempt in Redis, and an
    attempt past its tenant's share of the threads waits there for its turn."""
    svc = process_services()
    attempt = svc.deliveries.begin(series, token)
    if attempt is None:
        return  # claimed again since (this message came late), or finished
    d = attempt.delivery
    if svc.r.exists(keys.erased(d.job_id)):
        durably(svc.deliveries.finish)(series)  # the job was deleted: nothing of it is sent after that
        return
    # The open mode (INPAINT_AUTH=none) has one tenant and no other to keep threads for.
    open_mode = svc.settings.auth == "none"
    size = _threads if open_mode else share_size(_threads, svc.settings.webhook_tenant_share)
    with _shares.slot(d.tenant, size) as mine:
        if not mine:
            # Waiting here would hold a thread other tenants need; in Redis it holds nothing.
            svc.deliveries.defer(attempt, random.uniform(*DEFER_S))
            return
        _attempt(svc, attempt)


def _attempt(svc: Services, attempt: Attempt) -> None:
    d = attempt.delivery
    attrs = {"inpaint.job_id": d.job_id, "inpaint.event": d.event_type, "inpaint.attempt": d.retries + 1}
    with job_context(d.job_id), tracing.span("webhook.deliver", d.trace, **attrs):
        delay = deliver(svc, d)
    if delay is None:
        # Sent (or given up): recorded on a replica too, through a failover if one is under way.
        durably(svc.deliveries.finish)(attempt.series)
    else:
        svc.deliveries.retry(attempt, delay)


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


_stop = threading.Event()


def _hand_out_due() -> None:
    """Claim the deliveries whose next attempt is due and send each to the pool, and expire the images
    of jobs past their retention and the uploaded files past their expiry, until shutdown."""
    swept = 0.0
    while not _stop.wait(DUE_POLL_S):
        try:
            svc = process_services()
            for series, token in svc.deliveries.claim_due():
                svc.queue.send_delivery(series, token)
            if time.monotonic() - swept > RETENTION_SWEEP_S:
                swept = time.monotonic()
                expire_due(svc)
                svc.files.expire_due()
        except Exception:  # Redis or the broker away: due work waits, it is not lost
            log.warning("could not hand out due deliveries or expire images and files", exc_info=True)


def _conclude_left_endings() -> None:
    """Conclude the job endings that their process left (it died, or failed midway), until shutdown: on
    a thread of its own, so a slow S3 or an absent Redis never holds up the deliveries falling due."""
    while not _stop.wait(CONCLUDE_SWEEP_S):
        try:
            lifecycle.sweep(process_services())
        except Exception:  # Redis away: the endings wait for the next sweep
            log.warning("could not conclude job endings now", exc_info=True)


@signals.worker_init.connect
def _note_threads(sender: Any = None, **_: Any) -> None:
    global _threads
    if isinstance(getattr(sender, "concurrency", None), int):
        _threads = sender.concurrency


@signals.worker_ready.connect
def _start_due_loop(**_: Any) -> None:
    threading.Thread(target=_hand_out_due, name="deliveries-due", daemon=True).start()
    threading.Thread(target=_conclude_left_endings, name="conclude-sweeper", daemon=True).start()


@signals.worker_shutdown.connect
def _stop_due_loop(**_: Any) -> None:
    _stop.set()
