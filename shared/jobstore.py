"""Live job state in Redis, with forward-only transitions enforced atomically by Lua scripts.

A job is one Redis hash. Every change of status goes through one script that compares ranks
(queued 0 < running 1 < terminal 2) inside Redis, so two writers can never move a job backwards
or end it twice. Finished jobs expire from Redis after `job_ttl_s`; their manifest in S3 stays.
"""

from __future__ import annotations

import json
import secrets
import time
from datetime import UTC, datetime
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from shared.metrics import STATS_KEY
from shared.schemas import ErrorInfo, JobInput, ModelInfo, Status, StoredOutput

PREFIX = "inpaint:"
QUEUE = "inpaint"
MAX_TENANT_INDEX = 100_000

# Shared by the scripts below: a job leaves the per-tenant and per-batch-key waiting sets together
# with the queue, and service-wide counts (shared.metrics) move in the same atomic step.
_LIB = f"""
local STATS = '{STATS_KEY}'
local function unqueue(job, id)
  redis.call('ZREM', 'inpaint:tqueue:' .. (redis.call('HGET', job, 'tenant') or ''), id)
  redis.call('ZREM', 'inpaint:bq:' .. (redis.call('HGET', job, 'bkey') or ''), id)
end
"""

_CREATE = (
    _LIB
    + """
redis.call('HINCRBY', STATS, 'submitted', 1)
local seq = redis.call('INCR', KEYS[4])
redis.call('HSET', KEYS[1], 'seq', seq, unpack(ARGV, 3))
redis.call('ZADD', KEYS[2], seq, ARGV[1])
redis.call('ZADD', KEYS[5], seq, ARGV[1])
redis.call('ZADD', KEYS[3], 0, ARGV[1])
redis.call('ZADD', KEYS[6], seq, ARGV[1])
local n = redis.call('ZCARD', KEYS[3])
local cap = tonumber(ARGV[2])
if n > cap then redis.call('ZREMRANGEBYRANK', KEYS[3], 0, n - cap - 1) end
return seq
"""
)

# KEYS: job, queue. ARGV: new status, owner ('' = anyone), ttl, id, stats field, field/value pairs…
_TRANSITION = (
    _LIB
    + """
local ranks = {queued=0, running=1, succeeded=2, failed=2, canceled=2}
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {'missing', ''} end
if ranks[ARGV[1]] <= ranks[cur] then return {'refused', cur} end
if ARGV[2] ~= '' and redis.call('HGET', KEYS[1], 'owner') ~= ARGV[2] then return {'refused', cur} end
redis.call('HSET', KEYS[1], 'status', ARGV[1], unpack(ARGV, 6))
redis.call('ZREM', KEYS[2], ARGV[4])
unqueue(KEYS[1], ARGV[4])
if ranks[ARGV[1]] == 2 then redis.call('HINCRBY', STATS, ARGV[5], 1) end
local n = redis.call('HINCRBY', KEYS[1], 'events', 1)
redis.call('PUBLISH', 'inpaint:events:' .. ARGV[4], cjson.encode({id=n, type='status', status=ARGV[1]}))
if ranks[ARGV[1]] == 2 then redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3])) end
return {'ok', cur}
"""
)

