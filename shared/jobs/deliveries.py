"""Webhook deliveries of job events: which to send (`Notifier`), when each attempt is due (`Deliveries`)
and what each attempt did (the log).

The API and the workers only schedule a delivery; the I/O worker does the network work
(`workers/io/webhooks.py`), so a slow receiver never holds a GPU.

Retries wait in Redis, not in a worker: each delivery is a small record and an entry in one sorted
set scored by when its next attempt is due. A message held in a worker's memory past the broker's
visibility timeout is handed out again (Celery's Redis caveat), so a countdown of hours would
multiply; a due time in Redis does not. The I/O worker claims due deliveries (one atomic step gives
each a fresh claim token and pushes its due time one lease ahead) and runs one attempt per claim;
an attempt whose token is no longer the delivery's current one does nothing. A worker that dies
mid-attempt leaves the delivery to come due again when its lease runs out. An attempt's later steps
(retry, defer) are fenced by the claim its begin set: a stale attempt's steps change nothing of a newer
one's. No step makes a record: one whose TTL ran out is gone, and its due time with it.

Each step is safe to run twice (Redis may run a command whose reply is lost, and it is sent again): a
job's terminal event is scheduled once whoever concludes its ending and however often; a claim of due
deliveries remembers its answer for a while under its own token; an attempt begins under its claim and
its own nonce; a retry names the attempt it follows; a deferral puts it back at one due time.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import redis

from shared import keys, predictions
from shared.db import acked
from shared.jobs.record import JobRecord, rfc3339
from shared.jobs.store import JobStore
from shared.jobs.view import to_job
from shared.queue import Queue
from shared.storage import Storage

PROGRESS_MIN_INTERVAL_S = 0.5
PROGRESS_TRACKED = 4096  # jobs whose last progress delivery a process remembers
TERMINAL_EVENTS = tuple(
    f"{kind}.{end}" for kind in ("job", "prediction") for end in ("succeeded", "failed", "canceled")
)
# Past its lease a delivery is claimed again, and a second attempt sends it again. An attempt takes at
# most its DNS lookup (≤ 30 s, a deadline of its own), the webhook deadline (≤ WEBHOOK_TIMEOUT_MAX_S, 20)
# and a job read and a few Redis steps: at least ten seconds are left for those.
CLAIM_LEASE_S = 60.0
_LOG_CAP = 500

# KEYS: due set, this claim's memo. ARGV: now, lease until, how many, token prefix (new per claim), the
# records' key prefix. Claims what is due: each gets a new token (its record's `claim`) and is due again
# only when the lease runs out. A second run of the same claim answers the first run's list. A delivery
# whose record ran out (or holds no message: a claim an earlier release set on a deleted key) is dropped.
_CLAIM_DUE = """
local memo = redis.call('GET', KEYS[2])
if memo then return cjson.decode(memo) end
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for i, id in ipairs(ids) do
  local rec = ARGV[5] .. id
  if redis.call('HEXISTS', rec, 'msg_id') == 0 then
    redis.call('DEL', rec)
    redis.call('ZREM', KEYS[1], id)
  else
    local token = ARGV[4] .. i
    redis.call('ZADD', KEYS[1], ARGV[2], id)
    redis.call('HSET', rec, 'claim', token)
    out[#out + 1] = id
    out[#out + 1] = token
  end
end
if #out > 0 then redis.call('SET', KEYS[2], cjson.encode(out), 'EX', 120) end
return out
"""

# KEYS: the delivery's record. ARGV: token, nonce (new per begin). Starts the attempt of this claim,
# once: the record, or nothing. The same begin run again (its reply lost) starts it still.
_BEGIN = """
local claim = redis.call('HGET', KEYS[1], 'claim')
if claim ~= ARGV[1] and claim ~= 'begun:' .. ARGV[2] then return false end
redis.call('HSET', KEYS[1], 'claim', 'begun:' .. ARGV[2])
return redis.call('HGETALL', KEYS[1])
"""

# KEYS: the job's record, the delivery's record, due set. ARGV: series, token, first attempt due, ttl,
# field/value pairs… The job's terminal event, scheduled once: the token to send its first attempt
# under, or, scheduled before, the claim still waiting for its attempt (a message may have been lost
# with the process that scheduled it; a second one under the same claim begins nothing twice).
_SCHEDULE_END = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
if redis.call('HSETNX', KEYS[1], 'end_webhook', ARGV[1]) == 0 then
  local claim = redis.call('HGET', KEYS[2], 'claim')
  if claim and claim ~= '' and string.sub(claim, 1, 6) ~= 'begun:' then return claim end
  return false
end
redis.call('HSET', KEYS[2], 'claim', ARGV[2], unpack(ARGV, 5))
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[4]))
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
return ARGV[2]
"""

# KEYS: the delivery's record, due set. ARGV: series. Nothing more is due; safe to run twice. Not fenced:
# delivered or given up is the message's outcome, whichever attempt learnt it (a newer claim not begun
# yet then sends nothing twice); it only deletes, so it makes nothing.
_FINISH = """
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[1])
return 1
"""

# KEYS: the delivery's record, due set. ARGV: series, the attempt's fence, attempts so far (the attempt
# this follows), when the next is due. Only while the attempt's claim is the record's (a record that is
# gone has none); counted once however often it runs.
_RETRY = """
if redis.call('HGET', KEYS[1], 'claim') ~= ARGV[2] then return 0 end
if redis.call('HGET', KEYS[1], 'retries') ~= ARGV[3] then return 0 end
redis.call('HSET', KEYS[1], 'retries', cjson.encode(tonumber(ARGV[3]) + 1))
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
return 1
"""

# KEYS: the delivery's record, due set. ARGV: series, the attempt's fence, when it is due again. The
# attempt, not made, waits for its turn: no retry counted. Only under its claim; twice sets one due time.
_DEFER = """
if redis.call('HGET', KEYS[1], 'claim') ~= ARGV[2] then return 0 end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return 1
"""


@dataclass(frozen=True)
class Delivery:
    """One webhook message: the same `msg_id` (`webhook-id`) and event on every attempt."""

    job_id: str
    tenant: str
    url: str
    msg_id: str
    event_type: str
    at: str
    data: Any  # the job object at the event; None for a terminal event (rebuilt at each attempt)
    retries: int = 0  # attempts so far
    trace: str = ""  # the job's traceparent: each attempt's span belongs to the job's trace


@dataclass(frozen=True)
class Attempt:
    """One begun attempt of a delivery: what to send, and the claim its later steps are fenced by."""

    series: str
    fence: str  # the record's claim while this attempt is the delivery's current one
    delivery: Delivery


class Deliveries:
    """Scheduled deliveries: a record each, and when its next attempt is due."""

    def __init__(self, r: redis.Redis, queue: Queue, ttl_s: int):
        self.r, self.queue, self.ttl_s = r, queue, ttl_s
        self._claim_due = r.register_script(_CLAIM_DUE)
        self._begin = r.register_script(_BEGIN)
        self._schedule_end = r.register_script(_SCHEDULE_END)
        self._retry = r.register_script(_RETRY)
        self._finish = r.register_script(_FINISH)
        self._defer = r.register_script(_DEFER)

    def schedule(self, d: Delivery) -> None:
        """A new delivery, its first attempt now (claimed here and sent to the I/O worker at once)."""
        series = f"d_{uuid.uuid4().hex}"
        token = secrets.token_hex(8)
        doc: dict[str, str] = {k: json.dumps(v) for k, v in asdict(d).items()}
        doc["claim"] = token
        pipe = self.r.pipeline()
        pipe.hset(keys.delivery(series), mapping=doc)  # type: ignore[arg-type]
        pipe.expire(keys.delivery(series), self.ttl_s)
        pipe.zadd(keys.deliveries_due(), {series: time.time() + CLAIM_LEASE_S})
        pipe.execute()
        self.queue.send_delivery(series, token)

    def schedule_end(self, d: Delivery) -> None:
        """The job's terminal event: scheduled once, however often its ending is concluded."""
        series = f"d_{d.job_id}_end"
        doc = [x for k, v in asdict(d).items() for x in (k, json.dumps(v))]
        now = time.time()
        token = self._schedule_end(
            keys=[keys.job(d.job_id), keys.delivery(series), keys.deliveries_due()],
            args=[series, secrets.token_hex(8), repr(now + CLAIM_LEASE_S), self.ttl_s, *doc],
        )
        if token:
            self.queue.send_delivery(series, str(token))

    def claim_due(self, limit: int = 100) -> list[tuple[str, str]]:
        """(delivery, claim token) of every delivery due now, up to `limit`: each attempt once."""
        now = time.time()
        prefix = f"{secrets.token_hex(6)}."
        flat = self._claim_due(
            keys=[keys.deliveries_due(), keys.delivery_claim(prefix)],
            args=[repr(now), repr(now + CLAIM_LEASE_S), limit, prefix, keys.delivery("")],
        )
        return list(zip(flat[::2], flat[1::2], strict=True))

    def begin(self, series: str, token: str) -> Attempt | None:
        """The attempt of this claim, or None (claimed again since, or gone). Behind
        Sentinels, only once a replica holds the attempt's start (`acked`): a primary cut off from its
        replicas sends nothing that a failover would have sent again; `NotReplicated` then, and the
        claim lapses into a later attempt."""
        nonce = secrets.token_hex(6)
        flat = acked(self.r, self._begin, [keys.delivery(series)], [token, nonce])
        if not flat:
            return None
        doc = dict(zip(flat[::2], flat[1::2], strict=True))
        fence = doc.pop("claim")
        return Attempt(series, fence, Delivery(**{k: json.loads(v) for k, v in doc.items()}))

    def retry(self, attempt: Attempt, delay_s: float) -> None:
        """This attempt failed: the next one is due in `delay_s` (nothing if a newer attempt holds it)."""
        now, series = time.time(), attempt.series
        self._retry(
            keys=[keys.delivery(series), keys.deliveries_due()],
            args=[series, attempt.fence, attempt.delivery.retries, repr(now + delay_s)],
        )

    def defer(self, attempt: Attempt, delay_s: float) -> None:
        """This attempt is not made now: it is due again in `delay_s`, no retry counted."""
        series = attempt.series
        self._defer(
            keys=[keys.delivery(series), keys.deliveries_due()],
            args=[series, attempt.fence, repr(time.time() + delay_s)],
        )

    def finish(self, series: str) -> None:
        """Delivered, or given up: nothing more is due. Behind Sentinels, only once a replica holds it
        (`acked`; `NotReplicated` else, and the caller tries again, on the new primary after a failover):
        a finish that only a lost primary held would let the delivery's claim lapse into another send."""
        acked(self.r, self._finish, [keys.delivery(series), keys.deliveries_due()], [series])


def is_prediction(rec: JobRecord) -> bool:
    """Made through Replicate's API: its webhooks carry the prediction object (`shared.predictions`)."""
    return rec.fields.get(predictions.API_FIELD) == "prediction"


def event_data(rec: JobRecord, storage: Storage, public_url: str = "") -> dict[str, Any]:
    """What a webhook about the job carries: the job object, or for a prediction the prediction object,
    its outputs through the API at `public_url`, else presigned (a receiver has no API key)."""
    job = to_job(rec, storage)
    if is_prediction(rec):
        return predictions.to_prediction(rec, job, public_url.rstrip("/") or None)
    return job.model_dump(mode="json")


class Notifier:
    """Schedules one delivery per event the job subscribed to; progress at most every 500 ms per job."""

    def __init__(self, store: JobStore, storage: Storage, deliveries: Deliveries, public_url: str = ""):
        self.store, self.storage, self.deliveries = store, storage, deliveries
        self.public_url = public_url  # the API's external URL: outputs of predictions through the API
        self._last_progress: dict[str, float] = {}

    def __call__(self, rec: JobRecord, event: str) -> None:
        """`event`: started, progress, or completed (any terminal status: the record says which)."""
        params = rec.input
        if not params.webhook or event not in params.webhook_events:
            return
        if event == "progress":
            now = time.monotonic()
            if now - self._last_progress.get(rec.id, 0.0) < PROGRESS_MIN_INTERVAL_S:
                return
            self._last_progress[rec.id] = now
            if len(self._last_progress) > PROGRESS_TRACKED:  # jobs that ended elsewhere, or died
                cutoff = now - PROGRESS_MIN_INTERVAL_S
                self._last_progress = {k: t for k, t in self._last_progress.items() if t > cutoff}
        kind = "prediction" if is_prediction(rec) else "job"
        if event == "completed":
            self._last_progress.pop(rec.id, None)
            # An ended job never changes: its data is rebuilt at each attempt so output URLs stay fresh.
            at = rfc3339(time.time()) or ""
            msg = f"msg_{uuid.uuid4().hex}"
            end = Delivery(
                rec.id, rec.tenant, params.webhook, msg, f"{kind}.{rec.status.value}", at, None, trace=rec.trace
            )
            self.deliveries.schedule_end(end)
            return
        fresh = self.store.get(rec.id) or rec
        event_type = f"{kind}.{event}"
        data = event_data(fresh, self.storage, self.public_url)
        at = rfc3339(time.time()) or ""
        self.deliveries.schedule(
            Delivery(
                rec.id, rec.tenant, params.webhook, f"msg_{uuid.uuid4().hex}", event_type, at, data, trace=rec.trace
            )
        )

    def redeliver(self, rec: JobRecord, attempt: dict[str, Any]) -> None:
        """The same message again (same `webhook-id`, so receivers can de-duplicate), with fresh data."""
        event_type = attempt["event"]
        data = None if event_type in TERMINAL_EVENTS else event_data(rec, self.storage, self.public_url)
        at = attempt.get("timestamp") or rfc3339(time.time()) or ""
        assert rec.input.webhook
        self.deliveries.schedule(
            Delivery(rec.id, rec.tenant, rec.input.webhook, attempt["delivery"], event_type, at, data, trace=rec.trace)
        )


def log_attempt(r: redis.Redis, job_id: str, entry: dict[str, Any], ttl_s: int) -> None:
    """Append one attempt to the job's delivery log (the last 500 are kept, as long as the job)."""
    key = keys.deliveries(job_id)
    pipe = r.pipeline()
    pipe.rpush(key, json.dumps(entry))
    pipe.ltrim(key, -_LOG_CAP, -1)
    pipe.expire(key, ttl_s)
    pipe.execute()


def attempts(r: redis.Redis, job_id: str) -> list[dict[str, Any]]:
    """Every logged attempt, oldest first."""
    return [json.loads(e) for e in r.lrange(keys.deliveries(job_id), 0, -1)]  # type: ignore[union-attr]
