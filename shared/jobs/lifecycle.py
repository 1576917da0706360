"""The one way a job ends, whoever ends it: a worker (succeeded, failed, canceled at a step), a worker's
parent (hard time limit), the API or a batch (canceled while queued), the queue (enqueue failed) or a
claim (worker lost). `end` moves the status; `conclude` does what follows:

1. the outputs of attempts that did not win are removed,
2. the manifest in S3 (the durable copy that answers after Redis lets the record go),
3. the terminal webhook (`completed`), scheduled once however often this runs,
4. the job's scoring batch hears of it (its last job ending finishes the batch).

The status change itself puts the job among those to conclude (`shared.keys.concluding`), in the same
atomic step; `conclude` takes it out once every part is done. Each part is safe to run again, so
whoever ended the job concludes it at once, and the I/O worker's sweeper (`sweep`) concludes what a
process that died or failed midway left. Outputs are uploaded before a job is marked succeeded; if it
had ended meanwhile (canceled, timed out), `end` deletes them again, so nothing half-written is ever
visible, and nothing after the status change deletes a winner's outputs.
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
from shared.jobs.store import new_step
from shared.jobs.view import write_manifest
from shared.logs import job_context
from shared.schemas import Status
from shared.services import Services
from shared.storage import StorageError, job_prefix

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])
# Named points of an ending, for fault injection in tests: `ended` (the status has changed), `read` (the
# conclusion has read the record), `manifest` (written), `webhook` (scheduled).
Checkpoint = Callable[[str], None]

# Ending a job must survive a Redis restart: wait for Redis rather than lose the outcome. Every step
# retried here is safe to run twice (a step token, `shared.jobs.scripts`).
durably: Callable[[F], F] = retry(  # type: ignore[assignment]
    retry=retry_if_exception_type((redis.ConnectionError, redis.TimeoutError)),
    stop=stop_after_delay(120),
    wait=wait_exponential(multiplier=0.2, max=5),
    reraise=True,
)
# S3 may blink: a manifest is worth a few tries.
_s3_retry = retry(stop=stop_after_attempt(4), wait=wait_exponential(multiplier=0.5, max=8), reraise=True)
CONCLUDE_AFTER_S = 10.0  # an ending not concluded this long after the status change: the sweeper's


def end(
    svc: Services,
    rec: JobRecord,
    status: Status,
    owner: str = "",
    *,
    error: tuple[Code, str] | None = None,
    uploaded: Sequence[str] = (),
    checkpoint: Checkpoint | None = None,
    **fields: Any,
) -> bool:
    """End `rec` with `status` (and `error`'s code and message), then conclude it. With `owner`, only
    that lease may end it. False when the job had already ended (or is another's): `uploaded`, the
    outputs written for this ending, are deleted then.

    Raises `redis.RedisError` only when Redis stayed away so long that whether the status changed is
    unknown: nothing is deleted then (the job's lease lapses and a claim decides)."""
    if error is not None:
        fields["error"] = {"code": str(error[0]), "message": error[1]}
    step = new_step()  # the same on every try: a try whose reply was lost is not taken for a refusal
    with job_context(rec.id):
        moved, before = durably(svc.jobs.transition)(rec, status, owner, step, **fields)
        if not moved:
            if uploaded:
                log.info("job %s ended as %s meanwhile; dropping %d outputs", rec.id, before, len(uploaded))
                discard(svc, list(uploaded))
            return False
        conclude_now(svc, rec.id, checkpoint)
        return True


def cancel(svc: Services, rec: JobRecord) -> str:
    """Cancel `rec`: a queued job ends now (and is concluded); a running one stops at its next step.

    Returns 'canceled', 'requested', 'missing' or 'ended' (it had ended already)."""
    outcome = durably(svc.jobs.request_cancel)(rec, new_step())
    if outcome == Status.canceled.value:
        conclude_now(svc, rec.id)
    return outcome


def conclude_now(svc: Services, job_id: str, checkpoint: Checkpoint | None = None) -> None:
    """`conclude`, by the process that ended the job; what fails is left to the sweeper, never raised:
    the status has changed, and nothing may undo it now."""
    try:
        if checkpoint is not None:
            checkpoint("ended")
        conclude(svc, job_id, checkpoint)
    except Exception:
        log.warning("job %s: its ending is not concluded yet; the sweeper will", job_id, exc_info=True)


def conclude(svc: Services, job_id: str, checkpoint: Checkpoint | None = None) -> JobRecord | None:
    """What follows a job's end: other attempts' outputs removed, manifest, terminal webhook, its batch.
    Safe to run any number of times, by anyone; a job not yet ended is left as it is."""
    rec = durably(svc.jobs.get)(job_id)
    if rec is None:  # expired, or erased: nothing is left to conclude but an erasure's leftovers
        if (tenant := erasure.deleted_by(svc, job_id)) is not None:
            erasure.erase(svc, tenant, job_id)  # a manifest written in the instant of the erasure
        svc.jobs.concluded(job_id, whatever=True)
        return None
    if not rec.status.is_terminal:
        return rec
    if rec.erased:  # deleted: its end erases it (no manifest, no webhook)
        _erase(svc, rec)
        return rec
    if checkpoint is not None:
        checkpoint("read")
    erasure.note_ended(svc, rec)
    _remove_other_attempts(svc, rec)
    try:
        _s3_retry(write_manifest)(svc.storage, rec)
        written = True
    except StorageError:
        log.error("job %s: manifest not written yet; the sweeper tries again", rec.id)
        written = False
    if checkpoint is not None:
        checkpoint("manifest")
    svc.notify(rec, "completed")
    if checkpoint is not None:
        checkpoint("webhook")
    if rec.batch_id and durably(svc.batches.wants_step)(rec.batch_id):
        svc.queue.send_batch_step(rec.batch_id)
    if written and svc.jobs.concluded(job_id) == "erase":  # deleted while this ran
        _erase(svc, rec)
    return rec


def _erase(svc: Services, rec: JobRecord) -> None:
    erasure.erase(svc, rec.tenant, rec.id)
    svc.jobs.concluded(rec.id, whatever=True)


def _remove_other_attempts(svc: Services, rec: JobRecord) -> None:
    """Outputs that no attempt of the ended job stands behind: an earlier attempt's (its worker died
    after uploading, or lost its lease), or any, when the job did not succeed. A job that ran once (or
    never) has none: its own ending discarded what it had uploaded if it did not succeed."""
    if rec.attempts <= 1:
        return
    prefix = job_prefix(rec.tenant, rec.id) + "outputs/"
    keep = f"{prefix}{rec.attempts}/" if rec.status is Status.succeeded else None
    stale = [k for k in svc.storage.list_keys(prefix) if keep is None or not k.startswith(keep)]
    if stale:
        discard(svc, stale)


def sweep(svc: Services, limit: int = 50) -> int:
    """Conclude the endings that their process left (it died, or Redis or S3 failed it midway):
    those still pending `CONCLUDE_AFTER_S` after the status change. How many it took."""
    due = svc.jobs.due_to_conclude(CONCLUDE_AFTER_S, limit)
    for job_id in due:
        with job_context(job_id):
            try:
                conclude(svc, job_id)
            except Exception:
                log.warning("job %s: could not conclude its ending now; next sweep", job_id, exc_info=True)
    return len(due)


def discard(svc: Services, keys: list[str]) -> None:
    """Delete outputs that must not exist (their job did not succeed); a failure is logged, not raised."""
    try:
        svc.storage.delete(keys)
    except StorageError:
        log.warning("could not delete %d orphaned outputs: %s", len(keys), keys)
