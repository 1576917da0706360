"""`Idempotency-Key`: one key, one job, for 24 hours; the same key with another body is a conflict.

A key is reserved for a request body's fingerprint before the job exists, so two concurrent
requests with one key make one job: the second waits for the first and replays its answer. The
reservation is short-lived and carries a token of its own: a request that dies holding it frees the
key within `RESERVE_TTL_S`, a reservation whose reply was lost is still known as ours, and a release
never frees a key that already names a job. The job's record names its key in the same atomic step
that creates it (`JobStore.create(idempotency=...)`), so a job always answers its key.
"""

from __future__ import annotations

import secrets
import time

import redis

from shared import keys
from shared.errors import Code, Problem

TTL_S = 24 * 3600
WAIT_S = 15.0
RESERVE_TTL_S = 60  # longer than any submit takes (its storage and Redis calls give up within seconds)
_RESERVED = "~"  # a reservation's value: <fingerprint>:~<token>; a job's: <fingerprint>:<job id>

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Reservation:
    """The key, held for one request until its job names it (`entry`) or it is released."""

    def __init__(self, tenant: str, key: str, fingerprint: str):
        self.rkey = keys.idempotency(tenant, key)
        self.fingerprint = fingerprint
        self.value = f"{fingerprint}:{_RESERVED}{secrets.token_hex(8)}"

    def entry(self, job_id: str) -> tuple[str, str, int, str]:
        """What the job's record step writes to the key, if it still holds this reservation: (key,
        value, ttl, this reservation)."""
        return self.rkey, f"{self.fingerprint}:{job_id}", TTL_S, self.value


def reserve(r: redis.Redis, tenant: str, key: str, fingerprint: str) -> tuple[Reservation | None, str | None]:
    """(our reservation, None): make the job. Else (None, the id of the job it already made): replay.

    Raises 409 if the key was used with another body, or is still being used past `WAIT_S`."""
    mine = Reservation(tenant, key, fingerprint)
    deadline = time.monotonic() + WAIT_S
    while True:
        if r.set(mine.rkey, mine.value, nx=True, ex=RESERVE_TTL_S):
            return mine, None
        value = r.get(mine.rkey)
        if value is None:  # the other request failed and released the key
            continue
        if value == mine.value:  # ours: the first try's reply was lost, and the SET was sent again
            return mine, None
        fp, _, job_id = str(value).partition(":")
        if fp != fingerprint:
            raise Problem(409, Code.idempotency_key_reused, "this Idempotency-Key was used with another request body")
        if job_id and not job_id.startswith(_RESERVED):
            return None, job_id
        if time.monotonic() > deadline:
            raise Problem(
                409, Code.idempotency_key_in_use, "a request with this Idempotency-Key is still being processed"
            )
        time.sleep(0.05)  # a concurrent request with the same key is creating the job


_TAKE_OVER = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', tonumber(ARGV[3]))
return 1
"""


def take_over(r: redis.Redis, tenant: str, key: str, fingerprint: str, gone_job: str) -> Reservation:
    """The key names a job that no longer exists (deleted, or forgotten by Redis): a new request with it
    makes a new job, which the key then names. 409 if another request took the key over first."""
    mine = Reservation(tenant, key, fingerprint)
    if not r.eval(_TAKE_OVER, 1, mine.rkey, f"{fingerprint}:{gone_job}", mine.value, RESERVE_TTL_S):
        raise Problem(409, Code.idempotency_key_in_use, "a request with this Idempotency-Key is still being processed")
    return mine


def release(r: redis.Redis, held: Reservation) -> None:
    """The request made no job: the key is free again (unless a job names it: then nothing changes)."""
    try:
        r.eval(_RELEASE, 1, held.rkey, held.value)
    except redis.RedisError:  # the reservation lapses by itself
        pass
