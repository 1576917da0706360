"""`/v1/loras`: a tenant's LoRA adapters. Upload a `.safetensors` adapter, list, read and delete: the
tenant's own only; a job names one by id in its `loras`."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from api.deps import ServicesDep, TenantDep
from api.errors import error_responses
from shared.config import Settings
from shared.errors import Code, Problem
from shared.loras import Loras, too_large
from shared.services import Services

router = APIRouter(prefix="/v1/loras", tags=["loras"])

# Room for a multipart body's boundaries and headers around the adapter itself.
MULTIPART_SLACK = 64 * 1024
_CHUNK = 1024 * 1024
_ERRORS = error_responses(
    {
        400: "bad multipart body",
        401: "no or unknown API key",
        404: "no such adapter",
        409: "you hold too many adapters",
        413: "too large",
        415: "neither multipart nor octet-stream",
        422: "not a safetensors LoRA adapter",
        503: "dependency down",
    }
)
_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["content"],
                    "properties": {"content": {"type": "string", "format": "binary"}, "name": {"type": "string"}},
                }
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def body_limit(settings: Settings) -> int:
    """The most `POST /v1/loras` takes on the wire (`api.limits.BodySizeLimit`)."""
    return settings.lora_max_bytes + MULTIPART_SLACK


def _store(svc: Services) -> Loras:
    return Loras(svc.r, svc.storage, svc.settings)


@router.post("", status_code=201, responses=_ERRORS, openapi_extra=_BODY, summary="Upload a LoRA adapter")
async def create_lora(
    request: Request, svc: ServicesDep, tenant: TenantDep, name: Annotated[str, Query(max_length=255)] = ""
) -> JSONResponse:
    """A `.safetensors` adapter as multipart part `content` (with an optional text field `name`), or as
    the whole `application/octet-stream` body (`?name=`). Answers 201 with the adapter object, or 200
    with the one you already hold when you hold the same content. Pickles are refused, never loaded."""
    cap = svc.settings.lora_max_bytes
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        data, part_name = await _read_multipart(request, cap)
        name = name or part_name
    elif ctype == "application/octet-stream":
        data = await _read_raw(request, cap)
    else:
        msg = "send the adapter as multipart/form-data (part `content`) or as an application/octet-stream body"
        raise Problem(415, Code.unsupported_media_type, msg)
    rec, created = await run_in_threadpool(_store(svc).add, tenant, data, name)
    return JSONResponse(rec.to_api(), status_code=201 if created else 200)


async def _read_raw(request: Request, cap: int) -> bytes:
    """The body, refused as soon as it passes `cap` (never more than `cap` bytes held)."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > cap:
        raise too_large(cap)
    buf = bytearray()
    async for chunk in request.stream():
        if len(buf) + len(chunk) > cap:
            raise too_large(cap)
        buf += chunk
    return bytes(buf)


async def _read_multipart(request: Request, cap: int) -> tuple[bytes, str]:
    """The `content` part's bytes and filename, and the `name` field. The parser spools a file part to
    disk past 1 MiB and the body is capped on the wire (`body_limit`); the part is read back only when
    within `cap`."""
    found: tuple[bytes, str] | None = None
    field_name = ""
    try:
        async with request.form(max_files=1, max_fields=4, max_part_size=64 * 1024) as form:
            for key, value in form.multi_items():
                if isinstance(value, UploadFile) and key == "content":
                    if value.size is not None and value.size > cap:
                        raise too_large(cap)
                    found = (await _read_part(value, cap), value.filename or "")
                elif isinstance(value, str) and key == "name":
                    field_name = value
    except (HTTPException, MultiPartException, ValueError, KeyError):  # what a broken body raises
        raise Problem(400, Code.invalid_multipart, "the multipart body could not be parsed") from None
    if found is None:
        raise Problem(422, Code.validation_error, "content: the adapter file is required", "content")
    return found[0], field_name or found[1]


async def _read_part(part: UploadFile, cap: int) -> bytes:
    buf = bytearray()
    while chunk := await part.read(_CHUNK):
        if len(buf) + len(chunk) > cap:
            raise too_large(cap)
        buf += chunk
    return bytes(buf)


@router.get("", responses=_ERRORS, summary="List LoRA adapters")
def list_loras(svc: ServicesDep, tenant: TenantDep) -> dict[str, Any]:
    """Your adapters, newest first, on one page."""
    return {"object": "list", "data": [rec.to_api() for rec in _store(svc).list(tenant)], "has_more": False}


@router.get("/{lora_id}", responses=_ERRORS, summary="Get a LoRA adapter")
def get_lora(lora_id: str, svc: ServicesDep, tenant: TenantDep) -> dict[str, Any]:
    """The adapter object."""
    rec = _store(svc).get(tenant, lora_id)
    if rec is None:
        raise Problem(404, Code.not_found, f"no adapter {lora_id!r}")
    return rec.to_api()


@router.delete("/{lora_id}", status_code=204, responses=_ERRORS, summary="Delete a LoRA adapter")
def delete_lora(lora_id: str, svc: ServicesDep, tenant: TenantDep) -> Response:
    """Delete the adapter; afterwards it is a 404, and jobs that name it are refused."""
    if not _store(svc).delete(tenant, lora_id):
        raise Problem(404, Code.not_found, f"no adapter {lora_id!r}")
    return Response(status_code=204)
