"""`/v1/files`: Replicate's file API. Upload a file, read it back, list and delete: the tenant's own only,
each for `INPAINT_FILE_TTL_S`."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from api.deps import ServicesDep, TenantDep, base_url
from api.errors import error_responses
from shared.errors import Code, Problem
from shared.files import MAX_METADATA_BYTES, FileRecord
from shared.services import Services

router = APIRouter(prefix="/v1/files", tags=["files"])

_ERRORS = error_responses(
    {
        400: "bad multipart body",
        401: "no or unknown API key",
        404: "no such file",
        413: "too large",
        415: "not multipart",
        422: "a field is out of range",
        429: "too many files",
        503: "dependency down",
    }
)
_FILE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["content"],
                    "properties": {
                        "content": {"type": "string", "format": "binary"},
                        "filename": {"type": "string"},
                        "content_type": {"type": "string"},
                        "metadata": {"type": "string", "description": "a JSON object"},
                    },
                }
            }
        },
    }
}
_FIELDS = ("filename", "content_type", "metadata")
# The bytes are the tenant's own but served from the API's origin: never run them as a page there.
_DOWNLOAD_HEADERS = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox; default-src 'none'"}


def _file(request: Request, svc: Services, rec: FileRecord, status_code: int = 200) -> JSONResponse:
    return JSONResponse(rec.to_api(base_url(request, svc.settings)), status_code=status_code)


@router.post("", status_code=201, responses=_ERRORS, openapi_extra=_FILE_BODY, summary="Upload a file")
async def create_file(request: Request, svc: ServicesDep, tenant: TenantDep) -> JSONResponse:
    """Multipart: the file as part `content` (its filename and content type kept), and optional text
    fields `filename`, `content_type` and `metadata` (a JSON object). Answers 201 with the file object."""
    data, filename, content_type, fields = await _read_upload(request)
    metadata: Any = None
    if fields.get("metadata"):
        try:
            metadata = json.loads(fields["metadata"])
        except (ValueError, RecursionError):
            raise Problem(422, Code.validation_error, "metadata: not JSON", "metadata") from None
    rec = await run_in_threadpool(
        svc.files.create,
        tenant,
        data,
        fields.get("filename") or filename,
        fields.get("content_type") or content_type,
        metadata,
    )
    return _file(request, svc, rec, 201)


async def _read_upload(request: Request) -> tuple[bytes, str, str, dict[str, str]]:
    """The `content` part's bytes, filename and content type, and the text fields we read."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "multipart/form-data":
        raise Problem(415, Code.unsupported_media_type, "send multipart/form-data with the file as part `content`")
    fields: dict[str, str] = {}
    found: tuple[bytes, str, str] | None = None
    try:
        # Text parts carry names and metadata only: 64 KiB each is ample (metadata is capped far below).
        async with request.form(max_files=1, max_fields=8, max_part_size=16 * MAX_METADATA_BYTES) as form:
            for name, value in form.multi_items():
                if isinstance(value, UploadFile):
                    if name == "content":
                        found = (await value.read(), value.filename or "", value.content_type or "")
                elif name == "content" and found is None:  # the file's text sent as a plain field
                    found = (value.encode(), "", "")
                elif name in _FIELDS:
                    fields.setdefault(name, value)
    except (HTTPException, MultiPartException, ValueError, KeyError):  # what a broken body raises
        raise Problem(400, Code.invalid_multipart, "the multipart body could not be parsed") from None
    if found is None:
        raise Problem(422, Code.validation_error, "content: the file is required", "content")
    return (*found, fields)


@router.get("", responses=_ERRORS, summary="List files")
def list_files(request: Request, svc: ServicesDep, tenant: TenantDep) -> dict[str, Any]:
    """The tenant's files, newest first, as one page (`next` is always null)."""
    base = base_url(request, svc.settings)
    return {"results": [rec.to_api(base) for rec in svc.files.list(tenant)], "next": None, "previous": None}


@router.get("/{file_id}", responses=_ERRORS, summary="Get a file")
def get_file(file_id: str, request: Request, svc: ServicesDep, tenant: TenantDep) -> JSONResponse:
    """The file object."""
    rec = svc.files.get(tenant, file_id)
    if rec is None:
        raise Problem(404, Code.not_found, f"no file {file_id!r}")
    return _file(request, svc, rec)


@router.get("/{file_id}/download", responses=_ERRORS, summary="Download a file")
def download_file(file_id: str, svc: ServicesDep, tenant: TenantDep) -> Response:
    """The file's bytes, with its content type."""
    rec, data = svc.files.fetch(tenant, file_id)
    headers = {
        **_DOWNLOAD_HEADERS,
        "ETag": f'"{rec.md5}"',
        "Content-Disposition": f"attachment; filename*=utf-8''{quote(rec.name)}",
    }
    return Response(data, media_type=rec.content_type, headers=headers)


@router.delete("/{file_id}", status_code=204, responses=_ERRORS, summary="Delete a file")
def delete_file(file_id: str, svc: ServicesDep, tenant: TenantDep) -> Response:
    """Delete the file's bytes and record; afterwards it is a 404."""
    if not svc.files.delete(tenant, file_id):
        raise Problem(404, Code.not_found, f"no file {file_id!r}")
    return Response(status_code=204)
