"""What an inference worker process holds for its whole life, and its heartbeat."""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from shared.config import Settings
from shared.services import Services
from workers.models.loading import LoadedPipeline
from workers.models.safety import Checker

T = TypeVar("T")
R = TypeVar("R")
SIDE_BY_SIDE = 8  # jobs of a micro-batch started or ended at once


class _NeverRaised(BaseException):
    """Stands for the task runtime's soft-time-limit exception where there is none (a test's own loop)."""


@dataclass
class WorkerContext:
    svc: Services
    pipeline: LoadedPipeline
    name: str
    checker: Checker | None = None  # the safety checker, when INPAINT_SAFETY is not none
    # What the task runtime raises inside a job at its soft time limit (Celery's SoftTimeLimitExceeded,
    # handed in by workers/gpu/tasks.py, so nothing else here knows Celery).
    time_limit_error: type[BaseException] = _NeverRaised
    current: list[tuple[str, str]] = field(default_factory=list)  # (job id, lease owner) running now
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _pool: ThreadPoolExecutor | None = None

    def side_by_side(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """`fn` over `items` at once, each in a copy of the caller's context (its trace, its log ids),
        on the threads that start and end jobs; their results in order, the first error raising."""
        if len(items) == 1:
            return [fn(items[0])]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=SIDE_BY_SIDE, thread_name_prefix="jobs")
        parent = contextvars.copy_context()
        return list(self._pool.map(lambda item: parent.copy().run(fn, item), items))

    @property
    def settings(self) -> Settings:
        return self.svc.settings

    @property
    def lease_s(self) -> float:
        """A job's lease: four missed heartbeats and another worker may take the job."""
        return max(2.0, 4 * self.settings.worker_heartbeat_s)

    def running(self, jobs: list[tuple[str, str]]) -> None:
        with self._lock:
            self.current = list(jobs)

    def heartbeat(self) -> None:
        """Advertise readiness, renew the running jobs' leases and give a turn to any job whose lease
        lapsed (called from a thread)."""
        self.svc.registry.alive(
            self.name,
            ttl_s=3 * self.settings.worker_heartbeat_s,
            info={"model": self.pipeline.name, "revision": self.pipeline.revision, "device": self.pipeline.device},
        )
        with self._lock:
            cur = list(self.current)
        if cur:
            self.svc.leases.report_many(cur, self.lease_s)
        for job_id in self.svc.leases.lapsed(every_s=self.lease_s):
            self.svc.queue.send_job(job_id)
