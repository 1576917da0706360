"""`POST /v1/batches`: the model card's batch scoring, for thousands of rows (`shared/batches/`)."""

from __future__ import annotations

import json
from typing import Any, Literal

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, model_validator

from api.deps import ServicesDep, TenantDep
from shared.batches.results import batch_prefix, view
from shared.batches.rows import row_dicts
from shared.errors import Code, Problem
from shared.jobs.record import new_job_id

router = APIRouter(tags=["batches"])


class BatchInputData(BaseModel):
    columns: list[str] = Field(default_factory=lambda: ["prompt", "image", "mask_image"])
    index: list[Any] | None = None
    data: list[dict[str, Any] | list[Any]] = Field(min_length=1, max_length=100_000)


class BatchCreate(BaseModel):
    """Inline rows (`input_data`, the /score body) or a JSONL/CSV object in the bucket (`input_file`)."""

    input_data: BatchInputData | None = None
    input_file: str | None = Field(None, description="key of a JSONL or CSV object under tenants/<you>/")
    format: Literal["jsonl", "csv"] | None = Field(None, description="default: from the file's extension")
    parameters: dict[str, Any] = Field(default_factory=dict, description="job fields applied to every row")
    error_threshold: int = Field(-1, ge=-1, description="-1: never fail the batch; N: fail past N failed rows")

    @model_validator(mode="after")
    def _one_input(self) -> BatchCreate:
        if (self.input_data is None) == (self.input_file is None):
            raise ValueError("give exactly one of input_data and input_file")
        return self


def _jsonl(data: BatchInputData) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in row_dicts(data.columns, data.data)).encode()


@router.post("/v1/batches", status_code=202, summary="Batch scoring: rows become jobs, streamed")
async def create(body: BatchCreate, svc: ServicesDep, tenant: TenantDep) -> JSONResponse:
    cap = svc.settings.max_batch_rows
    if body.input_data is not None and len(body.input_data.data) > cap:
        raise Problem(413, Code.batch_too_large, f"a batch holds at most {cap} rows", "input_data.data")
    batch_id = new_job_id()
    if body.input_file is not None:
        key = body.input_file.lstrip("/")
        if not key.startswith(f"tenants/{tenant}/") or ".." in key.split("/"):
            raise Problem(422, Code.input_file_forbidden, f"input_file must be under tenants/{tenant}/", "input_file")
        if not await run_in_threadpool(svc.storage.exists, key):
            raise Problem(422, Code.input_file_missing, f"no object {key!r} in the bucket", "input_file")
        fmt = body.format or ("csv" if key.lower().endswith(".csv") else "jsonl")
    else:
        key, fmt = batch_prefix(tenant, batch_id) + "input.jsonl", "jsonl"  # inline rows live beside the results
    if not await run_in_threadpool(svc.batches.admit, tenant, batch_id):
        raise Problem(
            429, Code.too_many_batches, f"you have {svc.settings.max_open_batches_per_tenant} batches still running; "
            "retry when one has finished", headers={"Retry-After": "60"},
        )  # fmt: skip
    if body.input_data is not None:
        await run_in_threadpool(svc.storage.put, key, _jsonl(body.input_data), "application/x-ndjson")
    await run_in_threadpool(svc.batches.create, batch_id, tenant, key, fmt, body.parameters, body.error_threshold)
    svc.queue.send_batch_step(batch_id)
    return JSONResponse(await run_in_threadpool(view, svc, batch_id, tenant), status_code=202)


@router.get("/v1/batches/{batch_id}", summary="A batch: counts by status, progress, jobs, manifest")
async def read(batch_id: str, svc: ServicesDep, tenant: TenantDep) -> JSONResponse:
    out = await run_in_threadpool(view, svc, batch_id, tenant)
    if out is None:
        raise Problem(404, Code.not_found, "no such batch")
    return JSONResponse(out)


@router.post("/v1/batches/{batch_id}/cancel", summary="Cancel a batch: no more rows, its jobs canceled")
async def cancel(batch_id: str, svc: ServicesDep, tenant: TenantDep) -> JSONResponse:
    """The batch reads no more rows at once; its jobs are canceled by the I/O worker, a chunk at a time."""
    if not await run_in_threadpool(svc.batches.owned, batch_id, tenant):
        raise Problem(404, Code.not_found, "no such batch")
    if await run_in_threadpool(svc.batches.stop, batch_id, "canceled"):
        svc.queue.send_batch_step(batch_id)
    return JSONResponse(await run_in_threadpool(view, svc, batch_id, tenant), status_code=202)
