"""One job from claim to terminal status: fetch inputs, run the pipeline, store outputs, record the end.

Every way a job can end is a value: a terminal status with an error code, never a half-written
result. Outputs are uploaded before the job is marked succeeded; if the job was canceled or ended
meanwhile, the uploads are deleted again.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import redis
from tenacity import retry, retry_if_exception_type, stop_after_attempt, stop_after_delay, wait_exponential

from shared.config import Settings
from shared.imaging import ImageError, encode_image, load_image, load_mask
from shared.jobstore import JobRecord, JobStore
from shared.jobview import write_manifest
from shared.logs import job_context
from shared.metrics import BATCH_SIZE, IMAGES, INFERENCE_SECONDS, JOBS_ENDED, QUEUE_WAIT
from shared.schemas import Status
from shared.storage import Storage, StorageError, job_prefix
from workers import faults
from workers.batching import Item, gather, request_key, run_batch
from workers.inference import Canceled, InpaintRequest, InpaintResult, NonFiniteOutput
from workers.pipelines import LoadedPipeline, rows_for_size
from workers.safety import CONTENT_BLOCKED, Checker, ContentBlocked, apply_policy

log = logging.getLogger(__name__)


class JobOwnedElsewhere(Exception):
    """Another worker holds a live lease on this job; try again once it could have expired."""

    def __init__(self, wait_s: float):
        super().__init__(f"job is leased for another {wait_s:.1f}s")
        self.wait_s = wait_s


class JobFailed(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class WorkerContext:
    """What a worker process holds for its whole life."""

    settings: Settings
    store: JobStore
    storage: Storage
    pipeline: LoadedPipeline
    name: str
    notify: Callable[[JobRecord, str], None] = lambda rec, event: None
    checker: Checker | None = None  # the safety checker, when INPAINT_SAFETY is not none
    current: list[tuple[str, str]] = field(default_factory=list)  # (job id, lease owner) running now
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def lease_s(self) -> float:
        """A job's lease: four missed heartbeats and another worker may take the job."""
        return max(2.0, 4 * self.settings.worker_heartbeat_s)

    def running(self, jobs: list[tuple[str, str]]) -> None:
        with self._lock:
            self.current = list(jobs)

    def heartbeat(self) -> None:
        """Advertise readiness and renew the running jobs' leases (called from a thread)."""
        self.store.worker_alive(
            self.name,
            ttl_s=3 * self.settings.worker_heartbeat_s,
            info={"model": self.pipeline.name, "revision": self.pipeline.revision, "device": self.pipeline.device},
        )
        with self._lock:
            cur = list(self.current)
        if cur:
            self.store.report_many(cur, self.lease_s)


@dataclass
class Running:
    """A job this process has claimed, from claim to its end."""

    rec: JobRecord
    owner: str
    began: float = field(default_factory=time.monotonic)
    request: InpaintRequest | None = None
    uploaded: list[str] = field(default_factory=list)
    seen_total: int = 0
    ended: bool = False

    @property
    def id(self) -> str:
        return self.rec.id


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover
        pass
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


def process_job(ctx: WorkerContext, job_id: str) -> Status | None:
    """Run `job_id` if it is ours to run, with any compatible waiting jobs as its batch-mates.

    Returns the job's terminal status, or None if there was nothing to do. Batch-mates are claimed
    through the job store (the same atomic claim their own messages would use), each ends with its
    own status, outputs and webhook, and their own messages later find them ended and do nothing.
    """
    with job_context(job_id):
        return _process(ctx, job_id)


