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
from shared.schemas import Status
from shared.storage import Storage, StorageError, job_prefix
from workers import faults
from workers.inference import Canceled, InpaintRequest, NonFiniteOutput, run_inpaint
from workers.pipelines import LoadedPipeline

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
    current: tuple[str, str] | None = None  # (job id, lease owner) of the job running now
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def lease_s(self) -> float:
        """A job's lease: four missed heartbeats and another worker may take the job."""
        return max(2.0, 4 * self.settings.worker_heartbeat_s)

    def heartbeat(self) -> None:
        """Advertise readiness and renew the running job's lease (called from a thread)."""
        self.store.worker_alive(
            self.name,
            ttl_s=3 * self.settings.worker_heartbeat_s,
            info={"model": self.pipeline.name, "revision": self.pipeline.revision, "device": self.pipeline.device},
        )
        with self._lock:
            cur = self.current
        if cur is not None:
            self.store.report(cur[0], cur[1], self.lease_s)


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
    """Run `job_id` if it is ours to run; returns its terminal status, or None if there was nothing to do."""
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
    with ctx._lock:
        ctx.current = (job_id, owner)
    ctx.notify(rec, "started")
    began = time.monotonic()
    uploaded: list[str] = []
    try:
        result_fields = _run(ctx, rec, owner, uploaded)
        moved, before = redis_retry(ctx.store.transition)(job_id, Status.succeeded, owner, **result_fields)
        if moved:
            ctx.store.record_duration(time.monotonic() - began)
        else:
            # Canceled (or ended by the time-limit handler) while we worked: its outputs must not exist.
            log.info("job %s ended as %s meanwhile; dropping %d outputs", job_id, before, len(uploaded))
            _delete_quietly(ctx, uploaded)
        final = _finish_record(ctx, job_id, "completed")
        return final
    except Canceled:
        _delete_quietly(ctx, uploaded)
        redis_retry(ctx.store.transition)(job_id, Status.canceled, owner)
    except JobFailed as exc:
        _delete_quietly(ctx, uploaded)
        _fail(ctx, job_id, owner, exc.code, exc.message)
    except NonFiniteOutput:
        _delete_quietly(ctx, uploaded)
        _fail(ctx, job_id, owner, "non_finite_output", "the pipeline produced NaN pixels; no black image was stored")
    except StorageError:
        _delete_quietly(ctx, uploaded)
        _fail(ctx, job_id, owner, "storage_unavailable", "the outputs could not be written to storage")
    except SoftTimeLimitExceeded:
        _delete_quietly(ctx, uploaded)
        _fail(
            ctx, job_id, owner, "timeout", f"the job ran past its time limit of {ctx.settings.job_soft_time_limit_s}s"
        )
    except Exception as exc:
        _delete_quietly(ctx, uploaded)
        if _is_oom(exc):
            _free_memory()
            _fail(
                ctx,
                job_id,
                owner,
                "out_of_memory",
                "the pipeline ran out of memory; try fewer outputs or a smaller image",
            )
        else:
            log.exception("job %s failed", job_id)
            _fail(ctx, job_id, owner, "internal", f"internal error ({type(exc).__name__})")
    finally:
        with ctx._lock:
            ctx.current = None
    return _finish_record(ctx, job_id, "completed")


def _run(ctx: WorkerContext, rec: JobRecord, owner: str, uploaded: list[str]) -> dict[str, object]:
    params = rec.input
    try:
        image_bytes, mask_bytes = ctx.storage.get_many([rec.image_key, rec.mask_key])
        image = load_image(image_bytes, ctx.settings.max_pixels)
        mask = load_mask(mask_bytes, ctx.settings.max_pixels)
    except ImageError as exc:
        raise JobFailed("invalid_input", exc.message) from exc
    except StorageError as exc:
        raise JobFailed("storage_unavailable", "the job's inputs could not be read from storage") from exc
    if image.size != mask.size:
        raise JobFailed("invalid_input", "mask and image differ in size")

    seen_total = rec.progress[1]
    # Decided once, not per denoising step: most jobs have no progress webhook.
    progress_hook = bool(params.webhook) and "progress" in params.webhook_events

    def on_step(step: int, total: int) -> bool:
        nonlocal seen_total
        seen_total = total  # the scheduler's real count (PNDM adds a step), not the requested one
        try:
            flag = ctx.store.report(rec.id, owner, ctx.lease_s, step, total)
            if progress_hook:
                ctx.notify(rec, "progress")
        except redis.RedisError:
            return False  # Redis blinked: progress is best effort, the job goes on
        return flag != 0  # 1: cancel asked; -1: the job is no longer ours (ended elsewhere)

    if ctx.settings.fault_injection:
        faults.before_pipeline(ctx, rec)

    result = run_inpaint(ctx.pipeline, InpaintRequest.from_input(params, image, mask), on_step)
    if ctx.settings.fault_injection:
        faults.before_upload(rec)
    fmt = params.output_format
    outputs = []
    prefix = job_prefix(rec.tenant, rec.id)
    for i, img in enumerate(result.images):
        key = f"{prefix}outputs/{i}.{'jpg' if fmt.value == 'jpeg' else fmt.value}"
        _put_output(ctx.storage, key, encode_image(img, fmt.value), fmt.content_type)
        uploaded.append(key)
        outputs.append({"key": key, "content_type": fmt.content_type, "width": img.width, "height": img.height})
    return {
        "outputs": outputs,
        "model": {"name": ctx.pipeline.name, "revision": ctx.pipeline.revision},
        "inference_s": round(result.inference_s, 4),
        "nsfw": result.nsfw_content_detected,
        "progress_step": seen_total,
        "progress_total": seen_total,
    }


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


def _fail(ctx: WorkerContext, job_id: str, owner: str, code: str, message: str) -> None:
    redis_retry(ctx.store.transition)(job_id, Status.failed, owner, error={"code": code, "message": message})


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
