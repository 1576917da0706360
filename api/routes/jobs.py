"""`/v1/jobs`: submit, read, list and cancel inpainting jobs."""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from api.deps import Services, ServicesDep, TenantDep
from api.errors import ApiError, validation_error
from shared.imaging import decode_base64, inspect_image
from shared.jobstore import PREFIX, JobRecord, new_job_id
from shared.jobview import find_job, to_job, write_manifest
from shared.netguard import UrlForbidden, check_url
from shared.queue import INFERENCE_QUEUE, RUN_TASK
from shared.schemas import MAX_SEED, Job, JobCreate, JobInput, JobList, Status
from shared.storage import job_prefix

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

IDEMPOTENCY_TTL_S = 24 * 3600
_CONTENT_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
_ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"description": d, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}
    for s, d in [(400, "bad input"), (401, "no or unknown API key"), (404, "no such job"), (409, "conflict"),
                 (413, "too large"), (422, "a field is out of range"), (429, "queue full"), (503, "dependency down")]
}  # fmt: skip
_JOB_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/JobCreate"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image", "prompt"],
                    "properties": {
                        "image": {"type": "string", "format": "binary"},
                        "mask": {"type": "string", "format": "binary"},
                        "prompt": {"type": "string"},
                    },
                    "additionalProperties": {"type": "string"},
                }
            },
        },
    }
}


async def _read_submission(request: Request) -> tuple[dict[str, Any], bytes | None, bytes | None, bytes]:
    """Fields, image bytes and mask bytes from a JSON or multipart body, plus bytes to fingerprint it."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        fields: dict[str, Any] = {}
        files: dict[str, bytes] = {}
        try:
            async with request.form(max_files=4, max_fields=64, max_part_size=1024 * 1024) as form:
                for name, value in form.multi_items():
                    if isinstance(value, UploadFile):
                        files[name] = await value.read()
                    elif name == "webhook_events":
                        fields.setdefault(name, []).extend(v for v in value.split(",") if v)
                    else:
                        fields[name] = value
        except ApiError:
            raise
        except Exception:  # noqa: BLE001 - a broken multipart body is the client's error
            raise ApiError(400, "invalid_multipart", "the multipart body could not be parsed") from None
        image = files.pop("image", None)
        mask = files.pop("mask", None) or files.pop("mask_image", None)
        for name in ("image", "mask", "mask_image"):
            if isinstance(fields.get(name), str):  # a data URL sent as a plain form field
                if name == "image" and image is None:
                    image = decode_base64(fields.pop(name), name)
                elif name != "image" and mask is None:
                    mask = decode_base64(fields.pop(name), name)
        digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode() + (image or b"") + (mask or b""))
        return fields, image, mask, digest.digest()
    if ctype not in ("application/json", ""):
        raise ApiError(415, "unsupported_media_type", "send application/json or multipart/form-data")
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "invalid_json", "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_json", "the body must be a JSON object")
    return body, None, None, hashlib.sha256(raw).digest()


def _validate(fields: dict[str, Any], image: bytes | None, mask: bytes | None) -> tuple[JobInput, bytes, bytes]:
    if image is not None:  # multipart: files travel beside the fields
        fields = {**fields, "image": "-", "mask": "-"}
        fields.pop("mask_image", None)
        if mask is None:
            raise ApiError(422, "validation_error", "mask: a mask file is required", "mask")
    try:
        req = JobCreate.model_validate(fields)
    except ValidationError as exc:
        raise _ValidationFailed(exc) from None
    params = req.params()
    if image is None:
        image = decode_base64(req.image, "image")
        mask = decode_base64(req.mask if req.mask is not None else req.mask_image or "", "mask" if req.mask else "mask_image")
    assert mask is not None
    return params, image, mask


class _ValidationFailed(Exception):
    def __init__(self, exc: ValidationError):
        self.errors = exc.errors()


def _submit(svc: Services, tenant: str, params: JobInput, image: bytes, mask: bytes) -> JobRecord:
    """Validate the images, store them, record the job and enqueue its id (runs in a worker thread)."""
    s = svc.settings
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
    if params.seed is None:
        # A drawn seed is recorded, so every job can be reproduced.
        params = params.model_copy(update={"seed": secrets.randbelow(MAX_SEED + 1)})
    job_id = new_job_id()
    prefix = job_prefix(tenant, job_id)
    image_key, mask_key = prefix + "input/image", prefix + "input/mask"
    svc.storage.put_many([
        (image_key, image, _CONTENT_TYPES.get(img.format, "application/octet-stream")),
        (mask_key, mask, _CONTENT_TYPES.get(msk.format, "application/octet-stream")),
    ])  # fmt: skip
    rec = svc.store.create(job_id, tenant, params, image_key, mask_key)
    try:
        svc.celery.send_task(RUN_TASK, args=[job_id], queue=INFERENCE_QUEUE)
    except Exception as exc:  # noqa: BLE001 - the broker is down: the job must not sit queued forever
        svc.store.transition(job_id, Status.failed, error={"code": "enqueue_failed", "message": str(exc)[:200]})
        raise ApiError(503, "service_unavailable", "the queue is unavailable; retry shortly", headers={"Retry-After": "5"}) from exc
    return rec


def _idempotent(svc: Services, tenant: str, key: str, fingerprint: str) -> tuple[str, str | None]:
    """Reserve `key` for this body: ('new', None) | ('replay', job id); 409 if reused with another body."""
    rkey = f"{PREFIX}idem:{tenant}:{hashlib.sha256(key.encode()).hexdigest()}"
    if svc.store.r.set(rkey, f"{fingerprint}:", nx=True, ex=IDEMPOTENCY_TTL_S):
        return "new", None
    deadline = time.monotonic() + 15
    while True:
        value = svc.store.r.get(rkey)
        if value is None:  # the first request failed and released the key
            if svc.store.r.set(rkey, f"{fingerprint}:", nx=True, ex=IDEMPOTENCY_TTL_S):
                return "new", None
            continue
        fp, _, job_id = str(value).partition(":")
        if fp != fingerprint:
            raise ApiError(409, "idempotency_key_reused", "this Idempotency-Key was used with another request body")
        if job_id:
            return "replay", job_id
        if time.monotonic() > deadline:
            raise ApiError(409, "idempotency_key_in_use", "a request with this Idempotency-Key is still being processed")
        time.sleep(0.05)  # a concurrent request with the same key is creating the job


def _job_response(svc: Services, rec: JobRecord, status_code: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    pos = svc.store.queue_position(rec.id) if rec.status is Status.queued else None
    job = to_job(rec, svc.storage, pos)
    return JSONResponse(job.model_dump(mode="json"), status_code=status_code, headers=headers)


@router.post("", status_code=202, response_model=Job, responses=_ERRORS, openapi_extra=_JOB_BODY, summary="Submit a job")
async def create_job(
    request: Request,
    svc: ServicesDep,
    tenant: TenantDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> JSONResponse:
    """Submit an inpainting job (JSON with base64/data URLs, or multipart files); answers 202 at once."""
    fields, image, mask, raw_digest = await _read_submission(request)
    try:
        params, image_b, mask_b = _validate(fields, image, mask)
    except _ValidationFailed as exc:
        return validation_error(list(exc.errors))
    if idempotency_key:
        fingerprint = raw_digest.hex()
        state, existing = await run_in_threadpool(_idempotent, svc, tenant, idempotency_key, fingerprint)
        rkey = f"{PREFIX}idem:{tenant}:{hashlib.sha256(idempotency_key.encode()).hexdigest()}"
        if state == "replay" and existing:
            rec = await run_in_threadpool(svc.store.get, existing)
            if rec is not None:
                return await run_in_threadpool(_job_response, svc, rec, 202, {"Location": f"/v1/jobs/{rec.id}", "Idempotent-Replayed": "true"})
        try:
            rec = await run_in_threadpool(_submit, svc, tenant, params, image_b, mask_b)
        except BaseException:
            svc.store.r.delete(rkey)
            raise
        svc.store.r.set(rkey, f"{fingerprint}:{rec.id}", ex=IDEMPOTENCY_TTL_S)
    else:
        rec = await run_in_threadpool(_submit, svc, tenant, params, image_b, mask_b)
    return await run_in_threadpool(_job_response, svc, rec, 202, {"Location": f"/v1/jobs/{rec.id}"})


@router.get("", response_model=JobList, responses=_ERRORS, summary="List jobs")
def list_jobs(
    svc: ServicesDep,
    tenant: TenantDep,
    status: Status | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=64, pattern=r"^[0-9a-f]+$")] = None,
) -> JobList:
    """The tenant's jobs, newest first; pass `next_cursor` back as `cursor` for the next page."""
    found: list[Job] = []
    after = cursor
    has_more = False
    for _ in range(20):  # bounded scan when filtering by status
        ids = svc.store.list_ids(tenant, limit + 1, after)
        if not ids:
            break
        records = svc.store.get_many(ids)
        for jid, rec in zip(ids, records, strict=True):
            after = jid
            if rec is None:
                rec = find_job(svc.store, svc.storage, tenant, jid)
            if rec is None or (status is not None and rec.status is not status):
                continue
            if len(found) == limit:
                has_more = True
                break
            pos = svc.store.queue_position(jid) if rec.status is Status.queued else None
            found.append(to_job(rec, svc.storage, pos))
        if has_more or len(ids) <= limit:
            break
    return JobList(data=found, has_more=has_more, next_cursor=found[-1].id if has_more and found else None)


