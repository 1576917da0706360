"""`/v1/jobs`: submit, read, list and cancel inpainting jobs."""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from api.deps import ServicesDep, TenantDep
from api.errors import error_responses, validation_error
from api.holds import Hold, holding
from api.requests import preferred_wait, read_submission
from api.waiting import until_ended
from shared import loras
from shared.db import confirm
from shared.errors import Code, Problem
from shared.fetch import fetch_all
from shared.jobs import deliveries, erasure, idempotency, lifecycle
from shared.jobs.record import JobRecord
from shared.jobs.submit import FieldsInvalid, image_urls, submit_job, validate_fields
from shared.jobs.view import find_job, to_job
from shared.schemas import Job, JobList, Status
from shared.services import Services

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

_ERRORS = error_responses(
    {
        400: "bad input",
        401: "no or unknown API key",
        404: "no such job",
        409: "conflict",
        413: "too large",
        422: "a field is out of range",
        429: "queue full",
        503: "dependency down",
    }
)
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


def _job_response(
    svc: Services, rec: JobRecord, status_code: int = 200, headers: dict[str, str] | None = None
) -> JSONResponse:
    pos, eta = rec.ahead_at_submit, rec.eta_at_submit  # known when the record comes from its submit
    if pos is None and rec.status is Status.queued:
        pos = svc.jobs.queue_position(rec)
        eta = svc.registry.eta_s(pos, rec.lane) if pos is not None else None
    no_worker = rec.status is Status.queued and svc.registry.ready_in(rec.lane) == 0
    job = to_job(rec, svc.storage, pos, eta, no_worker)
    return JSONResponse(job.model_dump(mode="json"), status_code=status_code, headers=headers)


@router.post(
    "", status_code=202, response_model=Job, responses=_ERRORS, openapi_extra=_JOB_BODY, summary="Submit a job"
)
async def create_job(
    request: Request,
    svc: ServicesDep,
    tenant: TenantDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
    prefer: Annotated[
        str | None, Header(description="`wait` or `wait=N` (N ≤ 60 s): answer 200 if done by then")
    ] = None,
) -> JSONResponse:
    """Submit an inpainting job (JSON with base64/data URLs or https URLs, Replicate's `{"input": …}`, or
    multipart files). Answers 202 at once, or, with `Prefer: wait`, 200 with the job if it ends in time."""
    fields, image, mask, raw_digest = await read_submission(request, fingerprint=bool(idempotency_key))
    wait_s = preferred_wait(prefer)
    if not wait_s:
        return await _create(request, svc, tenant, fields, image, mask, raw_digest, idempotency_key, None)
    async with holding(request, tenant) as hold:  # before any work: a refused wait submits nothing
        return await _create(request, svc, tenant, fields, image, mask, raw_digest, idempotency_key, hold, wait_s)


async def _create(
    request: Request,
    svc: Services,
    tenant: str,
    fields: dict[str, Any],
    image: bytes | None,
    mask: bytes | None,
    raw_digest: bytes,
    idempotency_key: str | None,
    hold: Hold | None,
    wait_s: float = 0.0,
) -> JSONResponse:
    """Submit (or replay) the job and answer; with `hold`, wait up to `wait_s` for it to end."""
    headers = {"Preference-Applied": f"wait={wait_s:g}"} if wait_s else {}
    # Image URLs are fetched on the fetch pool, within the tenant's share, not on a request thread.
    got = await fetch_all(image_urls(fields), tenant, svc.settings) if image is None else {}
    got = {**got, **await loras.fetch_urls(loras.refs_in(fields), tenant, svc.settings)}  # adapters by URL
    try:
        if not idempotency_key:
            # Validated, stored, recorded and (unless the client waits) answered in one thread hop.
            rec, answer = await run_in_threadpool(_submit, svc, tenant, fields, image, mask, not hold, headers, got)
            return answer or await _answer(request, svc, rec, hold, wait_s, headers)
        params, image_b, mask_b = await run_in_threadpool(validate_fields, fields, image, mask, svc.settings, got)
    except FieldsInvalid as exc:
        return validation_error(list(exc.errors))
    fingerprint = raw_digest.hex()
    held, existing = await run_in_threadpool(idempotency.reserve, svc.r, tenant, idempotency_key, fingerprint)
    if existing:
        replay = await run_in_threadpool(svc.jobs.get, existing)
        if replay is not None and not replay.erased:
            # Behind Sentinels, a replayed job is answered only once a replica holds it (its first
            # submit may have been refused for want of one: it may not survive a failover yet).
            if not await run_in_threadpool(confirm, svc.r):
                raise Problem(503, Code.service_unavailable, "the job store did not confirm the job; retry",
                              headers={"Retry-After": "1"})  # fmt: skip
            return await _answer(request, svc, replay, hold, wait_s, {**headers, "Idempotent-Replayed": "true"})
        take_over = idempotency.take_over
        held = await run_in_threadpool(take_over, svc.r, tenant, idempotency_key, fingerprint, existing)
    try:
        rec = await run_in_threadpool(
            partial(submit_job, svc, tenant, params, image_b, mask_b, idempotency=held, fetched=got)
        )
    except BaseException:
        if held is not None:
            await run_in_threadpool(idempotency.release, svc.r, held)
        raise
    return await _answer(request, svc, rec, hold, wait_s, headers)


def _submit(
    svc: Services,
    tenant: str,
    fields: dict[str, Any],
    image: bytes | None,
    mask: bytes | None,
    answer: bool,
    headers: dict[str, str],
    fetched: dict[str, bytes],
) -> tuple[JobRecord, JSONResponse | None]:
    """Validate, submit and, with `answer`, the 202 too (blocking: run it in a thread)."""
    params, image_b, mask_b = validate_fields(fields, image, mask, svc.settings, fetched)
    rec = submit_job(svc, tenant, params, image_b, mask_b, fetched=fetched)
    return rec, _job_response(svc, rec, 202, _located(rec, headers)) if answer else None


