"""What one tenant may hold of what every tenant shares: concurrent event streams and redeliveries.

Counted in Redis, so the caps hold across every API replica. Each refusal is a 429 with
`Retry-After` and a stable code. (Queue and batch caps live where those are created: the job
submission and the batch store.)
"""

from __future__ import annotations

import math
import secrets
import time

import redis

from shared import keys
from shared.config import Settings
from shared.errors import Code, Problem

STREAM_LEASE_S = 60.0  # an open stream renews its place well within this (every few seconds)

# KEYS: the tenant's streams. ARGV: token, now, lease end, cap. Lapsed places are dropped first.
_OPEN_STREAM = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3]) - tonumber(ARGV[2])) + 1)
return 1
"""


class Quotas:
    def __init__(self, r: redis.Redis, settings: Settings):
        self.r, self.settings = r, settings
        self._open_stream = r.register_script(_OPEN_STREAM)

    def open_stream(self, tenant: str) -> str:
        """A place for one more event stream, or 429 `too_many_streams`; close it with `close_stream`."""
        token = secrets.token_hex(8)
        now = time.time()
        cap = self.settings.max_streams_per_tenant
        if not self._open_stream(keys=[keys.streams(tenant)], args=[token, repr(now), repr(now + STREAM_LEASE_S), cap]):
            raise Problem(
                429, Code.too_many_streams, f"you have {cap} event streams open; close one or poll the job instead",
                headers={"Retry-After": "5"},
            )  # fmt: skip
        return token

    def renew_stream(self, tenant: str, token: str) -> None:
        self.r.zadd(keys.streams(tenant), {token: time.time() + STREAM_LEASE_S}, xx=True)

    def close_stream(self, tenant: str, token: str) -> None:
        self.r.zrem(keys.streams(tenant), token)

    def redelivery(self, tenant: str) -> None:
        """Count one redelivery against the tenant's minute, or 429 `too_many_redeliveries`."""
        now = time.time()
        window = int(now // 60)
        key = keys.rate("redeliver", tenant, window)
        pipe = self.r.pipeline()
        pipe.incr(key)
        pipe.expire(key, 120)
        count = int(pipe.execute()[0])
        cap = self.settings.max_redeliveries_per_minute
        if count > cap:
            retry = max(1, math.ceil((window + 1) * 60 - now))
            raise Problem(
                429, Code.too_many_redeliveries, f"at most {cap} redeliveries a minute; retry in {retry}s",
                headers={"Retry-After": str(retry)},
            )  # fmt: skip
