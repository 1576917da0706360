"""The inference workers that are ready, and how fast they get through jobs (for queue ETAs)."""

from __future__ import annotations

import time

import redis

from shared import keys


class Registry:
    def __init__(self, r: redis.Redis):
        self.r = r

    def alive(self, name: str, ttl_s: float, info: dict[str, str]) -> None:
        """A worker's heartbeat: ready for another `ttl_s` seconds."""
        pipe = self.r.pipeline()
        pipe.zadd(keys.workers(), {name: time.time() + ttl_s})
        pipe.hset(keys.worker(name), mapping=info)  # type: ignore[arg-type]
        pipe.expire(keys.worker(name), int(ttl_s) + 1)
        pipe.execute()

    def gone(self, name: str) -> None:
        self.r.zrem(keys.workers(), name)

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
        """Seconds until a job at `position` starts: jobs ahead × recent median job time ÷ ready workers."""
        pipe = self.r.pipeline(transaction=False)
        pipe.lrange(keys.durations(), 0, 99)
        pipe.zcount(keys.workers(), time.time(), "+inf")
        recent, workers = pipe.execute()
        if not recent or not workers:
            return None
        values = sorted(float(v) for v in recent)
        return round((position + 1) * values[len(values) // 2] / workers, 2)