@router.get("/{job_id}", response_model=Job, responses=_ERRORS, summary="Get a job")
def get_job(job_id: str, svc: ServicesDep, tenant: TenantDep) -> JSONResponse:
    """The job object; answered from its S3 manifest once Redis has let it go."""
    rec = find_job(svc.store, svc.storage, tenant, job_id) if _plausible(job_id) else None
    if rec is None:
        raise ApiError(404, "not_found", f"no job {job_id!r}")
    return _job_response(svc, rec)


@router.post("/{job_id}/cancel", response_model=Job, responses=_ERRORS, summary="Cancel a job")
def cancel_job(job_id: str, svc: ServicesDep, tenant: TenantDep) -> JSONResponse:
    """Queued jobs never run; running jobs stop at their next denoising step (202 until they do)."""
    rec = find_job(svc.store, svc.storage, tenant, job_id) if _plausible(job_id) else None
    if rec is None:
        raise ApiError(404, "not_found", f"no job {job_id!r}")
    outcome = "terminal" if rec.status.is_terminal else svc.store.request_cancel(job_id)
    fresh = svc.store.get(job_id) or rec
    if outcome == "canceled":
        write_manifest(svc.storage, fresh)
        svc.notify(fresh, "completed")
        return _job_response(svc, fresh)
    if outcome == "requested":
        return _job_response(svc, fresh, 202)
    job = to_job(fresh, svc.storage)
    raise ApiError(
        409, "job_not_cancelable", f"the job has already {job.status.value}", extra={"job": job.model_dump(mode="json")}
    )


def _plausible(job_id: str) -> bool:
    return 0 < len(job_id) <= 64 and all(c in "0123456789abcdef" for c in job_id)