def _process(ctx: WorkerContext, job_id: str) -> Status | None:
    from celery.exceptions import SoftTimeLimitExceeded

    owner = f"{ctx.name}/{uuid.uuid4().hex[:8]}"
    outcome, value = ctx.store.claim(job_id, owner, ctx.lease_s)
    if outcome == "owned":
        raise JobOwnedElsewhere(value)
    if outcome == "exhausted":
        _finish_record(ctx, job_id, "completed")  # webhook filter word for any terminal status
        return Status.failed
    if outcome != "claimed":
        log.info("job %s: nothing to run (%s %s)", job_id, outcome, value or "")
        return None
    rec = ctx.store.get(job_id)
    if rec is None:
        return None
    leader = _start(ctx, rec, owner)
    batch = [leader]
    ctx.running([(job_id, owner)])
    try:
        if not leader.ended:
            batch = _gather(ctx, leader)
            _execute(ctx, batch)
    except SoftTimeLimitExceeded as exc:
        # The call as a whole ran too long: which job made it so is unknown. Each runs again alone
        # (its own message does that; the leader's is sent again since this one ends now).
        if len(batch) > 1 and redis_retry(ctx.store.break_batch)(leader.id):
            if not leader.ended:
                from workers.celery_app import send_job

                send_job(leader.id)
        else:
            for j in batch:
                if not j.ended:
                    _end_with(ctx, j, exc)
    finally:
        ctx.running([])
        if len(batch) > 1:
            _quietly(ctx.store.set_batch, leader.id, [], 0)
    for j in batch[1:]:
        _finish_record(ctx, j.id, "completed")
    return _finish_record(ctx, job_id, "completed")


def _start(ctx: WorkerContext, rec: JobRecord, owner: str) -> Running:
    """A job just claimed (the leader, or a batch-mate): announced, and its inputs ready or it has ended."""
    if rec.started_at:
        QUEUE_WAIT.observe(max(0.0, rec.started_at - rec.created_at))
    job = Running(rec, owner, seen_total=rec.progress[1])
    ctx.notify(rec, "started")
    try:
        job.request = _prepare(ctx, job)
    except JobFailed as exc:
        _end_with(ctx, job, exc)
    return job


def _quietly(fn: Callable[..., object], *args: object) -> None:
    try:
        fn(*args)
    except redis.RedisError:
        log.warning("%s failed; it expires by itself", getattr(fn, "__name__", fn))


def _gather(ctx: WorkerContext, leader: Running) -> list[Running]:
    """The leader plus waiting jobs that can share its pipeline call, within the batch window."""
    req = leader.request
    assert req is not None
    width, height = req.image.size
    max_rows = rows_for_size(int(ctx.pipeline.extra.get("max_rows", 1)), width, height)
    if ctx.pipeline.kind != "diffusers" or max_rows <= req.num_outputs or leader.rec.fields.get("solo") == "1":
        return [leader]
    bkey = leader.rec.fields.get("bkey") or request_key(req)
    batch = [leader]

    def take(_key: str, rows_left: int) -> list[Item[Running]]:
        claimed, exhausted = ctx.store.take_batchable(bkey, rows_left, ctx.name, ctx.lease_s)
        for jid in exhausted:
            _finish_record(ctx, jid, "completed")
        items: list[Item[Running]] = []
        records = ctx.store.get_many([jid for jid, _ in claimed])
        for (_, owner), rec in zip(claimed, records, strict=True):
            if rec is None:
                continue
            mate = _start(ctx, rec, owner)  # a bad input ends here, alone, never failing its batch-mates
            batch.append(mate)
            ctx.running([(j.id, j.owner) for j in batch])
            if mate.request is not None and not mate.ended:
                items.append(Item(mate.request, mate))
        return items

    gathered = gather(Item(req, leader), take, max_rows, ctx.settings.batch_window_ms / 1000)
    ended = [j for j in batch if j.ended]
    runnable = [it.ref for it in gathered]
    if len(runnable) > 1:
        # The worker's parent reads this if it must kill the call: every member ends, not just the leader.
        ctx.store.set_batch(leader.id, [(j.id, j.owner) for j in runnable[1:]], ctx.settings.job_time_limit_s + 60)
    return runnable + ended


