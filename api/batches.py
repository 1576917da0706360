"""Batch scoring (the model card's batch endpoint): thousands of rows become jobs, a chunk at a time.

A batch's rows live in one JSONL or CSV object in the bucket (an inline `input_data` body is written
there first, so both take one path). The expander (a task on the webhooks worker's queue) streams
the object from a byte offset, turns up to `CHUNK_ROWS` rows into jobs and queues itself again, so
no task runs long and memory stays flat however large the file. Each row's job id is derived from
(batch id, row index) and every row's bookkeeping is one MULTI, so a crashed expander that runs
again neither loses nor duplicates a row. When the job queue is full the expander waits instead of
rejecting rows: a batch feeds the GPUs as fast as they drain.

Rows that cannot become jobs (bad base64, a mask of the wrong size…) are `rejected` with the same
error codes as `POST /v1/jobs`; together with failed jobs they count against `error_threshold`
(-1: never fail the batch; N: fail it, canceling what is left, once more than N rows failed).
When every row has ended, a `results.jsonl` manifest (one line per row, input order) is written next
to the input and presigned in the batch object.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import redis
from minio.error import S3Error

from api.deps import Services
from api.errors import ApiError
from api.submission import FieldsInvalid, submit_job, validate_fields
from shared.imaging import ImageError
from shared.jobstore import PREFIX, new_job_id, rfc3339
from shared.jobview import load_manifest
from shared.schemas import Status
from shared.storage import StorageError

log = logging.getLogger(__name__)

CHUNK_ROWS = 100
CHUNK_SECONDS = 10.0
ALIASES = {"mask": "mask_image"}
_WAIT = {"queue_full", "tenant_queue_full", "service_unavailable"}


def batch_key(batch_id: str) -> str:
    return f"{PREFIX}jobbatch:{batch_id}"


def batch_prefix(tenant: str, batch_id: str) -> str:
    return f"tenants/{tenant}/batches/{batch_id}/"


def row_job_id(batch_id: str, index: int) -> str:
    """Deterministic per row, time-ordered like every job id (the batch's creation time first)."""
    return batch_id[:12] + hashlib.sha256(f"{batch_id}:{index}".encode()).hexdigest()[:20]


def row_dicts(columns: list[str], data: list[dict[str, Any] | list[Any]]) -> list[dict[str, Any]]:
    """The card's rows as dicts: a list of objects, or Azure's `split` lists aligned with `columns`."""
    rows = []
    for i, row in enumerate(data):
        if isinstance(row, list):
            if len(row) != len(columns):
                raise ApiError(
                    422, "validation_error", f"input_data.data[{i}] has {len(row)} values for {len(columns)} columns",
                    f"input_data.data.{i}",
                )  # fmt: skip
            row = dict(zip(columns, row, strict=True))
        rows.append(row)
    return rows


def normalize_row(row: dict[str, Any], parameters: dict[str, Any]) -> dict[str, Any]:
    fields = {**parameters, **{ALIASES.get(k, k): v for k, v in row.items() if v not in (None, "")}}
    fields.setdefault("output_format", "png")
    return fields


def create_batch(
    svc: Services,
    tenant: str,
    input_key: str,
    fmt: str,
    parameters: dict[str, Any],
    error_threshold: int,
    batch_id: str | None = None,
) -> str:
    batch_id = batch_id or new_job_id()
    svc.store.r.hset(
        batch_key(batch_id),
        mapping={
            "id": batch_id, "tenant": tenant, "status": "queued", "created_at": repr(time.time()),
            "input_key": input_key, "format": fmt, "parameters": json.dumps(parameters),
            "error_threshold": str(error_threshold), "offset": "0", "rows_submitted": "0", "rejected": "0",
            "expanded": "0", "columns": "",
        },
    )  # fmt: skip
    return batch_id


def _lines(svc: Services, key: str, offset: int) -> Iterator[bytes]:
    """The object's lines from a byte offset, streamed (each line with its newline)."""
    try:
        resp = svc.storage.client.get_object(svc.storage.bucket, key, offset=offset)
    except S3Error as exc:
        if exc.code == "InvalidRange":  # the offset is the object's end: nothing left to read
            return
        raise
    try:
        rest = b""
        for chunk in resp.stream(256 * 1024):
            rest += chunk
            *lines, rest = rest.split(b"\n")
            for line in lines:
                yield line + b"\n"
        if rest:
            yield rest
    finally:
        resp.close()
        resp.release_conn()


def iter_rows(
    svc: Services, key: str, fmt: str, offset: int, columns: list[str] | None
) -> Iterator[tuple[dict[str, Any] | ApiError, int, list[str] | None]]:
    """(row or its error, byte offset after it, CSV columns) from `offset` on."""
    pos = offset
    lines = _lines(svc, key, offset)
    if fmt == "jsonl":
        for line in lines:
            pos += len(line)
            text = line.strip()
            if not text:
                continue
            try:
                row = json.loads(text)
                if not isinstance(row, dict):
                    raise ValueError("a row must be a JSON object")
                yield row, pos, None
            except ValueError as exc:
                yield ApiError(400, "invalid_row", f"not a JSON object: {str(exc)[:100]}"), pos, None
        return
    consumed = [0]

    def counted() -> Iterator[str]:
        for line in lines:
            consumed[0] += len(line)
            yield line.decode("utf-8", errors="replace")

    reader = csv.reader(counted())
    for record in reader:
        if columns is None:
            columns = [c.strip() for c in record]
            yield {}, offset + consumed[0], columns  # the header: nothing to submit
            continue
        if not any(record):
            continue
        if len(record) != len(columns):
            err = ApiError(400, "invalid_row", f"{len(record)} values for {len(columns)} columns")
            yield err, offset + consumed[0], columns
            continue
        yield dict(zip(columns, record, strict=True)), offset + consumed[0], columns


def expand_chunk(svc: Services, batch_id: str) -> str:
    """Turn the next rows into jobs: 'more' (call again), 'wait' (queue full), 'done' or 'stopped'."""
    r = svc.store.r
    key = batch_key(batch_id)
    lock = f"{key}:expanding"
    if not r.set(lock, "1", nx=True, ex=int(CHUNK_SECONDS * 6)):
        return "stopped"  # another expander holds this batch; it goes on
    try:
        b: dict[str, str] = r.hgetall(key)  # type: ignore[assignment]
        if not b or b["status"] not in ("queued", "running") or b["expanded"] == "1":
            return "stopped"
        r.hset(key, "status", "running")
        tenant, parameters = b["tenant"], json.loads(b["parameters"])
        threshold = int(b["error_threshold"])
        index = int(b["rows_submitted"])
        columns = b["columns"].split("\x1f") if b["columns"] else None
        started = time.monotonic()
        rows = iter_rows(svc, b["input_key"], b["format"], int(b["offset"]), columns)
        for row, end, cols in rows:
            if cols is not None and columns is None:
                columns = cols
                r.hset(key, mapping={"columns": "\x1f".join(cols), "offset": str(end)})
                continue
            if isinstance(row, dict) and not row:
                continue
            job_id = row_job_id(batch_id, index)
            rejection: ApiError | None = row if isinstance(row, ApiError) else None
            if rejection is None:
                assert isinstance(row, dict)
                try:
                    params, image, mask = validate_fields(normalize_row(row, parameters), None, None)
                    submit_job(svc, tenant, params, image, mask, job_id=job_id)
                except FieldsInvalid as exc:
                    first: dict[str, Any] = dict(exc.errors[0]) if exc.errors else {}
                    loc = ".".join(str(x) for x in first.get("loc", ()))
                    rejection = ApiError(422, "validation_error", f"{loc}: {first.get('msg', 'invalid')}")
                except ImageError as exc:
                    rejection = ApiError(exc.status, exc.code, exc.message, exc.param)
                except ApiError as exc:
                    if exc.code in _WAIT:
                        return "wait"  # the queue is full: this row again once it drains
                    rejection = exc
                except (StorageError, redis.RedisError):
                    log.warning("batch %s row %d: storage or Redis unavailable; retrying", batch_id, index)
                    return "wait"  # transient: the same row again shortly, never a lost row
            pipe = r.pipeline()  # one row's bookkeeping, all or nothing
            if rejection is not None:
                pipe.hset(
                    f"{key}:rejected", str(index), json.dumps({"code": rejection.code, "message": rejection.message})
                )
                pipe.hincrby(key, "rejected", 1)
                pipe.rpush(f"{key}:jobs", "")
            else:
                pipe.rpush(f"{key}:jobs", job_id)
            pipe.hset(key, mapping={"offset": str(end), "rows_submitted": str(index + 1)})
            pipe.execute()
            index += 1
            if rejection is not None and 0 <= threshold < int(r.hget(key, "rejected") or 0):
                _fail(svc, batch_id, f"more than {threshold} rows failed")
                return "stopped"
            if index % 25 == 0 and r.hget(key, "status") != "running":
                return "stopped"  # canceled meanwhile
            if index - int(b["rows_submitted"]) >= CHUNK_ROWS or time.monotonic() - started > CHUNK_SECONDS:
                return "more"
        r.hset(key, mapping={"expanded": "1", "rows_total": str(index)})
        return "done"
    finally:
        r.delete(lock)


def _job_ids(svc: Services, batch_id: str) -> list[str]:
    return svc.store.r.lrange(f"{batch_key(batch_id)}:jobs", 0, -1)  # type: ignore[return-value]


def _stop(svc: Services, batch_id: str, **fields: str) -> None:
    """The batch reads no more rows, and each of its jobs is canceled (at once if still queued)."""
    svc.store.r.hset(batch_key(batch_id), mapping=fields)  # type: ignore[arg-type]
    for jid in filter(None, _job_ids(svc, batch_id)):
        svc.store.request_cancel(jid)


def _fail(svc: Services, batch_id: str, reason: str) -> None:
    """Past the error threshold: the batch fails and what has not started is canceled."""
    _stop(svc, batch_id, status="failed", error=reason)


def cancel_batch(svc: Services, batch_id: str) -> None:
    if svc.store.r.hget(batch_key(batch_id), "status") in ("queued", "running"):
        _stop(svc, batch_id, status="canceled", finished_at=repr(time.time()))


def owns_batch(svc: Services, batch_id: str, tenant: str) -> bool:
    return bool(svc.store.r.hget(batch_key(batch_id), "tenant") == tenant)


def get_batch(svc: Services, batch_id: str, tenant: str) -> dict[str, Any] | None:
    """The batch object; finishes the batch (threshold, manifest) when its rows have all ended."""
    r = svc.store.r
    key = batch_key(batch_id)
    b: dict[str, str] = r.hgetall(key)  # type: ignore[assignment]
    if not b or b["tenant"] != tenant:
        return None
    ids = _job_ids(svc, batch_id)
    statuses = _statuses(svc, tenant, [j for j in ids if j])
    counts = dict.fromkeys((s.value for s in Status), 0)
    for st in statuses.values():
        counts[st] = counts.get(st, 0) + 1
    counts["rejected"] = int(b.get("rejected") or 0)
    status = b["status"]
    threshold = int(b["error_threshold"])
    failures = counts["failed"] + counts["rejected"]
    if status == "running" and 0 <= threshold < failures:
        b["error"] = f"more than {threshold} rows failed"
        _fail(svc, batch_id, b["error"])
        status = "failed"
    all_ended = b.get("expanded") == "1" and counts["queued"] == counts["running"] == 0
    if all_ended and status in ("running", "failed", "canceled") and not b.get("manifest_key"):
        b["manifest_key"] = _write_manifest(svc, b, ids, statuses)
        if status == "running":
            status = "succeeded"
        b["finished_at"] = repr(time.time())
        r.hset(key, mapping={"status": status, "manifest_key": b["manifest_key"], "finished_at": b["finished_at"]})
    total = int(b["rows_total"]) if b.get("rows_total") else None
    done = sum(counts[s] for s in ("succeeded", "failed", "canceled", "rejected"))
    out: dict[str, Any] = {
        "id": batch_id,
        "status": status,
        "created_at": rfc3339(float(b["created_at"])),
        "finished_at": rfc3339(float(b["finished_at"])) if b.get("finished_at") else None,
        "counts": counts,
        "progress": {"rows_submitted": int(b["rows_submitted"]), "rows_total": total, "rows_done": done},
        "error_threshold": threshold,
        "error": b.get("error") or None,
        "manifest_url": svc.storage.presign(b["manifest_key"]) if b.get("manifest_key") else None,
    }
    out["jobs"] = [j or None for j in ids]
    rejected: dict[str, str] = r.hgetall(f"{key}:rejected")  # type: ignore[assignment]
    out["rejected_rows"] = [
        {"index": int(i), "error": json.loads(e)} for i, e in sorted(rejected.items(), key=lambda kv: int(kv[0]))
    ]
    return out


def _statuses(svc: Services, tenant: str, ids: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for i in range(0, len(ids), 1000):
        part = ids[i : i + 1000]
        pipe = svc.store.r.pipeline(transaction=False)
        for jid in part:
            pipe.hget(svc.store.job_key(jid), "status")
        for jid, st in zip(part, pipe.execute(), strict=True):
            if st is None:  # expired from Redis: its manifest in S3 says how it ended
                rec = load_manifest(svc.storage, tenant, jid)
                st = rec.status.value if rec else Status.failed.value
            out[jid] = st
    return out


def _write_manifest(svc: Services, b: dict[str, str], ids: list[str], statuses: dict[str, str]) -> str:
    """results.jsonl: one line per row in input order, with its job, status, output keys and error."""
    rejected: dict[str, str] = svc.store.r.hgetall(f"{batch_key(b['id'])}:rejected")  # type: ignore[assignment]
    records = {}
    live = [j for j in ids if j]
    for i in range(0, len(live), 500):
        for rec in svc.store.get_many(live[i : i + 500]):
            if rec is not None:
                records[rec.id] = rec
    buf = io.StringIO()
    for index, jid in enumerate(ids):
        line: dict[str, Any] = {"index": index, "job_id": jid or None}
        if not jid:
            line.update(status="rejected", error=json.loads(rejected.get(str(index), "null")))
        else:
            rec = records.get(jid)
            line["status"] = statuses.get(jid)
            if rec is not None:
                line.update(
                    prompt=rec.input.prompt,
                    outputs=[o.key for o in rec.outputs],
                    error=rec.error.model_dump() if rec.error else None,
                    nsfw_content_detected=rec.nsfw,
                )
        buf.write(json.dumps(line) + "\n")
    key = batch_prefix(b["tenant"], b["id"]) + "results.jsonl"
    svc.storage.put(key, buf.getvalue().encode(), "application/x-ndjson")
    return key
