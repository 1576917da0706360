"""`/v1/jobs`: submit, read, list and cancel inpainting jobs."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile

from api.deps import Services, ServicesDep, TenantDep
from api.errors import ApiError, validation_error
from api.submission import FieldsInvalid, submit_job, validate_fields
from shared.imaging import decode_base64
from shared.jobstore import PREFIX, JobRecord, rfc3339
from shared.jobview import find_job, to_job, write_manifest
from shared.schemas import Job, JobList, Status

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

IDEMPOTENCY_TTL_S = 24 * 3600
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


def _idem_key(tenant: str, key: str) -> str:
    return f"{PREFIX}idem:{tenant}:{hashlib.sha256(key.encode()).hexdigest()}"


def _idempotent(svc: Services, tenant: str, key: str, fingerprint: str) -> tuple[str, str | None]:
    """Reserve `key` for this body: ('new', None) | ('replay', job id); 409 if reused with another body."""
    rkey = _idem_key(tenant, key)
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
            raise ApiError(
                409, "idempotency_key_in_use", "a request with this Idempotency-Key is still being processed"
            )
        time.sleep(0.05)  # a concurrent request with the same key is creating the job


def _job_response(
    svc: Services, rec: JobRecord, status_code: int = 200, headers: dict[str, str] | None = None
) -> JSONResponse:
    pos = svc.store.queue_position(rec.id) if rec.status is Status.queued else None
    job = to_job(rec, svc.storage, pos, svc.store.eta_s(pos) if pos is not None else None)
    return JSONResponse(job.model_dump(mode="json"), status_code=status_code, headers=headers)


@router.post(
    "", status_code=202, response_model=Job, responses=_ERRORS, openapi_extra=_JOB_BODY, summary="Submit a job"
)
async def create_job(
    request: Request,
    svc: ServicesDep,
    tenant: TenantDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> JSONResponse:
    """Submit an inpainting job (JSON with base64/data URLs, or multipart files); answers 202 at once."""
    fields, image, mask, raw_digest = await _read_submission(request)
    try:
        params, image_b, mask_b = validate_fields(fields, image, mask)
    except FieldsInvalid as exc:
        return validation_error(list(exc.errors))
    if idempotency_key:
        fingerprint = raw_digest.hex()
        state, existing = await run_in_threadpool(_idempotent, svc, tenant, idempotency_key, fingerprint)
        rkey = _idem_key(tenant, idempotency_key)
        if state == "replay" and existing:
            rec = await run_in_threadpool(svc.store.get, existing)
            if rec is not None:
                return await run_in_threadpool(
                    _job_response, svc, rec, 202, {"Location": f"/v1/jobs/{rec.id}", "Idempotent-Replayed": "true"}
                )
        try:
            rec = await run_in_threadpool(submit_job, svc, tenant, params, image_b, mask_b)
        except BaseException:
            svc.store.r.delete(rkey)
            raise
        svc.store.r.set(rkey, f"{fingerprint}:{rec.id}", ex=IDEMPOTENCY_TTL_S)
    else:
        rec = await run_in_threadpool(submit_job, svc, tenant, params, image_b, mask_b)
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
    rec = _tenant_job(svc, tenant, job_id)
    return _job_response(svc, rec)


@router.post("/{job_id}/cancel", response_model=Job, responses=_ERRORS, summary="Cancel a job")
def cancel_job(job_id: str, svc: ServicesDep, tenant: TenantDep) -> JSONResponse:
    """Queued jobs never run; running jobs stop at their next denoising step (202 until they do)."""
    rec = _tenant_job(svc, tenant, job_id)
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


@router.get("/{job_id}/webhook-deliveries", responses=_ERRORS, summary="The job's webhook delivery log")
def webhook_deliveries(job_id: str, svc: ServicesDep, tenant: TenantDep) -> dict[str, Any]:
    """Every attempt: delivery id, event, attempt number, time, status code or error, next retry."""
    _tenant_job(svc, tenant, job_id)  # 404 unless it is this tenant's job
    entries = [json.loads(e) for e in svc.store.r.lrange(svc.store.deliveries_key(job_id), 0, -1)]  # type: ignore[union-attr]
    return {"object": "list", "data": entries}


@router.post("/{job_id}/webhook-deliveries/{delivery}/redeliver", status_code=202, responses=_ERRORS,
             summary="Send a webhook again")  # fmt: skip
def redeliver(job_id: str, delivery: str, svc: ServicesDep, tenant: TenantDep) -> dict[str, Any]:
    """Queue the same message again (same `webhook-id`, so receivers can de-duplicate), with fresh data."""
    rec = _tenant_job(svc, tenant, job_id)
    entries = [json.loads(e) for e in svc.store.r.lrange(svc.store.deliveries_key(job_id), 0, -1)]  # type: ignore[union-attr]
    match = next((e for e in reversed(entries) if e.get("delivery") == delivery), None)
    url = rec.input.webhook
    if match is None or not url:
        raise ApiError(404, "not_found", f"no delivery {delivery!r} for job {job_id}")
    event_type = match["event"]
    data = (
        None
        if event_type in ("job.succeeded", "job.failed", "job.canceled")
        else to_job(rec, svc.storage).model_dump(mode="json")
    )
    svc.notify.enqueue(job_id, tenant, url, delivery, event_type, match.get("timestamp") or rfc3339(time.time()), data)
    return {"delivery": delivery, "event": event_type, "status": "queued"}


def _tenant_job(svc: Services, tenant: str, job_id: str) -> JobRecord:
    """The tenant's job, or 404 (also for another tenant's id: its existence is not revealed)."""
    rec = find_job(svc.store, svc.storage, tenant, job_id) if _plausible(job_id) else None
    if rec is None:
        raise ApiError(404, "not_found", f"no job {job_id!r}")
    return rec


def _plausible(job_id: str) -> bool:
    return 0 < len(job_id) <= 64 and all(c in "0123456789abcdef" for c in job_id)
