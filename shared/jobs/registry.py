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
-- Workers whose heartbeat lapsed (crashed, lost with their host) are forgotten: the sets stay as large as the fleet.
for _, set in ipairs({KEYS[1], KEYS[4]}) do
  redis.call('ZREMRANGEBYSCORE', set, '-inf', '(' .. redis.call('TIME')[1])
  redis.call('ZADD', set, ARGV[1], ARGV[2])
end
redis.call('HSET', KEYS[2], unpack(ARGV, 4))
redis.call('EXPIRE', KEYS[2], ARGV[3])
return 1
"""


class Registry:
    def __init__(self, r: redis.Redis, lane: str = ""):
        self.r, self.lane = r, lane  # a worker's model's lane (shared.catalog): the set it is ready in
        self._alive = r.register_script(_ALIVE)
        self._eta = r.register_script(scripts.ETA)

    def alive(self, name: str, ttl_s: float, info: dict[str, str]) -> None:
        """A worker's heartbeat: ready for another `ttl_s` seconds (unless it was declared gone)."""
        fields = [x for kv in info.items() for x in kv]
        self._alive(
            keys=[keys.workers(), keys.worker(name), keys.worker_gone(name), keys.lane_workers(self.lane)],
            args=[time.time() + ttl_s, name, int(ttl_s) + 1, *fields],
        )

    def gone(self, name: str, for_s: int = 3600) -> None:
        """`name` is no longer a ready worker, and its heartbeat, should it beat again, does not bring
        it back (a process id is not reused within the hour)."""
        pipe = self.r.pipeline()
        pipe.set(keys.worker_gone(name), "1", ex=for_s)
        pipe.zrem(keys.workers(), name)
        pipe.zrem(keys.lane_workers(self.lane), name)
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
        pipe.lpush(keys.durations(self.lane), f"{seconds:.4f}")
        pipe.ltrim(keys.durations(self.lane), 0, 99)
        pipe.execute()

    def eta_s(self, position: int, lane: str = "") -> float | None:
        """Seconds until a job at `position` of `lane` starts: (jobs ahead + 1) × the lane's recent median
        job time ÷ its ready workers (`scripts.ETA`, the formula a submit's answer uses too); None when unknown."""
        eta = self._eta(keys=[keys.durations(lane), keys.lane_workers(lane)], args=[position, repr(time.time())])
        return float(eta) if eta else None

    def ready_in(self, lane: str) -> int:
        """How many workers of a lane (a model) are ready."""
        return int(self.r.zcount(keys.lane_workers(lane), time.time(), "+inf"))

    def lane_state(self, lane: str) -> tuple[int, int, float | None]:
        """A lane's ready workers, its waiting jobs, and the ETA of a job submitted now (None: unknown)."""
        pipe = self.r.pipeline(transaction=False)
        pipe.zcount(keys.lane_workers(lane), time.time(), "+inf")
        pipe.zcard(keys.waiting(lane))
        ready, depth = (int(x) for x in pipe.execute())
        return ready, depth, self.eta_s(depth, lane)
