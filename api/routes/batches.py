"""`POST /v1/batches`: the model card's batch scoring, for thousands of rows (`shared/batches/`)."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError, model_validator

from api.deps import ServicesDep, TenantDep
from shared.batches import images
from shared.batches.results import batch_prefix, view
from shared.batches.rows import row_dicts
from shared.errors import Code, Problem
from shared.fetch import fetch_all
from shared.imaging import read_header
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


def _each_object(obj: dict[str, Any]) -> dict[str, Any]:
    # A Python hook per JSON object: a long parse lets the thread that serves requests run in between.
    return obj


def _parse(raw: bytes, cap: int) -> BatchCreate:
    """The body as a batch, the row cap checked before any row is validated (blocking: a thread's work)."""
    try:
        doc = json.loads(raw, object_hook=_each_object)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise Problem(400, Code.invalid_json, "the body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise Problem(400, Code.invalid_json, "the body must be a JSON object")
    given = doc.get("input_data")
    if isinstance(given, dict) and isinstance(given.get("data"), list) and len(given["data"]) > cap:
        # Freed here, in this thread: the exception's traceback would otherwise free it on the event loop.
        doc = given = None
        raise Problem(413, Code.batch_too_large, f"a batch holds at most {cap} rows", "input_data.data")
    try:
        return BatchCreate.model_validate(doc)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None


_BIG_BODY = 1024 * 1024


def _big_parses(request: Request) -> asyncio.Semaphore:
    """One big body parsed at a time in this process: CPU-bound threads in numbers would take turns at
    the interpreter lock with the event loop's thread, and every other request would wait its turn too."""
    state, loop = request.app.state, asyncio.get_running_loop()
    made = getattr(state, "batch_big_parses", None)
    if made is None or made[0] is not loop:  # a semaphore serves the event loop it was made on
        made = state.batch_big_parses = (loop, asyncio.Semaphore(1))
    return made[1]  # type: ignore[no-any-return]


def _inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """The model's JSON schema with its `$defs` written in place (no document-level refs to resolve)."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return walk(defs[ref.removeprefix("#/$defs/")])
            return {k: walk(v) for k, v in node.items()}
        return [walk(v) for v in node] if isinstance(node, list) else node

    return walk(schema)  # type: ignore[no-any-return]


# The body is parsed by hand, off the event loop (`_parse`): publish its schema all the same.
_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": _inline_refs(BatchCreate.model_json_schema())}},
    }
}


@router.post("/v1/batches", status_code=202, openapi_extra=_BODY, summary="Batch scoring: rows become jobs, streamed")
async def create(request: Request, svc: ServicesDep, tenant: TenantDep) -> JSONResponse:
    # The body's size is capped while it streams in (api.limits); parsing and validating up to 20 MB of
    # rows takes a thread, never the event loop, and a body over the row cap is refused before that.
    raw = await request.body()
    if len(raw) < _BIG_BODY:
        body = await run_in_threadpool(_parse, raw, svc.settings.max_batch_rows)
    else:
        async with _big_parses(request):
            body = await run_in_threadpool(_parse, raw, svc.settings.max_batch_rows)
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
    # An image URL in `parameters` is every row's: fetched once, now (its failure is this request's).
    urls = images.parameter_urls(body.parameters)
    fetched = await fetch_all(urls, tenant, svc.settings)
    for url, field in urls:  # an image in name only would fail every row: this request's 4xx instead
        read_header(fetched[url.strip()], field, svc.settings.max_pixels)
    if not await run_in_threadpool(svc.batches.admit, tenant, batch_id):
        raise Problem(
            429, Code.too_many_batches, f"you have {svc.settings.max_open_batches_per_tenant} batches still running; "
            "retry when one has finished", headers={"Retry-After": "60"},
        )  # fmt: skip
    if fetched:
        await run_in_threadpool(images.keep, svc, tenant, batch_id, fetched)
    if body.input_data is not None:
        rows = await run_in_threadpool(_jsonl, body.input_data)
        await run_in_threadpool(svc.storage.put, key, rows, "application/x-ndjson")
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
