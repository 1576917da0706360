"""Erasing a job (`DELETE /v1/jobs/{id}`) and expiring its images (`INPAINT_RETENTION_S`).

Erasing removes everything the job left: its inputs, outputs and manifest in S3, its record, its
delivery log and its place in the tenant's list. Deleting is final from the moment it is answered: one
atomic step (`mark`) leaves a tombstone (no read shows the job, no webhook of it is sent) and marks the
record. A job that has not ended is asked to cancel, and a job whose ending is still being concluded is
left to that conclusion: either erases it instead of writing its manifest (`lifecycle.conclude`), and a
manifest written in the same instant is erased again there.

Retention removes a job's inputs and outputs `INPAINT_RETENTION_S` after it ended; the job itself
(status, parameters, timings) stays, its outputs shown as expired. The I/O worker sweeps what is due
from a sorted set of ended jobs. A bucket lifecycle rule is not used: it counts days from an
object's creation, not seconds from the job's end, and S3-compatible servers differ in support.
"""

from __future__ import annotations

import logging
import time

from shared import keys
from shared.jobs.record import JobRecord
from shared.jobs.view import manifest_key, write_manifest
from shared.services import Services
from shared.storage import StorageError, job_prefix

log = logging.getLogger(__name__)


def erase(svc: Services, tenant: str, job_id: str) -> None:
    """Every trace of the job, in S3 and in Redis (its record may be gone already)."""
    objects = svc.storage.list_keys(job_prefix(tenant, job_id))
    if objects:
        svc.storage.delete(objects)
    pipe = svc.r.pipeline()
    pipe.delete(keys.job(job_id), keys.deliveries(job_id))
    pipe.zrem(keys.tenant_jobs(tenant), job_id)
    pipe.zrem(keys.ended(), f"{tenant}/{job_id}")
    pipe.execute()


def deleted_by(svc: Services, job_id: str) -> str | None:
    """The tenant whose DELETE erased the job, while its tombstone lasts."""
    found = svc.r.get(keys.erased(job_id))
    return str(found) if found else None


# KEYS: record, jobs to conclude, tombstone. ARGV: id, tombstone TTL, tenant. 'now' (erase it now), or
# 'later' (its end, or the conclusion of its end, erases it). Either way the job is among those to
# conclude: should the erasure fail or race a late manifest, the sweeper erases it again (by the tenant
# the tombstone names, once the record is gone).
_MARK = """
redis.call('SET', KEYS[3], ARGV[3], 'EX', tonumber(ARGV[2]))
local st = redis.call('HGET', KEYS[1], 'status')
local marked = redis.call('HGET', KEYS[1], 'erase')  -- this ran before (its reply lost): the same answer
if st and marked == 'now' then return 'now' end
if st and (st == 'queued' or st == 'running' or redis.call('ZSCORE', KEYS[2], ARGV[1])) then
  redis.call('HSET', KEYS[1], 'erase', 'later')
  return 'later'
end
if st then redis.call('HSET', KEYS[1], 'erase', 'now') end
redis.call('ZADD', KEYS[2], redis.call('TIME')[1], ARGV[1])
return 'now'
"""


_SET_IF_THERE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
return redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
"""


def mark(svc: Services, rec: JobRecord) -> str:
    """Deleted from now on: 'now' (erase it at once) or 'later' (its end or conclusion erases it)."""
    args = [rec.id, svc.settings.job_ttl_s, rec.tenant]
    return str(svc.r.eval(_MARK, 3, keys.job(rec.id), keys.concluding(), keys.erased(rec.id), *args))


def note_ended(svc: Services, rec: JobRecord) -> None:
    """Count the job among those whose images expire (when a retention is set)."""
    if svc.settings.retention_s and rec.finished_at:
        svc.r.zadd(keys.ended(), {f"{rec.tenant}/{rec.id}": rec.finished_at})


def expire_due(svc: Services, limit: int = 100) -> int:
    """Remove the inputs and outputs of jobs that ended more than `INPAINT_RETENTION_S` ago; how many."""
    if not svc.settings.retention_s:
        return 0
    due: list[str] = svc.r.zrangebyscore(keys.ended(), "-inf", time.time() - svc.settings.retention_s, 0, limit)  # type: ignore[assignment]
    for member in due:
        tenant, _, job_id = member.partition("/")
        try:
            images = [k for k in svc.storage.list_keys(job_prefix(tenant, job_id)) if k != manifest_key(tenant, job_id)]
            if images:
                svc.storage.delete(images)
            rec = svc.jobs.get(job_id)
            now = repr(time.time())
            if rec is not None:
                # Only onto a record that still exists: one that expired since the read is not brought
                # back without its TTL (Redis runs noeviction; such records would stay for ever).
                svc.r.eval(_SET_IF_THERE, 1, keys.job(job_id), "expired_at", now)
                rec.fields["expired_at"] = now
                write_manifest(svc.storage, rec)
            elif (doc := svc.storage.get_json(manifest_key(tenant, job_id))) is not None:
                svc.storage.put_json(manifest_key(tenant, job_id), {**doc, "expired_at": now})
        except StorageError:
            log.warning("job %s: its images could not be expired now; next sweep", job_id)
            continue
        svc.r.zrem(keys.ended(), member)
    return len(due)
