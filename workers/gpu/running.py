"""One job this process has claimed, from its claim to its end: its start (announced, inputs fetched
and decoded) and its ending (outputs encoded and uploaded, then its status through `shared.jobs.lifecycle`).
`workers.gpu.runner` gathers such jobs into micro-batches and runs their pipeline call.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import redis
from tenacity import retry, stop_after_attempt, wait_exponential

from shared import catalog, tracing
from shared.errors import Code
from shared.imaging import ImageError, encode_image, load_image, load_mask
from shared.jobs import inputs, lifecycle
from shared.jobs.record import JobRecord
from shared.logs import job_context
from shared.metrics import IMAGES, JOBS_ENDED, QUEUE_WAIT
from shared.schemas import Status
from shared.storage import Storage, StorageError, job_prefix
from workers.gpu import faults
from workers.gpu.context import WorkerContext
from workers.gpu.outcomes import JobFailed, failure
from workers.inpaint.adapters import adapters_of
from workers.inpaint.request import Canceled, InpaintRequest, InpaintResult
from workers.inpaint.safety import apply_policy

log = logging.getLogger(__name__)


@dataclass
class Running:
    """A job this process has claimed, from claim to its end."""

    rec: JobRecord
    owner: str
    began: float = field(default_factory=time.monotonic)
    request: InpaintRequest | None = None
    seen_total: int = 0
    ended: bool = False
    span: Any = None  # its `inpaint.job` span, child of its submit (shared.tracing)
    handed_off: bool = False  # its ending, and its span, went to `WorkerContext.end_side_by_side`

    @property
    def id(self) -> str:
        return self.rec.id


def start(ctx: WorkerContext, rec: JobRecord, owner: str) -> Running:
    """A job just claimed (the leader, or a mate): announced, and its inputs ready or it has ended."""
    if rec.started_at:
        QUEUE_WAIT.observe(max(0.0, rec.started_at - rec.created_at))
    job = Running(rec, owner, seen_total=rec.progress[1])
    job.span = tracing.start(
        "inpaint.job",
        rec.trace,
        **{
            "inpaint.job_id": rec.id,
            "inpaint.tenant": rec.tenant,
            "inpaint.attempt": rec.attempts,
            "inpaint.worker": ctx.name,
        },
    )
    with tracing.inside(job.span):
        ctx.svc.notify(rec, "started")
        try:
            job.request = _prepare(ctx, job)
        except JobFailed as exc:
            end_with(ctx, job, exc)
    return job


def _prepare(ctx: WorkerContext, job: Running) -> InpaintRequest:
    """The job's inputs from storage, decoded and checked."""
    limit = ctx.settings.max_pixels
    rec = job.rec
    serves = catalog.worker_model(ctx.settings)
    if rec.model_name and ctx.settings.model_list() and rec.model_name != serves.name:
        # Queued for a model whose lane this worker now serves: the deployment's default changed under it.
        # (Without INPAINT_MODELS there is one lane, and whatever its workers load serves it, as before.)
        msg = f"the job asked for {rec.model_name}, and its queue is now served by {serves.name}; submit it again"
        raise JobFailed(Code.model_not_served, msg)
    try:
        if rec.image_key == rec.mask_key:  # one object (shared.jobs.inputs)
            image_bytes, mask_bytes = _unpacked(ctx.svc.storage.get(rec.image_key))
            image, mask = load_image(image_bytes, limit), load_mask(mask_bytes, limit)
        else:  # a job recorded before image and mask shared an object; each decoded as it arrives
            image, mask = ctx.svc.storage.get_each([
                (rec.image_key, lambda data: load_image(data, limit)),
                (rec.mask_key, lambda data: load_mask(data, limit)),
            ])  # fmt: skip
    except ImageError as exc:
        raise JobFailed(Code.invalid_input, exc.message) from exc
    except StorageError as exc:
        raise JobFailed(Code.storage_unavailable, "the job's inputs could not be read from storage") from exc
    if image.size != mask.size:
        raise JobFailed(Code.invalid_input, "mask and image differ in size")
    if ctx.settings.faults_enabled:
        faults.slow_start(rec)
    side = catalog.crop_size(catalog.worker_model(ctx.settings), ctx.settings)
    adapters = adapters_of(rec.adapters, ctx.lora_cache()) if rec.adapters else ()
    return InpaintRequest.from_input(job.rec.input, image, mask, side, loras=adapters)