def _execute(ctx: WorkerContext, batch: list[Running]) -> None:
    """One pipeline call for the batch; a failure of the whole call reruns its jobs one by one."""
    jobs = [j for j in batch if not j.ended]
    if not jobs:
        return
    try:
        if ctx.settings.fault_injection:
            for j in jobs:
                faults.before_pipeline(ctx, j.rec)
        started = time.perf_counter()
        results = run_batch(ctx.pipeline, [j.request for j in jobs if j.request], _progress_hook(ctx, jobs))
        INFERENCE_SECONDS.observe(time.perf_counter() - started)
        BATCH_SIZE.observe(len(jobs))
    except Exception as exc:
        from celery.exceptions import SoftTimeLimitExceeded

        if isinstance(exc, SoftTimeLimitExceeded):
            raise
        if _is_oom(exc):
            _free_memory()
        if len(jobs) > 1:
            # Out of memory, or one input breaks the call: alone, each job succeeds or fails on its own.
            log.warning("a batch of %d failed (%s); running its jobs one by one", len(jobs), type(exc).__name__)
            for j in jobs:
                _execute(ctx, [j])
            return
        _end_with(ctx, jobs[0], exc)
        return
    for j, res in zip(jobs, results, strict=True):
        if isinstance(res, BaseException):
            _end_with(ctx, j, res)
        else:
            _complete(ctx, j, res, len(jobs))


def _progress_hook(ctx: WorkerContext, jobs: list[Running]) -> Callable[[int, int], list[bool]]:
    # Decided once, not per denoising step: most jobs have no progress webhook.
    hooks = [bool(j.rec.input.webhook) and "progress" in j.rec.input.webhook_events for j in jobs]
    pairs = [(j.id, j.owner) for j in jobs]

    def on_step(step: int, total: int) -> list[bool]:
        for j in jobs:
            j.seen_total = total  # the scheduler's real count (PNDM adds a step), not the requested one
        try:
            flags = ctx.store.report_many(pairs, ctx.lease_s, step, total)
            for j, hook in zip(jobs, hooks, strict=True):
                if hook:
                    ctx.notify(j.rec, "progress")
        except redis.RedisError:
            return [False] * len(jobs)  # Redis blinked: progress is best effort, the jobs go on
        return [f != 0 for f in flags]  # 1: cancel asked; -1: the job is no longer ours (ended elsewhere)

    return on_step


def _prepare(ctx: WorkerContext, job: Running) -> InpaintRequest:
    """The job's inputs from storage, decoded and checked."""
    params = job.rec.input
    try:
        image_bytes, mask_bytes = ctx.storage.get_many([job.rec.image_key, job.rec.mask_key])
        image = load_image(image_bytes, ctx.settings.max_pixels)
        mask = load_mask(mask_bytes, ctx.settings.max_pixels)
    except ImageError as exc:
        raise JobFailed("invalid_input", exc.message) from exc
    except StorageError as exc:
        raise JobFailed("storage_unavailable", "the job's inputs could not be read from storage") from exc
    if image.size != mask.size:
        raise JobFailed("invalid_input", "mask and image differ in size")
    return InpaintRequest.from_input(params, image, mask)


def _complete(ctx: WorkerContext, job: Running, result: InpaintResult, batch_size: int) -> None:
    """Upload the job's outputs, then mark it succeeded (or drop them if it ended meanwhile)."""
    from celery.exceptions import SoftTimeLimitExceeded

    try:
        if ctx.settings.fault_injection:
            faults.before_upload(job.rec)
        images, nsfw = apply_policy(ctx.settings.safety, ctx.checker, result.images)
        fmt = job.rec.input.output_format
        outputs = []
        prefix = job_prefix(job.rec.tenant, job.id)
        for i, img in enumerate(images):
            key = f"{prefix}outputs/{i}.{'jpg' if fmt.value == 'jpeg' else fmt.value}"
            _put_output(ctx.storage, key, encode_image(img, fmt.value), fmt.content_type)
            job.uploaded.append(key)
            outputs.append({"key": key, "content_type": fmt.content_type, "width": img.width, "height": img.height})
        moved, before = redis_retry(ctx.store.transition)(
            job.id,
            Status.succeeded,
            job.owner,
            outputs=outputs,
            model={"name": ctx.pipeline.name, "revision": ctx.pipeline.revision},
            inference_s=round(result.inference_s, 4),
            nsfw=nsfw,
            safety=ctx.settings.safety,
            progress_step=job.seen_total,
            progress_total=job.seen_total,
            batch_size=batch_size,
        )
    except SoftTimeLimitExceeded:
        raise
    except Exception as exc:  # noqa: BLE001 - becomes the job's error code; unknown ones are logged there
        _end_with(ctx, job, exc)
        return
    job.ended = True
    if moved:
        IMAGES.inc(len(outputs))
        JOBS_ENDED.labels("succeeded", "").inc()
        # What the job cost the worker: a batch's time shared by its jobs, so queue ETAs follow throughput.
        ctx.store.record_duration((time.monotonic() - job.began) / batch_size)
    else:
        # Canceled (or ended by the time-limit handler) while we worked: its outputs must not exist.
        log.info("job %s ended as %s meanwhile; dropping %d outputs", job.id, before, len(job.uploaded))
        _delete_quietly(ctx, job.uploaded)


