"""A scoring batch's state in Redis: one hash (status, read position, counts), the list of its rows'
job ids, and the rows that were rejected. Its jobs' ends are counted by the job store's own
status-change scripts (`ended`, `failed`), in the same step as each job's status."""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from shared import keys

ACTIVE = ("queued", "running")

# KEYS: batch. ARGV: new status, field/value pairs… Only a batch still queued or running stops.
_STOP = """
local st = redis.call('HGET', KEYS[1], 'status')
if st ~= 'queued' and st ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1], unpack(ARGV, 2))
return 1
"""


class BatchRecord:
    """A batch as stored."""

    __slots__ = ("fields",)

    def __init__(self, fields: dict[str, str]):
        self.fields = fields

    def _i(self, name: str) -> int:
        return int(self.fields.get(name) or 0)

    id = property(lambda self: self.fields["id"])
    tenant = property(lambda self: self.fields["tenant"])
    status = property(lambda self: self.fields["status"])
    input_key = property(lambda self: self.fields["input_key"])
    format = property(lambda self: self.fields["format"])
    parameters = property(lambda self: json.loads(self.fields.get("parameters") or "{}"))
    threshold = property(lambda self: int(self.fields.get("error_threshold") or -1))
    offset = property(lambda self: self._i("offset"))
    rows_submitted = property(lambda self: self._i("rows_submitted"))
    rejected = property(lambda self: self._i("rejected"))
    jobs = property(lambda self: self._i("jobs"))  # rows that became jobs
    ended = property(lambda self: self._i("ended"))  # of those, ended
    failed = property(lambda self: self._i("failed"))
    stop_cursor = property(lambda self: self._i("stop_cursor"))  # jobs asked to cancel, in row order
    expanded = property(lambda self: self.fields.get("expanded") == "1")  # every row read
    manifest_key = property(lambda self: self.fields.get("manifest_key") or None)

    @property
    def columns(self) -> list[str] | None:
        return self.fields["columns"].split("\x1f") if self.fields.get("columns") else None

    @property
    def over_threshold(self) -> bool:
        return 0 <= self.threshold < self.failed + self.rejected

    @property
    def all_ended(self) -> bool:
        """No row will become a job any more, and every job has ended."""
        return (self.expanded or self.status not in ACTIVE) and self.ended >= self.jobs


class BatchStore:
    def __init__(self, r: redis.Redis):
        self.r = r
        self._stop = r.register_script(_STOP)

    def create(
        self, batch_id: str, tenant: str, input_key: str, fmt: str, parameters: dict[str, Any], threshold: int
    ) -> None:
        self.r.hset(
            keys.batch(batch_id),
            mapping={
                "id": batch_id, "tenant": tenant, "status": "queued", "created_at": repr(time.time()),
                "input_key": input_key, "format": fmt, "parameters": json.dumps(parameters),
                "error_threshold": str(threshold), "offset": "0", "rows_submitted": "0", "rejected": "0",
                "jobs": "0", "expanded": "0", "columns": "",
            },
        )  # fmt: skip

    def get(self, batch_id: str) -> BatchRecord | None:
        fields: dict[str, str] = self.r.hgetall(keys.batch(batch_id))  # type: ignore[assignment]
        return BatchRecord(fields) if fields else None

    def owned(self, batch_id: str, tenant: str) -> bool:
        return bool(self.r.hget(keys.batch(batch_id), "tenant") == tenant)

    def status(self, batch_id: str) -> str | None:
        return self.r.hget(keys.batch(batch_id), "status")  # type: ignore[return-value]

    def job_ids(self, batch_id: str, start: int = 0, end: int = -1) -> list[str]:
        """Row order: a job id, or '' for a rejected row."""
        return self.r.lrange(keys.batch_jobs(batch_id), start, end)  # type: ignore[return-value]

    def rejections(self, batch_id: str) -> dict[int, dict[str, str]]:
        found: dict[str, str] = self.r.hgetall(keys.batch_rejected(batch_id))  # type: ignore[assignment]
        return {int(i): json.loads(e) for i, e in found.items()}

    def set(self, batch_id: str, **fields: str) -> None:
        self.r.hset(keys.batch(batch_id), mapping=fields)  # type: ignore[arg-type]

    def record_row(
        self, batch_id: str, index: int, end: int, job_id: str | None, rejection: dict[str, str] | None = None
    ) -> None:
        """One row's bookkeeping, all or nothing: its job (or why it has none) and the read position."""
        key = keys.batch(batch_id)
        pipe = self.r.pipeline()
        if job_id is None:
            pipe.hset(keys.batch_rejected(batch_id), str(index), json.dumps(rejection))
            pipe.hincrby(key, "rejected", 1)
            pipe.rpush(keys.batch_jobs(batch_id), "")
        else:
            pipe.rpush(keys.batch_jobs(batch_id), job_id)
            pipe.hincrby(key, "jobs", 1)
        pipe.hset(key, mapping={"offset": str(end), "rows_submitted": str(index + 1)})
        pipe.execute()

    def stop(self, batch_id: str, status: str, **fields: str) -> bool:
        """A queued or running batch becomes `status` (canceled, failed): it reads no more rows."""
        flat = [x for kv in fields.items() for x in kv]
        return bool(self._stop(keys=[keys.batch(batch_id)], args=[status, *flat]))

    def wants_step(self, batch_id: str) -> bool:
        """After one of its jobs ended: is there work for the batch (finish it, or fail it past its
        error threshold)? Several jobs may say yes at once; a step is safe to run twice."""
        b = self.get(batch_id)
        if b is None or b.manifest_key:
            return False
        return b.all_ended or (b.status in ACTIVE and b.over_threshold)

    def lock(self, batch_id: str, ttl_s: int) -> bool:
        """One process advances a batch at a time."""
        return bool(self.r.set(keys.batch_lock(batch_id), "1", nx=True, ex=ttl_s))

    def unlock(self, batch_id: str) -> None:
        self.r.delete(keys.batch_lock(batch_id))
