"""What a batch shows: the batch object (counts, progress, jobs) and, once every row has ended, its
`results.jsonl` manifest, one line per row in input order. Reading a batch never changes it."""

from __future__ import annotations

import io
import json
from typing import Any

from shared import keys
from shared.batches.store import BatchRecord
from shared.jobs.record import JobRecord, rfc3339
from shared.jobs.view import load_manifest
from shared.schemas import Status
from shared.services import Services


def batch_prefix(tenant: str, batch_id: str) -> str:
    return f"tenants/{tenant}/batches/{batch_id}/"


def statuses(svc: Services, tenant: str, ids: list[str]) -> dict[str, str]:
    """Each job's status; a job that Redis has let go answers from its manifest."""
    out: dict[str, str] = {}
    for i in range(0, len(ids), 1000):
        part = ids[i : i + 1000]
        pipe = svc.r.pipeline(transaction=False)
        for jid in part:
            pipe.hget(keys.job(jid), "status")
        for jid, st in zip(part, pipe.execute(), strict=True):
            if st is None:
                rec = load_manifest(svc.storage, tenant, jid)
                st = rec.status.value if rec else Status.failed.value
            out[jid] = st
    return out


def view(svc: Services, batch_id: str, tenant: str) -> dict[str, Any] | None:
    """The batch object, or None when the tenant has no such batch."""
    b = svc.batches.get(batch_id)
    if b is None or b.tenant != tenant:
        return None
    ids = svc.batches.job_ids(batch_id)
    counts = dict.fromkeys((s.value for s in Status), 0)
    for st in statuses(svc, tenant, [j for j in ids if j]).values():
        counts[st] = counts.get(st, 0) + 1
    counts["rejected"] = b.rejected
    f = b.fields
    done = sum(counts[s] for s in ("succeeded", "failed", "canceled", "rejected"))
    return {
        "id": batch_id,
        "status": b.status,
        "created_at": rfc3339(float(f["created_at"])),
        "finished_at": rfc3339(float(f["finished_at"])) if f.get("finished_at") else None,
        "counts": counts,
        "progress": {
            "rows_submitted": b.rows_submitted,
            "rows_total": int(f["rows_total"]) if f.get("rows_total") else None,
            "rows_done": done,
        },
        "error_threshold": b.threshold,
        "error": f.get("error") or None,
        "manifest_url": svc.storage.presign(b.manifest_key) if b.manifest_key else None,
        "jobs": [j or None for j in ids],
        "rejected_rows": [{"index": i, "error": e} for i, e in sorted(svc.batches.rejections(batch_id).items())],
    }


def _records(svc: Services, tenant: str, ids: list[str]) -> dict[str, JobRecord]:
    """The jobs' records, from Redis or, once Redis has let them go, from their manifests."""
    out: dict[str, JobRecord] = {}
    for i in range(0, len(ids), 500):
        part = ids[i : i + 500]
        for jid, rec in zip(part, svc.jobs.get_many(part), strict=True):
            found = rec or load_manifest(svc.storage, tenant, jid)
            if found is not None:
                out[jid] = found
    return out


def write_results(svc: Services, b: BatchRecord) -> str:
    """results.jsonl: one line per row in input order, with its job, status, output keys and error."""
    ids = svc.batches.job_ids(b.id)
    rejected = svc.batches.rejections(b.id)
    records = _records(svc, b.tenant, [j for j in ids if j])
    buf = io.StringIO()
    for index, jid in enumerate(ids):
        line: dict[str, Any] = {"index": index, "job_id": jid or None}
        rec = records.get(jid)
        if not jid:
            line.update(status="rejected", error=rejected.get(index))
        elif rec is None:
            line.update(status=Status.failed.value, error=None)
        else:
            line.update(
                status=rec.status.value,
                prompt=rec.input.prompt,
                outputs=[o.key for o in rec.outputs],
                error=rec.error.model_dump() if rec.error else None,
                nsfw_content_detected=rec.nsfw,
            )
        buf.write(json.dumps(line) + "\n")
    key = batch_prefix(b.tenant, b.id) + "results.jsonl"
    svc.storage.put(key, buf.getvalue().encode(), "application/x-ndjson")
    return key
