"""The one way a job ends, whoever ends it: a worker (succeeded, failed, canceled at a step), a worker's
parent (hard time limit), the API or a batch (canceled while queued), the queue (enqueue failed) or a
claim (worker lost). `end` moves the status; `settle` does what follows, once, for whoever moved it:

1. the manifest in S3 (the durable copy that answers after Redis lets the record go),
2. the terminal webhook (`completed`),
3. the job's scoring batch hears of it (its last job ending finishes the batch).

Outputs are uploaded before a job is marked succeeded; if it had ended meanwhile (canceled, timed
out), `end` deletes them again, so nothing half-written is ever visible.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import redis
from tenacity import retry, retry_if_exception_type, stop_after_attempt, stop_after_delay, wait_exponential

from shared.errors import Code
from shared.jobs import erasure
from shared.jobs.record import JobRecord
from shared.jobs.view import write_manifest
from shared.logs import job_context
from shared.schemas import Status
from shared.services import Services
from shared.storage import StorageError

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])

# Ending a job must survive a Redis restart: wait for Redis rather than lose the outcome.
durably: Callable[[F], F] = retry(  # type: ignore[assignment]
    retry=retry_if_exception_type((redis.ConnectionError, redis.TimeoutError)),
    stop=stop_after_delay(120),
    wait=wait_exponential(multiplier=0.2, max=5),
    reraise=True,
)
# S3 may blink: a manifest is worth a few tries.
_s3_retry = retry(stop=stop_after_attempt(4), wait=wait_exponential(multiplier=0.5, max=8), reraise=True)


def end(
    svc: Services,
    rec: JobRecord,
    status: Status,
    owner: str = "",
    *,
    error: tuple[Code, str] | None = None,
    uploaded: Sequence[str] = (),
    **fields: Any,
) -> bool:
    """End `rec` with `status` (and `error`'s code and message), then settle it. With `owner`, only
    that lease may end it. False when the job had already ended (or is another's): `uploaded`, the
    outputs written for this ending, are deleted then."""
    if error is not None:
        fields["error"] = {"code": str(error[0]), "message": error[1]}
    with job_context(rec.id):
        moved, before = durably(svc.jobs.transition)(rec, status, owner, **fields)
        if not moved:
            if uploaded:
                log.info("job %s ended as %s meanwhile; dropping %d outputs", rec.id, before, len(uploaded))
                discard(svc, list(uploaded))
            return False
        settle(svc, rec.id)
        return True


def cancel(svc: Services, rec: JobRecord) -> str:
    """Cancel `rec`: a queued job ends now (and is settled); a running one stops at its next step.

    Returns 'canceled', 'requested', 'missing' or 'ended' (it had ended already)."""
    outcome = durably(svc.jobs.request_cancel)(rec)
    if outcome == Status.canceled.value:
        settle(svc, rec.id)
    return outcome


def settle(svc: Services, job_id: str) -> JobRecord | None:
    """What follows a job's end: manifest, terminal webhook, its batch. Call it once, from whoever
    moved the job to its terminal status (a claim that found its attempts used up, too)."""
    rec = durably(svc.jobs.get)(job_id)
    if rec is None or not rec.status.is_terminal:
        return rec
    if rec.fields.get("erase") == "1":  # deleted while it ran: its end erases it (no manifest, no webhook)
        erasure.erase(svc, rec)
        return rec
    erasure.note_ended(svc, rec)
    try:
        _s3_retry(write_manifest)(svc.storage, rec)
    except StorageError:
        log.error("job %s: manifest not written; it lives in Redis until its TTL", rec.id)
    svc.notify(rec, "completed")
    if rec.batch_id and durably(svc.batches.wants_step)(rec.batch_id):
        svc.queue.send_batch_step(rec.batch_id)
    return rec


def discard(svc: Services, keys: list[str]) -> None:
    """Delete outputs that must not exist (their job did not succeed); a failure is logged, not raised."""
    try:
        svc.storage.delete(keys)
    except StorageError:
        log.warning("could not delete %d orphaned outputs: %s", len(keys), keys)
