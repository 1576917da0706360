"""The inference workers that are ready, and how fast they get through jobs (for queue ETAs)."""

from __future__ import annotations

import time

import redis

from shared import keys
from shared.jobs import scripts

# A heartbeat registers its worker unless the worker was declared gone: a process being killed may
# beat once more between the parent's `gone` and the kill, and must not come back as ready.
_ALIVE = """
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
-- Workers whose heartbeat lapsed (crashed, lost with their host) are forgotten: the set stays as large as the fleet.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. redis.call('TIME')[1])
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], unpack(ARGV, 4))
redis.call('EXPIRE', KEYS[2], ARGV[3])
return 1
"""


class Registry:
    def __init__(self, r: redis.Redis):
        self.r = r
        self._alive = r.register_script(_ALIVE)
        self._eta = r.register_script(scripts.ETA)

    def alive(self, name: str, ttl_s: float, info: dict[str, str]) -> None:
        """A worker's heartbeat: ready for another `ttl_s` seconds (unless it was declared gone)."""
        fields = [x for kv in info.items() for x in kv]
        self._alive(
            keys=[keys.workers(), keys.worker(name), keys.worker_gone(name)],
            args=[time.time() + ttl_s, name, int(ttl_s) + 1, *fields],
        )

    def gone(self, name: str, for_s: int = 3600) -> None:
        """`name` is no longer a ready worker, and its heartbeat, should it beat again, does not bring
        it back (a process id is not reused within the hour)."""
        pipe = self.r.pipeline()
        pipe.set(keys.worker_gone(name), "1", ex=for_s)
        pipe.zrem(keys.workers(), name)
        pipe.execute()

    def ready(self) -> list[dict[str, str]]:
        names = self.r.zrangebyscore(keys.workers(), time.time(), "+inf")
        pipe = self.r.pipeline(transaction=False)
        for n in names:  # type: ignore[union-attr]
            pipe.hgetall(keys.worker(str(n)))
        return [dict(h, name=n) for n, h in zip(names, pipe.execute(), strict=True) if h]  # type: ignore[arg-type]

    def record_duration(self, seconds: float) -> None:
        """Remember how long a job held a worker (a micro-batch's time shared by its jobs)."""
        pipe = self.r.pipeline(transaction=False)
        pipe.lpush(keys.durations(), f"{seconds:.4f}")
        pipe.ltrim(keys.durations(), 0, 99)
        pipe.execute()

    def eta_s(self, position: int) -> float | None:
        """Seconds until a job at `position` starts: (jobs ahead + 1) × the recent median job time ÷ the
        ready workers (`scripts.ETA`, the formula a submit's answer uses too); None when unknown."""
        eta = self._eta(keys=[keys.durations(), keys.workers()], args=[position, repr(time.time())])
        return float(eta) if eta else None