def _unpacked(data: bytes) -> tuple[bytes, bytes]:
    try:
        return inputs.unpack(data)
    except ValueError as exc:
        raise JobFailed(Code.invalid_input, "the job's stored inputs are damaged") from exc


def finish(ctx: WorkerContext, job: Running, result: InpaintResult | BaseException, batch_size: int) -> None:
    """End a job after its call, with its result or the error it alone met; its span ends with it."""
    try:
        with tracing.inside(job.span), job_context(job.id):
            if isinstance(result, BaseException):
                end_with(ctx, job, result)
            else:
                _complete(ctx, job, result, batch_size)
    finally:
        if job.span is not None:
            job.span.end()


def _complete(ctx: WorkerContext, job: Running, result: InpaintResult, batch_size: int) -> None:
    """Upload the job's outputs, then end it succeeded (lifecycle drops them if it ended meanwhile)."""
    uploaded: list[str] = []
    try:
        if ctx.settings.faults_enabled:
            faults.before_upload(job.rec)
        images, nsfw = apply_policy(ctx.settings.safety, ctx.checker, result.images)
        fmt = job.rec.input.output_format
        outputs = []
        # Keys of this attempt only: a worker that lost its lease (cut off, then back) and still
        # finishes never overwrites, nor, when its end is refused, deletes the winning attempt's objects.
        prefix = f"{job_prefix(job.rec.tenant, job.id)}outputs/{job.rec.attempts}/"
        for i, img in enumerate(images):
            key = f"{prefix}{i}.{'jpg' if fmt.value == 'jpeg' else fmt.value}"
            _put_output(ctx.svc.storage, key, encode_image(img, fmt.value), fmt.content_type)
            uploaded.append(key)
            outputs.append({"key": key, "content_type": fmt.content_type, "width": img.width, "height": img.height})
        job.ended = True
        moved = lifecycle.end(
            ctx.svc,
            job.rec,
            Status.succeeded,
            job.owner,
            uploaded=uploaded,
            checkpoint=_checkpoint(ctx, job),
            outputs=outputs,
            model={"name": ctx.pipeline.name, "revision": ctx.pipeline.revision},
            inference_s=round(result.inference_s, 4),
            nsfw=nsfw,
            safety=ctx.settings.safety,
            progress_step=job.seen_total,
            progress_total=job.seen_total,
            batch_size=batch_size,
        )
    except ctx.time_limit_error:
        raise
    except redis.RedisError:
        # Redis stayed away through every try of the status change: whether it happened is unknown, so
        # the outputs stay (they may be a success's); the lease lapses and the next claim decides.
        log.error("job %s: its end could not be recorded; its outputs stay and its lease decides", job.id)
        return
    except Exception as exc:  # noqa: BLE001 - becomes the job's error code; unknown ones are logged there
        end_with(ctx, job, exc, uploaded)
        return
    if moved:
        IMAGES.inc(len(outputs))
        JOBS_ENDED.labels("succeeded", "").inc()
        # What the job cost the worker: a call's time shared by its jobs, so queue ETAs follow throughput.
        ctx.svc.registry.record_duration((time.monotonic() - job.began) / batch_size)


def end_with(ctx: WorkerContext, job: Running, exc: BaseException, uploaded: list[str] | None = None) -> None:
    """End a job that did not succeed: canceled, or failed with the code its exception stands for."""
    job.ended = True
    if uploaded:
        lifecycle.discard(ctx.svc, uploaded)
    point = _checkpoint(ctx, job)
    if isinstance(exc, Canceled):
        lifecycle.end(ctx.svc, job.rec, Status.canceled, job.owner, checkpoint=point)
        JOBS_ENDED.labels("canceled", "").inc()
        return
    timed_out = isinstance(exc, ctx.time_limit_error)
    code, message = failure(exc, timed_out, ctx.settings.job_soft_time_limit_s)
    tracing.mark_failed(job.span, code)
    with job_context(job.id):
        lifecycle.end(
            ctx.svc, job.rec, Status.failed, job.owner, error=(code, message), safety=ctx.settings.safety,
            checkpoint=point,
        )  # fmt: skip
    JOBS_ENDED.labels("failed", code).inc()


def _checkpoint(ctx: WorkerContext, job: Running) -> lifecycle.Checkpoint | None:
    return faults.checkpoint(job.rec) if ctx.settings.faults_enabled else None


@retry(stop=stop_after_attempt(4), wait=wait_exponential(multiplier=0.5, max=8), reraise=True)
def _put_output(storage: Storage, key: str, data: bytes, content_type: str) -> None:
    storage.put(key, data, content_type)
