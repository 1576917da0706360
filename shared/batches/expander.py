"""A scoring batch's steps, run by the I/O worker one at a time: read rows into jobs, stop, finish.

A batch's rows live in one JSONL or CSV object in the bucket (an inline `input_data` body is written
there first, so both take one path). Each step turns up to `CHUNK_ROWS` rows into jobs and asks for
the next, so no step runs long and memory stays flat however large the file. Each row's job id is
derived from (batch id, row index) and each row's bookkeeping is one MULTI, so a step that crashes
and runs again neither loses nor duplicates a row. When the job queue is full the step waits instead
of rejecting rows: a batch feeds the GPUs as fast as they drain.

Rows that cannot become jobs are `rejected` with the codes `POST /v1/jobs` would give; with failed
jobs they count against `error_threshold` (-1: never fail the batch; N: fail it, canceling what is
left, once more than N rows failed). A stopped batch (canceled, failed) cancels its jobs a chunk at a
time. The batch finishes (`results.jsonl`, final status) when its last job ends: that job's
`lifecycle.conclude` asks for a step (`BatchStore.wants_step`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis

from shared.batches import images, rows
from shared.batches.results import write_results
from shared.batches.store import ACTIVE, BatchRecord
from shared.errors import Code, Problem
from shared.imaging import ImageError
from shared.jobs import lifecycle
from shared.jobs.submit import FieldsInvalid, submit_job, validate_fields
from shared.services import Services
from shared.storage import ObjectMissing, StorageError

log = logging.getLogger(__name__)

CHUNK_ROWS = 100
CHUNK_SECONDS = 10.0
_WAIT = {Code.queue_full, Code.tenant_queue_full, Code.service_unavailable}


def advance(svc: Services, batch_id: str) -> str:
    """One step. What the caller does next: 'more' (step again now), 'wait' or 'busy' (again shortly),
    'idle' (nothing until one of its jobs ends), 'done' (finished) or 'gone'."""
    if not svc.batches.lock(batch_id, int(CHUNK_SECONDS * 6)):
        return "busy"
    try:
        b = svc.batches.get(batch_id)
        if b is None or b.manifest_key:
            return "gone"
        if b.status in ACTIVE and b.over_threshold:
            svc.batches.stop(batch_id, "failed", error=f"more than {b.threshold} rows failed")
            return "more"
        if b.status in ACTIVE and not b.expanded:
            return _expand(svc, b)
        if b.all_ended:
            _finish(svc, b)
            return "done"
        if b.status not in ACTIVE and b.stop_cursor < b.rows_submitted:
            return _cancel_some(svc, b)
        return "idle"
    finally:
        svc.batches.unlock(batch_id)


def _expand(svc: Services, b: BatchRecord) -> str:
    """The next rows into jobs: 'more' after a chunk or once every row is read, 'wait' when the queue
    is full or storage or Redis blink (a batch fails once they have failed too many steps in a row)."""
    if b.status == "queued":
        svc.batches.set(b.id, status="running")
    try:
        return _read_rows(svc, b)
    except ObjectMissing:
        svc.batches.stop(b.id, "failed", error=f"its input object {b.input_key!r} is gone")
        return "more"
    except (StorageError, redis.RedisError):
        log.warning("batch %s: storage or Redis unavailable; its rows wait", b.id)
        return stalled(svc, b.id)


def stalled(svc: Services, batch_id: str) -> str:
    """A step that could not make progress: try again shortly, until too many have failed in a row."""
    tries = svc.batches.step_failed(batch_id)
    if tries < svc.settings.batch_max_step_errors:
        return "wait"
    svc.batches.stop(batch_id, "failed", error=f"its input could not be read: {tries} steps failed in a row")
    return "more"


def _read_rows(svc: Services, b: BatchRecord) -> str:
    index, columns, rejected = b.rows_submitted, b.columns, b.rejected
    started = time.monotonic()
    for row, end, header in rows.parse(svc.storage.lines(b.input_key, b.offset), b.format, b.offset, columns):
        if header is not None:
            columns = header
            svc.batches.set(b.id, columns="\x1f".join(header), offset=str(end))
            continue
        if index >= svc.settings.max_batch_rows:
            svc.batches.stop(b.id, "failed", error=f"more than {index} rows (INPAINT_MAX_BATCH_ROWS)")
            return "more"
        rejection = row if isinstance(row, Problem) else None
        if isinstance(row, dict):
            try:
                fields = rows.job_fields(row, b.parameters, priority="bulk")  # batch rows yield to interactive jobs
                # Each image URL once for the batch: a row that waits, or repeats a URL, reads the kept bytes.
                fetched = images.row_images(svc, b.tenant, b.id, fields)
                params, image, mask = validate_fields(fields, None, None, svc.settings, fetched)
                submit_job(svc, b.tenant, params, image, mask, job_id=rows.row_job_id(b.id, index), batch_id=b.id)
            except FieldsInvalid as exc:
                first: dict[str, Any] = dict(exc.errors[0]) if exc.errors else {}
                loc = ".".join(str(x) for x in first.get("loc", ()))
                rejection = Problem(422, Code.validation_error, f"{loc}: {first.get('msg', 'invalid')}")
            except ImageError as exc:
                rejection = exc
            except Problem as exc:
                if exc.code in _WAIT:
                    return "wait"  # the queue is full: this row again once it drains
                rejection = exc
        if rejection is None:
            svc.batches.record_row(b.id, index, end, rows.row_job_id(b.id, index))
        else:
            error = {"code": str(rejection.code), "message": rejection.message}
            svc.batches.record_row(b.id, index, end, None, error)
            rejected += 1
        index += 1
        if 0 <= b.threshold < rejected + b.failed:
            return "more"  # the next step fails the batch
        if svc.batches.status(b.id) not in ACTIVE:
            return "more"  # canceled meanwhile: the next step cancels its jobs
        if index - b.rows_submitted >= CHUNK_ROWS or time.monotonic() - started > CHUNK_SECONDS:
            return "more"
    svc.batches.set(b.id, expanded="1", rows_total=str(index))
    return "more"


def _cancel_some(svc: Services, b: BatchRecord) -> str:
    """Cancel the next chunk of a stopped batch's jobs (queued ones end now, running ones at a step)."""
    ids = svc.batches.job_ids(b.id, b.stop_cursor, b.stop_cursor + CHUNK_ROWS - 1)
    live = [j for j in ids if j]
    for rec in svc.jobs.get_many(live):
        if rec is not None and not rec.status.is_terminal:
            lifecycle.cancel(svc, rec)
    svc.batches.set(b.id, stop_cursor=str(b.stop_cursor + len(ids)))
    return "more"


def _finish(svc: Services, b: BatchRecord) -> None:
    """Every row has ended: the results manifest, then the final status (succeeded unless stopped)."""
    key = write_results(svc, b)
    status = "succeeded" if b.status in ACTIVE else b.status
    svc.batches.finished(b.id, b.tenant, status=status, manifest_key=key, finished_at=repr(time.time()))
