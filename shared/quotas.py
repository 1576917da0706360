"""What one tenant may hold of what every tenant shares: held connections (event streams and waits) and
redeliveries.

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

HOLD_LEASE_S = 30.0  # a held connection's process renews its place well within this; a dead one's lapses

# KEYS: the tenant's held connections. ARGV: token, now, lease end, cap. Lapsed places are dropped first.
_OPEN_HOLD = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 1 end  -- run before, its reply lost: it holds
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3]) - tonumber(ARGV[2])) + 1)
return 1
"""


class Quotas:
    def __init__(self, r: redis.Redis, settings: Settings):
        self.r, self.settings = r, settings
        self._open_hold = r.register_script(_OPEN_HOLD)

    def open_hold(self, tenant: str, code: Code) -> str:
        """A place for one more held connection (an event stream, a wait), or 429 with `code`; give it
        back with `close_hold`. Streams and waits share one budget: each holds a connection and a task."""
        token = secrets.token_hex(8)
        now = time.time()
        cap = self.settings.max_streams_per_tenant
        if not self._open_hold(keys=[keys.held(tenant)], args=[token, repr(now), repr(now + HOLD_LEASE_S), cap]):
            raise Problem(
                429, code, f"you hold {cap} event streams and waits open; close one, or poll the job instead",
                headers={"Retry-After": "5"},
            )  # fmt: skip
        return token

    def renew_holds(self, places: list[tuple[str, str]]) -> None:
        """Push back the lapse of these (tenant, token) places, in one round trip."""
        pipe = self.r.pipeline(transaction=False)
        for tenant, token in places:
            pipe.zadd(keys.held(tenant), {token: time.time() + HOLD_LEASE_S}, xx=True)
            pipe.expire(keys.held(tenant), int(HOLD_LEASE_S) + 1)  # no member outlives it
        pipe.execute()

    def close_hold(self, tenant: str, token: str) -> None:
        self.r.zrem(keys.held(tenant), token)

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