def _end_with(ctx: WorkerContext, job: Running, exc: BaseException) -> None:
    """End a job that did not succeed, with the error code its exception stands for."""
    with job_context(job.id):
        _end_with_code(ctx, job, exc)


def _end_with_code(ctx: WorkerContext, job: Running, exc: BaseException) -> None:
    from celery.exceptions import SoftTimeLimitExceeded

    job.ended = True
    _delete_quietly(ctx, job.uploaded)
    if isinstance(exc, Canceled):
        redis_retry(ctx.store.transition)(job.id, Status.canceled, job.owner)
        JOBS_ENDED.labels("canceled", "").inc()
        return
    if isinstance(exc, JobFailed):
        code, message = exc.code, exc.message
    elif isinstance(exc, ContentBlocked):
        code, message = CONTENT_BLOCKED, f"blocked by the safety policy: {exc}; nothing was stored"
    elif isinstance(exc, NonFiniteOutput):
        code, message = "non_finite_output", "the pipeline produced NaN pixels; no black image was stored"
    elif isinstance(exc, StorageError):
        code, message = "storage_unavailable", "the outputs could not be written to storage"
    elif isinstance(exc, SoftTimeLimitExceeded):
        code, message = "timeout", f"the job ran past its time limit of {ctx.settings.job_soft_time_limit_s}s"
    elif _is_oom(exc):
        _free_memory()
        code, message = "out_of_memory", "the pipeline ran out of memory; try fewer outputs or a smaller image"
    else:
        log.error("job %s failed", job.id, exc_info=exc)
        code, message = "internal", f"internal error ({type(exc).__name__})"
    _fail(ctx, job.id, job.owner, code, message, safety=ctx.settings.safety)
    JOBS_ENDED.labels("failed", code).inc()


@retry(stop=stop_after_attempt(4), wait=wait_exponential(multiplier=0.5, max=8), reraise=True)
def _put_output(storage: Storage, key: str, data: bytes, content_type: str) -> None:
    storage.put(key, data, content_type)


# Ending a job must survive a Redis restart: wait for Redis rather than lose the outcome.
redis_retry = retry(
    retry=retry_if_exception_type((redis.ConnectionError, redis.TimeoutError)),
    stop=stop_after_delay(120),
    wait=wait_exponential(multiplier=0.2, max=5),
    reraise=True,
)


def _fail(ctx: WorkerContext, job_id: str, owner: str, code: str, message: str, **fields: object) -> None:
    redis_retry(ctx.store.transition)(job_id, Status.failed, owner, error={"code": code, "message": message}, **fields)


def _delete_quietly(ctx: WorkerContext, keys: list[str]) -> None:
    if not keys:
        return
    try:
        ctx.storage.delete(keys)
    except StorageError:
        log.warning("could not delete %d orphaned outputs: %s", len(keys), keys)


def _finish_record(ctx: WorkerContext, job_id: str, event: str) -> Status | None:
    """Write the manifest of a job that has ended and tell its webhook."""
    rec = redis_retry(ctx.store.get)(job_id)
    if rec is None or not rec.status.is_terminal:
        return rec.status if rec else None
    record_end(ctx.storage, rec)
    ctx.notify(rec, event)
    return rec.status


def record_end(storage: Storage, rec: JobRecord) -> None:
    """The durable manifest of an ended job, retried: S3 may blink."""
    try:
        retry(stop=stop_after_attempt(4), wait=wait_exponential(multiplier=0.5, max=8), reraise=True)(write_manifest)(
            storage, rec
        )
    except StorageError:
        log.error("job %s: manifest not written; it lives in Redis until its TTL", rec.id)
