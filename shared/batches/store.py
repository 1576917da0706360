"""A scoring batch's state in Redis: one hash (status, read position, counts), the list of its rows'
job ids, and the rows that were rejected. Its jobs' ends are counted by the job store's own
status-change scripts (`ended`, `failed`), in the same step as each job's status.

Every key a batch makes expires (`ttl_s` after its last change): Redis runs `noeviction`, so state
that never expired would, in the end, refuse every tenant's writes. A tenant holds at most
`max_open` batches that have not finished."""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from shared import keys

ACTIVE = ("queued", "running")

# KEYS: batch. ARGV: new status, field/value pairs… Only a batch still queued or running stops.
# KEYS: the tenant's open batches. ARGV: batch id, now, cap, stale before. Returns 1 if admitted.
_ADMIT = """
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 1 end  -- admitted already (this ran twice)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[4])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
return 1
"""

# KEYS: batch, its rows, its rejections. ARGV: row index, read position, job id ('' rejected), the
# rejection (JSON), ttl. A row is recorded once: a second run finds the row counted and changes nothing.
_RECORD_ROW = """
if tonumber(redis.call('HGET', KEYS[1], 'rows_submitted') or '0') ~= tonumber(ARGV[1]) then return 0 end
if ARGV[3] == '' then
  redis.call('HSET', KEYS[3], ARGV[1], ARGV[4])
  redis.call('HINCRBY', KEYS[1], 'rejected', 1)
else
  redis.call('HINCRBY', KEYS[1], 'jobs', 1)
end
redis.call('RPUSH', KEYS[2], ARGV[3])
redis.call('HSET', KEYS[1], 'offset', ARGV[2], 'rows_submitted', tostring(tonumber(ARGV[1]) + 1), 'step_errors', '0')
for i = 1, 3 do redis.call('EXPIRE', KEYS[i], tonumber(ARGV[5])) end
return 1
"""

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
    def __init__(self, r: redis.Redis, ttl_s: int, max_open: int):
        self.r, self.ttl_s, self.max_open = r, ttl_s, max_open
        self._stop = r.register_script(_STOP)
        self._admit = r.register_script(_ADMIT)
        self._record_row = r.register_script(_RECORD_ROW)

    def admit(self, tenant: str, batch_id: str) -> bool:
        """Count a new batch among the tenant's open ones, unless it already has `max_open`."""
        now = time.time()
        return bool(
            self._admit(keys=[keys.open_batches(tenant)], args=[batch_id, repr(now), self.max_open, now - self.ttl_s])
        )

    def _expire(self, pipe: Any, batch_id: str) -> None:
        for key in (keys.batch(batch_id), keys.batch_jobs(batch_id), keys.batch_rejected(batch_id)):
            pipe.expire(key, self.ttl_s)

    def create(
        self, batch_id: str, tenant: str, input_key: str, fmt: str, parameters: dict[str, Any], threshold: int
    ) -> None:
        pipe = self.r.pipeline()
        pipe.hset(
            keys.batch(batch_id),
            mapping={
                "id": batch_id, "tenant": tenant, "status": "queued", "created_at": repr(time.time()),
                "input_key": input_key, "format": fmt, "parameters": json.dumps(parameters),
                "error_threshold": str(threshold), "offset": "0", "rows_submitted": "0", "rejected": "0",
                "jobs": "0", "expanded": "0", "columns": "",
            },
        )  # fmt: skip
        self._expire(pipe, batch_id)
        pipe.execute()

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
        pipe = self.r.pipeline()
        pipe.hset(keys.batch(batch_id), mapping=fields)  # type: ignore[arg-type]
        self._expire(pipe, batch_id)
        pipe.execute()

    def finished(self, batch_id: str, tenant: str, **fields: str) -> None:
        """The batch has ended: its final fields, and it no longer counts among the tenant's open ones."""
        pipe = self.r.pipeline()
        pipe.hset(keys.batch(batch_id), mapping=fields)  # type: ignore[arg-type]
        pipe.zrem(keys.open_batches(tenant), batch_id)
        self._expire(pipe, batch_id)
        pipe.execute()

    def step_failed(self, batch_id: str) -> int:
        """One more step in a row that could not make progress; how many now."""
        pipe = self.r.pipeline()
        pipe.hincrby(keys.batch(batch_id), "step_errors", 1)
        self._expire(pipe, batch_id)
        return int(pipe.execute()[0])

    def record_row(
        self, batch_id: str, index: int, end: int, job_id: str | None, rejection: dict[str, str] | None = None
    ) -> None:
        """One row's bookkeeping, all or nothing and once: its job (or why it has none) and the read position."""
        self._record_row(
            keys=[keys.batch(batch_id), keys.batch_jobs(batch_id), keys.batch_rejected(batch_id)],
            args=[index, end, job_id or "", json.dumps(rejection) if job_id is None else "", self.ttl_s],
        )

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