def _located(rec: JobRecord, headers: dict[str, str]) -> dict[str, str]:
    return {**headers, "Location": f"/v1/jobs/{rec.id}"}


async def _answer(
    request: Request, svc: Services, rec: JobRecord, hold: Hold | None, wait_s: float, headers: dict[str, str]
) -> JSONResponse:
    """202 with the job as it is, or, when the client asked to wait and the job ended in time, 200."""
    headers = _located(rec, headers)
    if hold is not None:
        if (ended := await until_ended(request, svc, hold, rec.id, wait_s)) is not None:
            return await run_in_threadpool(_job_response, svc, ended, 200, headers)
        now = await run_in_threadpool(svc.jobs.get, rec.id)  # as it is now, not as submitted
        rec = now if now is not None else rec
    return await run_in_threadpool(_job_response, svc, rec, 202, headers)


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
        ids = svc.jobs.list_ids(tenant, limit + 1, after)
        if not ids:
            break
        records = svc.jobs.get_many(ids)
        for jid, rec in zip(ids, records, strict=True):
            after = jid
            if rec is None or rec.erased:
                rec = find_job(svc.jobs, svc.storage, tenant, jid)  # from its manifest; None once deleted
            if rec is None or (status is not None and rec.status is not status):
                continue
            if len(found) == limit:
                has_more = True
                break
            pos = svc.jobs.queue_position(rec) if rec.status is Status.queued else None
            found.append(to_job(rec, svc.storage, pos))
        if has_more or len(ids) <= limit:
            break
    return JobList(data=found, has_more=has_more, next_cursor=found[-1].id if has_more and found else None)


@router.get("/{job_id}", response_model=Job, responses=_ERRORS, summary="Get a job")
def get_job(job_id: str, svc: ServicesDep, tenant: TenantDep) -> JSONResponse:
    """The job object; answered from its S3 manifest once Redis has let it go."""
    rec = tenant_job(svc, tenant, job_id)
    return _job_response(svc, rec)


@router.post("/{job_id}/cancel", response_model=Job, responses=_ERRORS, summary="Cancel a job")
def cancel_job(job_id: str, svc: ServicesDep, tenant: TenantDep) -> JSONResponse:
    """Queued jobs never run; running jobs stop at their next denoising step (202 until they do)."""
    rec = tenant_job(svc, tenant, job_id)
    outcome = "ended" if rec.status.is_terminal else lifecycle.cancel(svc, rec)
    fresh = svc.jobs.get(job_id) or rec
    if outcome == "canceled":
        return _job_response(svc, fresh)
    if outcome == "requested":
        return _job_response(svc, fresh, 202)
    job = to_job(fresh, svc.storage)
    raise Problem(
        409,
        Code.job_not_cancelable,
        f"the job has already {job.status.value}",
        extra={"job": job.model_dump(mode="json")},
    )


@router.delete("/{job_id}", status_code=204, responses=_ERRORS, summary="Delete a job and its images")
def delete_job(job_id: str, svc: ServicesDep, tenant: TenantDep) -> Response:
    """Cancels it if needed, then erases its inputs, outputs and manifest; afterwards it is a 404. A
    running job is erased when it stops, at its next denoising step."""
    rec = tenant_job(svc, tenant, job_id)
    if erasure.mark(svc, rec) == "now":
        erasure.erase(svc, rec.tenant, rec.id)
    elif not rec.status.is_terminal:
        lifecycle.cancel(svc, rec)  # queued: ends now and is erased; running: stops at its next step
    return Response(status_code=204)


@router.get("/{job_id}/webhook-deliveries", responses=_ERRORS, summary="The job's webhook delivery log")
def webhook_deliveries(job_id: str, svc: ServicesDep, tenant: TenantDep) -> dict[str, Any]:
    """Every attempt: delivery id, event, attempt number, time, status code or error, next retry."""
    tenant_job(svc, tenant, job_id)  # 404 unless it is this tenant's job
    return {"object": "list", "data": deliveries.attempts(svc.r, job_id)}


@router.post("/{job_id}/webhook-deliveries/{delivery}/redeliver", status_code=202, responses=_ERRORS,
             summary="Send a webhook again")  # fmt: skip
def redeliver(job_id: str, delivery: str, svc: ServicesDep, tenant: TenantDep) -> dict[str, Any]:
    """Queue the same message again (same `webhook-id`, so receivers can de-duplicate), with fresh data."""
    rec = tenant_job(svc, tenant, job_id)
    match = next((e for e in reversed(deliveries.attempts(svc.r, job_id)) if e.get("delivery") == delivery), None)
    if match is None or not rec.input.webhook:
        raise Problem(404, Code.not_found, f"no delivery {delivery!r} for job {job_id}")
    svc.quotas.redelivery(tenant)
    svc.notify.redeliver(rec, match)
    return {"delivery": delivery, "event": match["event"], "status": "queued"}


def tenant_job(svc: Services, tenant: str, job_id: str) -> JobRecord:
    """The tenant's job, or 404 (also for another tenant's id: its existence is not revealed)."""
    rec = find_job(svc.jobs, svc.storage, tenant, job_id) if _plausible(job_id) else None
    if rec is None:
        raise Problem(404, Code.not_found, f"no job {job_id!r}")
    return rec


def _plausible(job_id: str) -> bool:
    return 0 < len(job_id) <= 64 and all(c in "0123456789abcdef" for c in job_id)
