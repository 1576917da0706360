"""Turning a request into a job: validate fields and images, store inputs, record, enqueue."""

from __future__ import annotations

import secrets
from typing import Any

from pydantic import ValidationError

from api.deps import Services
from api.errors import ApiError
from shared.imaging import decode_base64, inspect_image
from shared.jobstore import JobRecord, new_job_id
from shared.netguard import UrlForbidden, check_url
from shared.queue import INFERENCE_QUEUE, RUN_TASK
from shared.schemas import MAX_SEED, JobCreate, JobInput, Status, batch_key
from shared.storage import job_prefix

_CONTENT_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


def validate_fields(fields: dict[str, Any], image: bytes | None, mask: bytes | None) -> tuple[JobInput, bytes, bytes]:
    if image is not None:  # multipart: files travel beside the fields
        fields = {**fields, "image": "-", "mask": "-"}
        fields.pop("mask_image", None)
        if mask is None:
            raise ApiError(422, "validation_error", "mask: a mask file is required", "mask")
    try:
        req = JobCreate.model_validate(fields)
    except ValidationError as exc:
        raise FieldsInvalid(exc) from None
    params = req.params()
    if image is None:
        image = decode_base64(req.image, "image")
        mask = decode_base64(
            req.mask if req.mask is not None else req.mask_image or "", "mask" if req.mask else "mask_image"
        )
    assert mask is not None
    return params, image, mask


class FieldsInvalid(Exception):
    def __init__(self, exc: ValidationError):
        self.errors = exc.errors()


def submit_job(
    svc: Services, tenant: str, params: JobInput, image: bytes, mask: bytes, job_id: str | None = None
) -> JobRecord:
    """Validate the images, store them, record the job and enqueue its id (runs in a worker thread).

    With `job_id` (a batch row's), a job that already exists is returned as it is: a retried row is
    never a second job.
    """
    s = svc.settings
    if job_id is not None and (existing := svc.store.get(job_id)) is not None:
        return existing
    img = inspect_image(image, "image", s.max_pixels)
    msk = inspect_image(mask, "mask", s.max_pixels)
    if (img.width, img.height) != (msk.width, msk.height):
        raise ApiError(
            400,
            "mask_size_mismatch",
            f"the mask is {msk.width}×{msk.height} but the image is {img.width}×{img.height}",
            "mask",
        )
    if params.webhook:
        try:
            check_url(params.webhook, s.webhook_allow_private)
        except UrlForbidden as exc:
            raise ApiError(422, "webhook_url_forbidden", str(exc), "webhook") from None
    if svc.store.queue_length() >= s.max_queued_jobs:
        raise ApiError(429, "queue_full", "the queue is full; retry later", headers={"Retry-After": "30"})
    if svc.store.queued_for(tenant) >= s.max_queued_per_tenant:
        # One tenant's backlog must not crowd out the others: its own limit, its own 429.
        raise ApiError(
            429,
            "tenant_queue_full",
            f"you have {s.max_queued_per_tenant} jobs waiting; retry when some have started",
            headers={"Retry-After": "10"},
        )
    if params.seed is None:
        # A drawn seed is recorded, so every job can be reproduced.
        params = params.model_copy(update={"seed": secrets.randbelow(MAX_SEED + 1)})
    job_id = job_id or new_job_id()
    prefix = job_prefix(tenant, job_id)
    image_key, mask_key = prefix + "input/image", prefix + "input/mask"
    svc.storage.put_many([
        (image_key, image, _CONTENT_TYPES.get(img.format, "application/octet-stream")),
        (mask_key, mask, _CONTENT_TYPES.get(msk.format, "application/octet-stream")),
    ])  # fmt: skip
    bkey = batch_key(img.width, img.height, params.num_inference_steps, params.guidance_scale, params.strength)
    rec = svc.store.create(job_id, tenant, params, image_key, mask_key, bkey)
    try:
        svc.celery.send_task(RUN_TASK, args=[job_id], queue=INFERENCE_QUEUE)
    except Exception as exc:
        svc.store.transition(job_id, Status.failed, error={"code": "enqueue_failed", "message": str(exc)[:200]})
        raise ApiError(
            503, "service_unavailable", "the queue is unavailable; retry shortly", headers={"Retry-After": "5"}
        ) from exc
    return rec
