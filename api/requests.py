"""What a job request says: its body (JSON, Replicate's `{"input": …}` shape, or multipart) and its
`Prefer` header (RFC 7240)."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from fastapi import Request
from starlette.datastructures import UploadFile

from shared.errors import Code, Problem
from shared.imaging import decode_base64

MAX_WAIT_S = 60.0
_WAIT = re.compile(r"(?:^|[,;\s])wait(?:\s*=\s*\"?(\d+(?:\.\d+)?)\"?)?(?=$|[,;\s])", re.IGNORECASE)
# Replicate's event names, and ours
_EVENTS = {"start": "started", "output": "progress", "logs": "progress", "completed": "completed",
           "started": "started", "progress": "progress"}  # fmt: skip
_WRAPPER = {"input", "webhook", "webhook_events_filter", "version", "stream"}


def preferred_wait(prefer: str | None) -> float:
    """Seconds the client prefers to wait for the job to end (`Prefer: wait` is 60, `wait=N` at most 60), or 0."""
    found = _WAIT.search(prefer or "")
    if found is None:
        return 0.0
    return min(MAX_WAIT_S, float(found.group(1))) if found.group(1) else MAX_WAIT_S


def unwrap(body: dict[str, Any]) -> dict[str, Any]:
    """Replicate's shape, `{"input": {…}, "webhook": …, "webhook_events_filter": […]}`, as our fields."""
    if not isinstance(body.get("input"), dict):
        return body
    unknown = set(body) - _WRAPPER
    if unknown:
        raise Problem(
            422, Code.validation_error, f"{sorted(unknown)[0]}: not a field of the request", sorted(unknown)[0]
        )
    fields = dict(body["input"])
    if body.get("webhook") is not None:
        fields["webhook"] = body["webhook"]
    if body.get("webhook_events_filter") is not None:
        events = body["webhook_events_filter"]
        if not isinstance(events, list):
            raise Problem(422, Code.validation_error, "webhook_events_filter: a list", "webhook_events_filter")
        fields["webhook_events"] = sorted({_EVENTS.get(str(e), str(e)) for e in events})
    return fields


async def read_form(request: Request, broken: str) -> tuple[list[tuple[str, str]], dict[str, bytes]]:
    """A multipart body within our limits: its text fields in order (repeats kept) and its files (the
    first of each name; `name[]` is `name`). `broken`: the message when it cannot be parsed."""
    fields: list[tuple[str, str]] = []
    files: dict[str, bytes] = {}
    try:
        async with request.form(max_files=4, max_fields=64, max_part_size=1024 * 1024) as form:
            for name, value in form.multi_items():
                key = name.removesuffix("[]")
                if isinstance(value, UploadFile):
                    files.setdefault(key, await value.read())
                else:
                    fields.append((key, value))
    except Exception:  # noqa: BLE001 - a broken multipart body is the client's error
        raise Problem(400, Code.invalid_multipart, broken) from None
    return fields, files


async def read_submission(
    request: Request, fingerprint: bool = True
) -> tuple[dict[str, Any], bytes | None, bytes | None, bytes]:
    """Fields, image bytes and mask bytes from a JSON or multipart body, plus, with `fingerprint`, a
    digest of the body (b"" without: hashing 20 MB for no idempotency key is waste)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        pairs, files = await read_form(request, "the multipart body could not be parsed")
        fields: dict[str, Any] = {}
        for name, value in pairs:
            if name == "webhook_events":
                fields.setdefault(name, []).extend(v for v in value.split(",") if v)
            elif name == "lora":  # repeated `lora=ID[:SCALE]` parts, or an https:// URL (scale 1)
                if not isinstance(fields.setdefault("loras", []), list):
                    raise Problem(
                        422, Code.validation_error, "loras: give `lora` parts or one `loras`, not both", "loras"
                    )
                fields["loras"].append(_lora_part(value))
            elif name == "loras":  # one JSON list, as in a JSON body
                fields[name] = _json_or_text(value)
            else:
                fields[name] = value
        image = files.pop("image", None)
        mask = files.pop("mask", None) or files.pop("mask_image", None)
        for name in ("image", "mask", "mask_image"):
            if isinstance(fields.get(name), str):  # a data URL sent as a plain form field
                if name == "image" and image is None:
                    image = decode_base64(fields.pop(name), name)
                elif name != "image" and mask is None:
                    mask = decode_base64(fields.pop(name), name)
        if not fingerprint:
            return fields, image, mask, b""
        digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode() + (image or b"") + (mask or b""))
        return fields, image, mask, digest.digest()
    if ctype not in ("application/json", ""):
        raise Problem(415, Code.unsupported_media_type, "send application/json or multipart/form-data")
    raw = await request.body()
    return unwrap(json_object(raw)), None, None, hashlib.sha256(raw).digest() if fingerprint else b""


def _json_or_text(value: str) -> Any:
    """A multipart text part that holds JSON, or the text itself (the job's validation judges it)."""
    try:
        return json.loads(value)
    except ValueError:
        return value


def _lora_part(value: str) -> dict[str, Any]:
    """A multipart `lora` part as a `loras` entry (the job's validation judges it)."""
    value = value.strip()
    if value.lower().startswith("https://"):
        return {"url": value}
    ref, sep, scale = value.rpartition(":")
    if not sep:
        return {"id": value}
    try:
        return {"id": ref, "scale": float(scale)}
    except ValueError:
        return {"id": value}


def json_object(raw: bytes) -> dict[str, Any]:
    """A request body that must be one JSON object; 400 `invalid_json` otherwise."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise Problem(400, Code.invalid_json, "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise Problem(400, Code.invalid_json, "the body must be a JSON object")
    return body