# KEYS: job, queue. ARGV: owner, now, lease_until, max_attempts, id, ttl, error json
_CLAIM = (
    _LIB
    + """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return {'missing', '0'} end
if st == 'running' then
  local lease = tonumber(redis.call('HGET', KEYS[1], 'lease_until') or '0')
  if lease > tonumber(ARGV[2]) then return {'owned', tostring(lease - tonumber(ARGV[2]))} end
elseif st ~= 'queued' then
  return {'terminal', st}
end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('ZREM', KEYS[2], ARGV[5])
unqueue(KEYS[1], ARGV[5])
if attempts > tonumber(ARGV[4]) then
  redis.call('HSET', KEYS[1], 'status', 'failed', 'error', ARGV[7], 'finished_at', ARGV[2], 'owner', '')
  redis.call('HINCRBY', STATS, 'finished:failed:worker_lost', 1)
  local n = redis.call('HINCRBY', KEYS[1], 'events', 1)
  redis.call('PUBLISH', 'inpaint:events:' .. ARGV[5], cjson.encode({id=n, type='status', status='failed'}))
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[6]))
  return {'exhausted', tostring(attempts)}
end
redis.call('HSET', KEYS[1], 'status', 'running', 'owner', ARGV[1], 'lease_until', ARGV[3])
if not redis.call('HGET', KEYS[1], 'started_at') then redis.call('HSET', KEYS[1], 'started_at', ARGV[2]) end
local n = redis.call('HINCRBY', KEYS[1], 'events', 1)
redis.call('PUBLISH', 'inpaint:events:' .. ARGV[5], cjson.encode({id=n, type='status', status='running'}))
return {'claimed', tostring(attempts)}
"""
)

# KEYS: the job's waiter slot. ARGV: this message's waiter token ('' = none), the next token, ttl ms.
_WAIT_TURN = """
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
"""

# KEYS: job. ARGV: owner, lease_until, step, total ('' to leave progress), id. Returns the cancel flag.
_PROGRESS = """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return -1 end
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return -1 end
redis.call('HSET', KEYS[1], 'lease_until', ARGV[2])
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[1], 'progress_step', ARGV[3], 'progress_total', ARGV[4])
  local n = redis.call('HINCRBY', KEYS[1], 'events', 1)
  redis.call('PUBLISH', 'inpaint:events:' .. ARGV[5], cjson.encode({id=n, type='progress', step=tonumber(ARGV[3]), total=tonumber(ARGV[4])}))
end
return tonumber(redis.call('HGET', KEYS[1], 'cancel_requested') or '0')
"""

# KEYS: job, queue. ARGV: now, ttl, id
_CANCEL = (
    _LIB
    + """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 'missing' end
if st == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'canceled', 'finished_at', ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[3])
  unqueue(KEYS[1], ARGV[3])
  redis.call('HINCRBY', STATS, 'finished:canceled:', 1)
  local n = redis.call('HINCRBY', KEYS[1], 'events', 1)
  redis.call('PUBLISH', 'inpaint:events:' .. ARGV[3], cjson.encode({id=n, type='status', status='canceled'}))
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
  return 'canceled'
elseif st == 'running' then
  redis.call('HSET', KEYS[1], 'cancel_requested', '1')
  return 'requested'
end
return st
"""
)


def _encode(v: Any) -> str:
    """A Redis hash value: '' for None, JSON for containers, exact floats."""
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    if isinstance(v, (dict, list, bool)):
        return json.dumps(v)
    return repr(v) if isinstance(v, float) else str(v)


