"""`Idempotency-Key`: one key, one job, for 24 hours; the same key with another body is a conflict.

A key is reserved for a request body's fingerprint before the job exists, so two concurrent
requests with one key make one job: the second waits for the first and replays its answer.
"""

from __future__ import annotations

import time

import redis

from shared import keys
from shared.errors import Code, Problem

TTL_S = 24 * 3600
WAIT_S = 15.0


def reserve(r: redis.Redis, tenant: str, key: str, fingerprint: str) -> str | None:
    """None: the key is now ours, make the job. Else the id of the job it already made (replay).

    Raises 409 if the key was used with another body, or is still being used past `WAIT_S`."""
    rkey = keys.idempotency(tenant, key)
    if r.set(rkey, f"{fingerprint}:", nx=True, ex=TTL_S):
        return None
    deadline = time.monotonic() + WAIT_S
    while True:
        value = r.get(rkey)
        if value is None:  # the first request failed and released the key
            if r.set(rkey, f"{fingerprint}:", nx=True, ex=TTL_S):
                return None
            continue
        fp, _, job_id = str(value).partition(":")
        if fp != fingerprint:
            raise Problem(409, Code.idempotency_key_reused, "this Idempotency-Key was used with another request body")
        if job_id:
            return job_id
        if time.monotonic() > deadline:
            raise Problem(
                409, Code.idempotency_key_in_use, "a request with this Idempotency-Key is still being processed"
            )
        time.sleep(0.05)  # a concurrent request with the same key is creating the job


def record(r: redis.Redis, tenant: str, key: str, fingerprint: str, job_id: str) -> None:
    """The job the key made: later requests with the key replay it."""
    r.set(keys.idempotency(tenant, key), f"{fingerprint}:{job_id}", ex=TTL_S)


def release(r: redis.Redis, tenant: str, key: str) -> None:
    """The request failed before a job existed: the key is free again."""
    r.delete(keys.idempotency(tenant, key))
