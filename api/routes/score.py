"""`POST /score`: the model card's Azure ML real-time format, unchanged, served through the same queue."""

from __future__ import annotations

from typing import Any

import pybase64
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from api.deps import Services, ServicesDep, TenantDep
from api.errors import validation_error
from api.holds import Hold, holding
from api.waiting import all_ended
from shared.batches.rows import job_fields, row_dicts
from shared.errors import INPUT_CODES, Code, Problem
from shared.fetch import fetch_all
from shared.jobs.record import JobRecord
from shared.jobs.routing import route
from shared.jobs.submit import FieldsInvalid, image_urls, submit_job, validate_fields
from shared.schemas import Status

router = APIRouter(tags=["azure-ml"])
MAX_ROWS = 64


class InputData(BaseModel):
    columns: list[str] = Field(default_factory=lambda: ["prompt", "image", "mask_image"])
    index: list[Any] | None = None
    data: list[dict[str, Any] | list[Any]] = Field(min_length=1, max_length=MAX_ROWS)


class ScoreRequest(BaseModel):
    input_data: InputData


class ScoreRow(BaseModel):
    prompt: str
    generated_image: str = Field(description="base64 PNG")
    nsfw_content_detected: list[bool] | bool | None = None


def rows_failed(failed: list[JobRecord], job_ids: list[str]) -> Problem:
    """The answer when some rows did not succeed: a 400 when every failure is the input's (or the
    safety policy's) doing, so retrying the same request cannot help; else a 503 worth retrying."""
    errors = [
        {"job": r.id, "status": r.status.value, "error": r.error.model_dump() if r.error else None} for r in failed
    ]
    codes = {r.error.code if r.error else "" for r in failed}
    bad_input = codes <= INPUT_CODES
    code = (
        Code.content_blocked
        if codes == {Code.content_blocked}
        else Code.invalid_input
        if bad_input
        else Code.inference_failed
    )
    return Problem(
        400 if bad_input else 503, code,
        f"{len(failed)} of {len(job_ids)} rows did not succeed", extra={"jobs": job_ids, "failures": errors},
        headers=None if bad_input else {"Retry-After": "5"},
    )  # fmt: skip


@router.post("/score", response_model=list[ScoreRow], summary="Azure ML real-time scoring (the model card's format)")
async def score(body: ScoreRequest, request: Request, svc: ServicesDep, tenant: TenantDep) -> JSONResponse:
    """Each row becomes a job (they may batch together on the GPU); answers when all are done."""
    async with holding(request, tenant) as hold:  # the answer waits for the jobs: a held connection
        return await _score(body, request, svc, tenant, hold)


async def _score(body: ScoreRequest, request: Request, svc: Services, tenant: str, hold: Hold) -> JSONResponse:
    # The card answers base64 PNG; a caller waits for the answer: interactive.
    data = row_dicts(body.input_data.columns, body.input_data.data)
    rows = [job_fields(row, output_format="png", priority="interactive") for row in data]
    # Every row's image URLs at once, each distinct one once, on the fetch pool within the tenant's share.
    urls = [(url, f"input_data.data.{i}.{field}") for i, fields in enumerate(rows) for url, field in image_urls(fields)]
    got = await fetch_all(urls, tenant, svc.settings)
    prepared = []
    for i, fields in enumerate(rows):
        try:
            row = await run_in_threadpool(validate_fields, fields, None, None, svc.settings, got)
            route(row[0], svc.settings)  # every row's model and its limits before any row is queued
            prepared.append(row)
        except FieldsInvalid as exc:
            errors = [dict(e, loc=("input_data", "data", i, *e.get("loc", ()))) for e in exc.errors]
            return validation_error(errors)
        except Problem as exc:
            exc.param = f"input_data.data.{i}.{exc.param}" if exc.param else f"input_data.data.{i}"
            raise
    job_ids = []
    for params, image, mask in prepared:
        rec = await run_in_threadpool(submit_job, svc, tenant, params, image, mask)
        job_ids.append(rec.id)
    records = await all_ended(request, svc, hold, job_ids, svc.settings.score_timeout_s)
    if records is None:
        raise Problem(
            504, Code.timeout, f"the jobs did not finish within {svc.settings.score_timeout_s:.0f}s; poll them by id",
            extra={"jobs": job_ids},
        )  # fmt: skip
    failed = [r for r in records if r.status is not Status.succeeded]
    if failed:
        raise rows_failed(failed, job_ids)
    keys = [r.outputs[0].key for r in records]
    blobs = await run_in_threadpool(svc.storage.get_many, keys)
    out = [
        {"prompt": fields.get("prompt", ""), "generated_image": pybase64.b64encode(blob).decode(),
         "nsfw_content_detected": r.nsfw[0] if r.nsfw else None}
        for fields, blob, r in zip(rows, blobs, records, strict=True)
    ]  # fmt: skip
    return JSONResponse(out)