def rfc3339(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_job_id() -> str:
    """Time-ordered ids (ms clock, then randomness): lexical order is creation order."""
    import secrets

    return f"{int(time.time() * 1000):012x}{secrets.token_hex(10)}"


class JobRecord:
    """A job as stored: what the API shows plus what only the service needs (keys, owner)."""

    __slots__ = ("fields",)

    def __init__(self, fields: dict[str, str]):
        self.fields = fields

    def _f(self, name: str) -> float | None:
        v = self.fields.get(name)
        return float(v) if v not in (None, "") else None

    def _j(self, name: str) -> Any:
        v = self.fields.get(name)
        return json.loads(v) if v else None

    id = property(lambda self: self.fields["id"])
    tenant = property(lambda self: self.fields["tenant"])
    status = property(lambda self: Status(self.fields["status"]))
    image_key = property(lambda self: self.fields["image_key"])
    mask_key = property(lambda self: self.fields["mask_key"])
    owner = property(lambda self: self.fields.get("owner", ""))
    created_at = property(lambda self: self._f("created_at") or 0.0)
    started_at = property(lambda self: self._f("started_at"))
    finished_at = property(lambda self: self._f("finished_at"))
    inference_s = property(lambda self: self._f("inference_s"))
    attempts = property(lambda self: int(self.fields.get("attempts") or 0))
    events = property(lambda self: int(self.fields.get("events") or 0))
    cancel_requested = property(lambda self: self.fields.get("cancel_requested") == "1")
    progress = property(
        lambda self: (int(self.fields.get("progress_step") or 0), int(self.fields.get("progress_total") or 0))
    )

    @property
    def input(self) -> JobInput:
        return JobInput.model_validate_json(self.fields["input"])

    @property
    def outputs(self) -> list[StoredOutput]:
        return [StoredOutput.model_validate(o) for o in self._j("outputs") or []]

    @property
    def error(self) -> ErrorInfo | None:
        e = self._j("error")
        return ErrorInfo.model_validate(e) if e else None

    @property
    def model(self) -> ModelInfo | None:
        m = self._j("model")
        return ModelInfo.model_validate(m) if m else None

    @property
    def nsfw(self) -> list[bool] | None:
        return self._j("nsfw")  # type: ignore[no-any-return]

    def manifest(self) -> dict[str, Any]:
        """The durable copy written to S3 when the job ends (no lease or owner: those are live only)."""
        doc = {k: v for k, v in self.fields.items() if k not in ("owner", "lease_until", "cancel_requested", "events")}
        doc["manifest_version"] = "1"
        return doc

    @classmethod
    def from_manifest(cls, doc: dict[str, Any]) -> JobRecord:
        return cls({k: str(v) for k, v in doc.items() if k != "manifest_version"})


class JobStore:
    """Redis-backed job records, queue order, tenant index, worker registry and API keys."""

    def __init__(self, url: str, ttl_s: int, max_attempts: int = 3):
        # Fail fast (two quick retries): a per-step progress write must not stall a GPU for seconds
        # while Redis restarts. Callers that must not lose a write (ending a job) retry longer.
        self.r: redis.Redis = redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=10,
            socket_connect_timeout=3,
            health_check_interval=30,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        )
        self.ttl_s = ttl_s
        self.max_attempts = max_attempts
        self._create = self.r.register_script(_CREATE)
        self._transition = self.r.register_script(_TRANSITION)
        self._claim = self.r.register_script(_CLAIM)
        self._progress = self.r.register_script(_PROGRESS)
        self._cancel = self.r.register_script(_CANCEL)
        self._wait_turn = self.r.register_script(_WAIT_TURN)

    # keys
    @staticmethod
    def job_key(job_id: str) -> str:
        return f"{PREFIX}job:{job_id}"

    @staticmethod
    def queue_key(queue: str = QUEUE) -> str:
        return f"{PREFIX}queue:{queue}"

    @staticmethod
    def tenant_queue_key(tenant: str) -> str:
        """The tenant's jobs still waiting, for per-tenant limits (kept by the same Lua scripts)."""
        return f"{PREFIX}tqueue:{tenant}"

    @staticmethod
    def batch_queue_key(bkey: str) -> str:
        """Waiting jobs that can share a pipeline call, oldest first (kept by the same Lua scripts)."""
        return f"{PREFIX}bq:{bkey}"

    @staticmethod
    def events_channel(job_id: str) -> str:
        """Pub/sub channel of a job's status and progress events (published by the Lua scripts)."""
        return f"{PREFIX}events:{job_id}"

    @staticmethod
    def deliveries_key(job_id: str) -> str:
        """The job's webhook delivery log."""
        return f"{PREFIX}webhooks:{job_id}"

    @staticmethod
    def tenant_key(tenant: str) -> str:
        return f"{PREFIX}tenant:{tenant}:jobs"

    def ping(self) -> bool:
        try:
            return bool(self.r.ping())
        except redis.RedisError:
            return False

    # lifecycle
    def create(
        self, job_id: str, tenant: str, params: JobInput, image_key: str, mask_key: str, bkey: str = ""
    ) -> JobRecord:
        """Record a queued job; `bkey` (shared.schemas.batch_key) lets workers find its batch-mates."""
        now = time.time()
        fields = {
            "id": job_id,
            "tenant": tenant,
            "status": Status.queued.value,
            "created_at": repr(now),
            "input": params.model_dump_json(),
            "image_key": image_key,
            "mask_key": mask_key,
            "progress_step": "0",
            "progress_total": str(int(params.num_inference_steps * params.strength)),
            "attempts": "0",
            "bkey": bkey,
            "rows": str(params.num_outputs),
        }
        flat = [x for kv in fields.items() for x in kv]
        seq = self._create(
            keys=[
                self.job_key(job_id),
                self.queue_key(),
                self.tenant_key(tenant),
                f"{PREFIX}seq",
                self.tenant_queue_key(tenant),
                self.batch_queue_key(bkey),
            ],
            args=[job_id, MAX_TENANT_INDEX, *flat],
        )
        fields["seq"] = str(seq)
        return JobRecord(fields)

    def get(self, job_id: str) -> JobRecord | None:
        fields = self.r.hgetall(self.job_key(job_id))
        return JobRecord(fields) if fields else None  # type: ignore[arg-type]

    def get_many(self, job_ids: list[str]) -> list[JobRecord | None]:
        pipe = self.r.pipeline(transaction=False)
        for jid in job_ids:
            pipe.hgetall(self.job_key(jid))
        return [JobRecord(f) if f else None for f in pipe.execute()]

    def transition(self, job_id: str, status: Status, owner: str = "", **fields: Any) -> tuple[bool, Status | None]:
        """Move a job forward to `status`, setting `fields`; (moved, status before)."""
        if status.is_terminal:
            fields.setdefault("finished_at", time.time())
        flat = [x for k, v in fields.items() for x in (k, _encode(v))]
        err = fields.get("error")
        stat = f"finished:{status.value}:{err.get('code', '') if isinstance(err, dict) else ''}"
        res, prev = self._transition(
            keys=[self.job_key(job_id), self.queue_key()], args=[status.value, owner, self.ttl_s, job_id, stat, *flat]
        )
        return res == "ok", (Status(prev) if prev else None)

    def claim(self, job_id: str, owner: str, lease_s: float) -> tuple[str, float]:
        """Take a job to run: ('claimed', attempt) | ('owned', lease seconds left) | ('terminal'|'missing'|'exhausted', _)."""
        now = time.time()
        err = json.dumps(
            {"code": "worker_lost", "message": f"the job's worker died {self.max_attempts} times running it"}
        )
        res, val = self._claim(
            keys=[self.job_key(job_id), self.queue_key()],
            args=[owner, repr(now), repr(now + lease_s), self.max_attempts, job_id, self.ttl_s, err],
        )
        try:
            num = float(val)
        except ValueError:
            num = 0.0
        return res, num

    def report(self, job_id: str, owner: str, lease_s: float, step: int | None = None, total: int | None = None) -> int:
        """Renew the lease (and record progress); 1 if a cancel was asked, -1 if the job is no longer ours."""
        return int(
            self._progress(
                keys=[self.job_key(job_id)],
                args=[owner, repr(time.time() + lease_s), "" if step is None else step, total or 0, job_id],
            )
        )

    def report_many(
        self, running: list[tuple[str, str]], lease_s: float, step: int | None = None, total: int | None = None
    ) -> list[int]:
        """`report` for every (job id, owner) of a batch in one round trip."""
        until = repr(time.time() + lease_s)
        pipe = self.r.pipeline(transaction=False)
        for job_id, owner in running:
            self._progress(
                keys=[self.job_key(job_id)],
                args=[owner, until, "" if step is None else step, total or 0, job_id],
                client=pipe,
            )
        return [int(x) for x in pipe.execute()]

    def take_batchable(
        self, bkey: str, max_rows: int, owner_prefix: str, lease_s: float, scan: int = 64
    ) -> tuple[list[tuple[str, str]], list[str]]:
        """Claim the oldest waiting jobs of `bkey`, together at most `max_rows` rows.

        Returns (claimed (id, owner) pairs, ids that ran out of attempts and were failed instead).
        Each claim is the same atomic script a job's own message uses, so two workers can never both
        take a job, and the job's own message later finds it running or ended and does nothing.
        """
        ids: list[str] = self.r.zrange(self.batch_queue_key(bkey), 0, scan - 1)  # type: ignore[assignment]
        if not ids:
            return [], []
        pipe = self.r.pipeline(transaction=False)
        for jid in ids:
            pipe.hmget(self.job_key(jid), ["rows", "solo"])
        claimed: list[tuple[str, str]] = []
        exhausted: list[str] = []
        left = max_rows
        for jid, (rows, solo) in zip(ids, pipe.execute(), strict=True):
            n = int(rows or 1)
            if n > left or solo == "1":
                continue
            owner = f"{owner_prefix}/{secrets.token_hex(4)}"
            outcome, _ = self.claim(jid, owner, lease_s)
            if outcome == "claimed":
                claimed.append((jid, owner))
                left -= n
            elif outcome == "exhausted":
                exhausted.append(jid)
            if left <= 0:
                break
        return claimed, exhausted

    def set_batch(self, leader_id: str, members: list[tuple[str, str]], ttl_s: int) -> None:
        """Who shares the leader's call, for the worker parent that must end them if the call is killed."""
        key = f"{PREFIX}batch:{leader_id}"
        pipe = self.r.pipeline()
        pipe.delete(key)
        if members:
            pipe.hset(key, mapping=dict(members))
            pipe.expire(key, ttl_s)
        pipe.execute()

    def batch_members(self, leader_id: str) -> list[tuple[str, str]]:
        members: dict[str, str] = self.r.hgetall(f"{PREFIX}batch:{leader_id}")  # type: ignore[assignment]
        return list(members.items())

    def take_wait_turn(self, job_id: str, token: str, next_token: str, ttl_s: float) -> bool:
        """Whether a message that found its job running elsewhere may wait for it (retry later).

        One message waits per job. The broker hands out again any message held past its visibility
        timeout, a waiting one too; if every copy waited and retried, copies would double each round.
        The waiter's retry carries `next_token` and keeps the turn; any other copy ends (the job still
        has its waiter). The turn lapses after `ttl_s`, so a waiter that vanished is replaced.
        """
        return bool(self._wait_turn(keys=[f"{PREFIX}waiter:{job_id}"], args=[token, next_token, int(ttl_s * 1000)]))

    def break_batch(self, leader_id: str) -> bool:
        """A batch's call was killed or crashed: the leader and every member run again alone.

        Returns False when the leader ran no recorded batch (nothing was changed)."""
        members = self.batch_members(leader_id)
        if not members:
            return False
        for job_id, owner in [(leader_id, ""), *members]:
            self.run_alone(job_id, owner)
        self.set_batch(leader_id, [], 0)
        return True

    def run_alone(self, job_id: str, owner: str = "") -> None:
        """Its batch broke (a hang, a crash): drop the lease now, and never batch this job again, so a
        job that breaks a call fails by itself and its batch-mates succeed on their own."""
        key = self.job_key(job_id)
        if self.r.hget(key, "status") == "running" and (not owner or self.r.hget(key, "owner") == owner):
            self.r.hset(key, mapping={"lease_until": "0", "solo": "1"})

    def release(self, job_id: str, owner: str = "") -> None:
        """Drop a running job's lease at once (its worker died), so a redelivered copy may claim it."""
        key = self.job_key(job_id)
        if not owner or self.r.hget(key, "owner") == owner:
            self.r.hset(key, "lease_until", "0")

    def request_cancel(self, job_id: str) -> str:
        """'canceled' (was queued), 'requested' (running: stops at its next step), 'missing', or the terminal status."""
        return str(
            self._cancel(keys=[self.job_key(job_id), self.queue_key()], args=[repr(time.time()), self.ttl_s, job_id])
        )

    def queue_position(self, job_id: str) -> int | None:
        return self.r.zrank(self.queue_key(), job_id)  # type: ignore[return-value]

    def record_duration(self, seconds: float) -> None:
        """Remember how long a job held a worker, for queue ETAs."""
        pipe = self.r.pipeline(transaction=False)
        pipe.lpush(f"{PREFIX}durations", f"{seconds:.4f}")
        pipe.ltrim(f"{PREFIX}durations", 0, 99)
        pipe.execute()

    def eta_s(self, position: int) -> float | None:
        """Seconds until a job at `position` starts: jobs ahead × recent median job time ÷ ready workers."""
        pipe = self.r.pipeline(transaction=False)
        pipe.lrange(f"{PREFIX}durations", 0, 99)
        pipe.zcount(f"{PREFIX}workers", time.time(), "+inf")
        recent, workers = pipe.execute()
        if not recent or not workers:
            return None
        values = sorted(float(v) for v in recent)
        return round((position + 1) * values[len(values) // 2] / workers, 2)

    def queue_length(self) -> int:
        return int(self.r.zcard(self.queue_key()))  # type: ignore[arg-type]

    def queued_for(self, tenant: str) -> int:
        return int(self.r.zcard(self.tenant_queue_key(tenant)))  # type: ignore[arg-type]

    def list_ids(self, tenant: str, limit: int, cursor: str | None) -> list[str]:
        """The tenant's job ids, newest first, strictly older than `cursor`."""
        top = f"({cursor}" if cursor else "+"
        return self.r.zrange(self.tenant_key(tenant), top, "-", desc=True, bylex=True, offset=0, num=limit)  # type: ignore[return-value]

    # workers
    def worker_alive(self, name: str, ttl_s: float, info: dict[str, str]) -> None:
        pipe = self.r.pipeline()
        pipe.zadd(f"{PREFIX}workers", {name: time.time() + ttl_s})
        pipe.hset(f"{PREFIX}worker:{name}", mapping=info)  # type: ignore[arg-type]
        pipe.expire(f"{PREFIX}worker:{name}", int(ttl_s) + 1)
        pipe.execute()

    def worker_gone(self, name: str) -> None:
        self.r.zrem(f"{PREFIX}workers", name)

    def ready_workers(self) -> list[dict[str, str]]:
        names = self.r.zrangebyscore(f"{PREFIX}workers", time.time(), "+inf")
        pipe = self.r.pipeline(transaction=False)
        for n in names:  # type: ignore[union-attr]
            pipe.hgetall(f"{PREFIX}worker:{n!s}")
        return [dict(h, name=n) for n, h in zip(names, pipe.execute(), strict=True) if h]  # type: ignore[arg-type]

    # api keys: only a SHA-256 of each key is ever stored
    def add_api_key(self, key_hash: str, tenant: str) -> None:
        self.r.hset(f"{PREFIX}apikeys", key_hash, tenant)

    def revoke_api_key(self, key_hash: str) -> bool:
        return bool(self.r.hdel(f"{PREFIX}apikeys", key_hash))

    def tenant_for_key_hash(self, key_hash: str) -> str | None:
        return self.r.hget(f"{PREFIX}apikeys", key_hash)  # type: ignore[return-value]

    def api_key_count(self) -> int:
        return int(self.r.hlen(f"{PREFIX}apikeys"))  # type: ignore[arg-type]
