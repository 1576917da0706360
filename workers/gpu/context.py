"""What an inference worker process holds for its whole life, and its heartbeat."""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_all
from dataclasses import dataclass, field
from typing import TypeVar

from shared.config import Settings
from shared.services import Services
from workers.models.loading import LoadedPipeline
from workers.models.lora_cache import LoraCache
from workers.models.safety import Checker

log = logging.getLogger(__name__)
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
    # A micro-batch's jobs end (encode, upload, end) while the next pipeline call runs: the Celery worker.
    # Off, they end before `process_job` returns: the loops of tests that are themselves the worker.
    ends_behind: bool = False
    current: list[tuple[str, str]] = field(default_factory=list)  # (job id, lease owner) running now
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _pool: ThreadPoolExecutor | None = None
    _enders: ThreadPoolExecutor | None = None
    _ending: list[tuple[tuple[str, str], Future[None]]] = field(default_factory=list)  # lease, its ending
    _loras: LoraCache | None = None

    def side_by_side(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """`fn` over `items` at once, each in a copy of the caller's context (its trace, its log ids),
        on the threads that start and end jobs; their results in order, the first error raising."""
        if len(items) == 1:
            return [fn(items[0])]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=SIDE_BY_SIDE, thread_name_prefix="jobs")
        parent = contextvars.copy_context()
        return list(self._pool.map(lambda item: parent.copy().run(fn, item), items))

    def end_side_by_side(
        self, fn: Callable[[T], object], items: Sequence[T], leases: Sequence[tuple[str, str]]
    ) -> None:
        """End a micro-batch's jobs: `fn` over `items` side by side, as `side_by_side`. With `ends_behind`
        they end in the background: the next pipeline call does not wait for their uploads, and the
        heartbeat renews their `leases` meanwhile. At most one micro-batch ends behind: this waits for
        the one before first (so memory and S3 traffic stay bounded). `fn` handles its own errors: one
        that escapes is logged."""
        if not self.ends_behind:
            self.side_by_side(fn, items)
            return
        self.wait_endings()
        if self._enders is None:
            self._enders = ThreadPoolExecutor(max_workers=SIDE_BY_SIDE, thread_name_prefix="endings")
        parent = contextvars.copy_context()

        def one(item: T) -> None:
            try:
                parent.copy().run(fn, item)
            except Exception:
                log.exception("a job's ending failed; its lease lapses and it runs again")

        with self._lock:
            self._ending = [(lease, self._enders.submit(one, item)) for lease, item in zip(leases, items, strict=True)]

    def ending(self) -> list[tuple[str, str]]:
        """(job id, lease owner) of the jobs still ending behind the current call."""
        with self._lock:
            return [lease for lease, f in self._ending if not f.done()]

    def wait_endings(self, timeout: float | None = None) -> bool:
        """Until the micro-batch ending behind has ended (True), or `timeout` seconds passed (False).
        Before a process exits, so that no finished job is left to its lease to run again."""
        with self._lock:
            futures = [f for _, f in self._ending]
        return not wait_all(futures, timeout).not_done

    @property
    def settings(self) -> Settings:
        return self.svc.settings

    def lora_cache(self) -> LoraCache:
        """The LoRA adapters this worker keeps on disk (made at first use)."""
        if self._loras is None:
            s = self.settings
            self._loras = LoraCache(self.svc.storage, s.data_dir / "loras", s.lora_disk_cache_bytes)
        return self._loras

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
            info={
                "model": self.pipeline.name,
                "revision": self.pipeline.revision,
                "device": self.pipeline.device,
                "lane": self.svc.leases.lane,
            },
        )
        with self._lock:
            cur = list(self.current)
        cur += self.ending()
        if cur:
            self.svc.leases.report_many(cur, self.lease_s)
        for job_id in self.svc.leases.lapsed(every_s=self.lease_s):
            self.svc.queue.send_job(job_id)
        for _ in range(self.svc.leases.missing_turns(every_s=self.lease_s)):
            self.svc.queue.send_job("")
