"""`POST /v1/images/edits`: OpenAI's images-edit request, so the official `openai` client (or any tool
that speaks that API) edits images on this service unchanged, `base_url` pointed here.

The request is multipart: `image` (a PNG; without `mask`, its transparent pixels mark the area to
edit), `mask` (transparent = edit), `prompt`, `n`, `size`, `response_format` (`url` or
`b64_json`), `output_format`; `model` picks a served model when it names one (`dall-e-2` and other
names of OpenAI's are ignored: the deployment's default runs), `user` and OpenAI's other knobs are
accepted and ignored, and
fields of our own job body may ride along (`num_inference_steps`, `seed`, …). The job is an ordinary
interactive job of the caller's tenant, and the answer waits for it. Errors come in OpenAI's shape.
"""

from __future__ import annotations

import io
import time
from typing import Any

import pybase64
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from PIL import Image

from api.deps import Services, ServicesDep, TenantDep
from api.holds import Hold, holding
from api.requests import read_form
from api.waiting import until_ended
from shared import catalog
from shared.config import Settings
from shared.errors import Code, Problem
from shared.imaging import decode_pixels, inspect_image
from shared.jobs.submit import FieldsInvalid, submit_job, validate_fields
from shared.jobs.view import to_job
from shared.schemas import JobInput

router = APIRouter(tags=["openai"])
_OURS = set(JobInput.model_fields) - {"prompt", "num_outputs", "output_format", "webhook", "webhook_events", "loras"}


def openai_error(p: Problem) -> JSONResponse:
    """A Problem in OpenAI's error shape."""
    kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(p.status)
    kind = kind or ("server_error" if p.status >= 500 else "invalid_request_error")
    body = {"error": {"message": p.message, "type": kind, "param": p.param, "code": str(p.code)}}
    return JSONResponse(body, status_code=p.status, headers=p.headers)


def _sized(data: bytes, size: str, mask: bool, max_pixels: int) -> bytes:
    """The image at `size` (WxH; `auto`: as it is), as PNG, its alpha kept; checked like any upload first."""
    field = "mask" if mask else "image"
    inspect_image(data, field, max_pixels)
    if size in ("", "auto"):
        return data
    w, sep, h = size.lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit() or not (8 <= int(w) <= 2048 and 8 <= int(h) <= 2048):
        raise Problem(400, Code.validation_error, f"size: {size!r} is not WIDTHxHEIGHT", "size")
    img: Image.Image = Image.open(io.BytesIO(data))
    decode_pixels(img, field)  # the check above may not have decoded them (a PNG's is its checksums)
    img = img.resize((int(w), int(h)), Image.Resampling.NEAREST if mask else Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _job_fields(fields: dict[str, str], settings: Settings) -> dict[str, Any]:
    try:
        n = int(fields.get("n") or 1)
    except ValueError:
        raise Problem(400, Code.validation_error, "n: an integer from 1 to 8", "n") from None
    fmt = fields.get("output_format") or "png"
    out: dict[str, Any] = {"prompt": fields.get("prompt", ""), "num_outputs": n, "output_format": fmt}
    out.update({k: v for k, v in fields.items() if k in _OURS})
    if "model" in out and not any(out["model"] in m.aliases for m in catalog.served(settings)):
        del out["model"]  # OpenAI's own model names
    return out


@router.post("/v1/images/edits", summary="OpenAI images-edit (the openai client works unchanged)")
async def edit(request: Request, svc: ServicesDep, tenant: TenantDep) -> JSONResponse:
    try:
        async with holding(request, tenant) as hold:  # the answer waits for the job: a held connection
            return await _edit(request, svc, tenant, hold)
    except Problem as p:
        return openai_error(p)


async def _edit(request: Request, svc: Services, tenant: str, hold: Hold) -> JSONResponse:
    try:
        pairs, files = await read_form(request, "send multipart/form-data with `image` and `prompt`")
        fields = dict(pairs)  # several images: the first is edited
        if "image" not in files:
            raise Problem(400, Code.validation_error, "image: a PNG file is required", "image")
        if "prompt" not in fields:
            raise Problem(400, Code.validation_error, "prompt: required", "prompt")
        size = fields.get("size", "")
        limit = svc.settings.max_pixels
        image = await run_in_threadpool(_sized, files["image"], size, False, limit)
        # No mask: the image's own transparent pixels are the area to edit (the mask reads alpha).
        mask = await run_in_threadpool(_sized, files.get("mask", files["image"]), size, True, limit)
        try:
            params, image_b, mask_b = validate_fields(_job_fields(fields, svc.settings), image, mask, svc.settings)
        except FieldsInvalid as exc:
            first: dict[str, Any] = dict(exc.errors[0]) if exc.errors else {}
            param = ".".join(str(x) for x in first.get("loc", ()))
            raise Problem(400, Code.validation_error, f"{param}: {first.get('msg', 'invalid')}", param) from None
        rec = await run_in_threadpool(submit_job, svc, tenant, params, image_b, mask_b)
        ended = await until_ended(request, svc, hold, rec.id, svc.settings.score_timeout_s)
        if ended is None:
            raise Problem(504, Code.timeout, f"the job {rec.id} did not finish in time; GET /v1/jobs/{rec.id}")
        if ended.error is not None or ended.status.value != "succeeded":
            code = ended.error.code if ended.error else "canceled"
            status = 400 if code in ("invalid_input", "content_blocked") else 500
            raise Problem(status, Code(code) if code in Code.__members__ else Code.internal, f"the job {rec.id} {code}")
    except Problem as p:
        return openai_error(p)
    job = to_job(ended, svc.storage)
    if fields.get("response_format", "url") == "b64_json":
        blobs = await run_in_threadpool(svc.storage.get_many, [o.key for o in ended.outputs])
        data = [{"b64_json": pybase64.b64encode(b).decode()} for b in blobs]
    else:
        data = [{"url": o.url} for o in job.outputs]
    return JSONResponse({"created": int(time.time()), "data": data, "job_id": rec.id})
