"""Reading a job back: from Redis while it lives, from its S3 manifest after; the public job object."""

from __future__ import annotations

import logging

from pydantic import ValidationError

from shared import catalog, keys
from shared.jobs.record import JobRecord, rfc3339
from shared.jobs.store import JobStore
from shared.schemas import Job, Metrics, Output, Progress, Status, StoredOutput
from shared.storage import Storage, job_prefix

log = logging.getLogger(__name__)


def manifest_key(tenant: str, job_id: str) -> str:
    return job_prefix(tenant, job_id) + "manifest.json"


def write_manifest(storage: Storage, rec: JobRecord) -> None:
    """Persist a finished job next to its outputs, so it outlives its Redis record."""
    storage.put_json(manifest_key(rec.tenant, rec.id), rec.manifest())


def load_manifest(storage: Storage, tenant: str, job_id: str) -> JobRecord | None:
    """The job as its manifest stored it; None when there is none, or when it cannot be read as one (a
    damaged object is logged, and the job answers as absent rather than failing the request)."""
    try:
        doc = storage.get_json(manifest_key(tenant, job_id))
        if not doc:
            return None
        rec = JobRecord.from_manifest(doc)
        _ = rec.id, rec.tenant, rec.status, rec.input  # what every reader of a job relies on
        return rec
    except (ValueError, KeyError, TypeError, AttributeError, ValidationError):
        log.error("job %s: its manifest is damaged and cannot be read", job_id)
        return None


def find_job(store: JobStore, storage: Storage, tenant: str, job_id: str) -> JobRecord | None:
    """The tenant's job from Redis, or from its S3 manifest once Redis has let it go."""
    rec = store.get(job_id)
    if rec is not None and rec.erased:
        return None  # deleted: erased when its end is concluded
    if rec is None:
        if store.r.exists(keys.erased(job_id)):
            return None  # deleted (a manifest written in the instant of its erasure is erased again)
        rec = load_manifest(storage, tenant, job_id)
    if rec is None or rec.tenant != tenant or rec.id != job_id:
        return None
    return rec


def own_outputs(rec: JobRecord) -> list[StoredOutput]:
    """The outputs a client may read: a succeeded job's, until INPAINT_RETENTION_S removed them, and
    only its own objects. A manifest is a file in the bucket, and whoever can write under the tenant's
    prefix must not make it point at another tenant's outputs."""
    if rec.status is not Status.succeeded or rec.fields.get("expired_at"):
        return []
    own = job_prefix(rec.tenant, rec.id)
    return [o for o in rec.outputs if o.key.startswith(own) and ".." not in o.key.split("/")]


def to_job(
    rec: JobRecord,
    storage: Storage,
    queue_position: int | None = None,
    eta_s: float | None = None,
    no_worker: bool = False,
) -> Job:
    """The public job object; output keys become presigned URLs. `no_worker`: no worker of its model is
    ready (said while it is queued)."""
    status = rec.status
    step, total = rec.progress
    created, started, finished = rec.created_at, rec.started_at, rec.finished_at
    metrics = Metrics(
        queue_s=round(started - created, 4) if started else None,
        inference_s=rec.inference_s,
        total_s=round(finished - created, 4) if finished else None,
        batch_size=int(rec.fields["batch_size"]) if rec.fields.get("batch_size") else None,
    )
    outputs = [
        Output(
            url=storage.presign(o.key),
            download_url=storage.presign(o.key, f"{rec.id}-{i}.{o.key.rsplit('.', 1)[-1]}"),
            content_type=o.content_type,
            width=o.width,
            height=o.height,
        )
        for i, o in enumerate(own_outputs(rec))
    ]
    return Job(
        id=rec.id,
        status=status,
        created_at=rfc3339(created) or "",
        started_at=rfc3339(started),
        finished_at=rfc3339(finished),
        queue_position=queue_position if status is Status.queued else None,
        eta_s=eta_s if status is Status.queued else None,
        progress=Progress(step=step, total=total),
        input=rec.input,
        model_id=catalog.ref_of(rec.model_name, default=None),
        model=rec.model,
        waiting_for="worker" if no_worker and status is Status.queued else None,
        outputs=outputs,
        nsfw_content_detected=rec.nsfw,
        safety=rec.fields.get("safety") or None,
        error=rec.error,
        metrics=metrics,
        attempts=rec.attempts,
    )
