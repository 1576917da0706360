"""What each call sends and how its answer is read, defined once for the sync and the async client
(`inpaint_client.sdk`), which only do the I/O."""

from __future__ import annotations

import base64
import io
import json
import os
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from inpaint_client.types import TERMINAL, Event, LoraRef

Rows = list[dict[str, Any]]  # a module-level name: inside the clients `list` is a method
ImageLike = str | os.PathLike[str] | bytes | Any  # a path, raw bytes, or a PIL image
# A LoRA adapter for a job: an uploaded one's id, an https:// URL, (either, scale), or {"id"|"url", "scale"}
LoraLike = str | tuple[str, float] | LoraRef
RETRIED = (429, 503)  # refused for now: the answer says when to come back (Retry-After)


class InpaintError(Exception):
    """An error answered by the API: HTTP status, stable code and message."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.status, self.code, self.message = status, code, message


def image_bytes(img: ImageLike) -> bytes:
    """A path, bytes, or a PIL image, as the bytes to upload (PIL images as PNG)."""
    if isinstance(img, bytes):
        return img
    if isinstance(img, (str, os.PathLike)):
        return Path(img).read_bytes()
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _b64(img: ImageLike) -> str:
    return base64.b64encode(image_bytes(img)).decode()


@dataclass
class Call:
    """One request: what the sync and async clients both send."""

    method: str
    path: str
    kwargs: dict[str, Any] = field(default_factory=dict)


def read(resp: httpx.Response) -> Any:
    if resp.status_code >= 400:
        try:
            err = resp.json()["error"]
            raise InpaintError(resp.status_code, err["code"], err["message"])
        except (ValueError, KeyError, TypeError):
            raise InpaintError(resp.status_code, "http_error", resp.text[:200]) from None
    return None if resp.status_code == 204 else resp.json()


def retry_after(resp: httpx.Response, attempt: int) -> float:
    try:
        return min(60.0, float(resp.headers.get("retry-after", "")))
    except ValueError:
        return min(30.0, 0.5 * 2**attempt) * random.uniform(0.8, 1.2)


def lora_ref(lora: LoraLike) -> LoraRef:
    """A job's `loras` entry: an https:// URL is fetched by the service, anything else is an uploaded id."""
    if isinstance(lora, dict):
        return lora
    ref, scale = (lora, None) if isinstance(lora, str) else lora
    out: LoraRef = {"url": ref} if ref.startswith("https://") else {"id": ref}
    if scale is not None:
        out["scale"] = float(scale)
    return out


def submit(
    image: ImageLike,
    mask: ImageLike,
    prompt: str,
    idempotency_key: str | None,
    params: dict[str, Any],
    model: str | None = None,
    loras: Iterable[LoraLike] | None = None,
) -> Call:
    body = {"prompt": prompt, "image": _b64(image), "mask": _b64(mask), **params}
    if model:
        body["model"] = model
    if loras:
        body["loras"] = [lora_ref(x) for x in loras]
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    return Call("POST", "/v1/jobs", {"json": body, "headers": headers})


def list_jobs(status: str | None, limit: int, cursor: str | None) -> Call:
    params = {k: v for k, v in {"status": status, "limit": limit, "cursor": cursor}.items() if v is not None}
    return Call("GET", "/v1/jobs", {"params": params})


def upload_lora(file: str | os.PathLike[str] | bytes, name: str | None) -> Call:
    """`POST /v1/loras` with the adapter as the whole body; its name defaults to the file's."""
    if isinstance(file, bytes):
        data, name = file, name or ""
    else:
        data, name = Path(file).read_bytes(), name or Path(file).name
    headers = {"content-type": "application/octet-stream"}
    return Call("POST", "/v1/loras", {"content": data, "headers": headers, "params": {"name": name} if name else {}})


def create_batch(
    rows: list[dict[str, Any]] | None, input_file: str | None, parameters: dict[str, Any] | None, error_threshold: int
) -> Call:
    body: dict[str, Any] = {"parameters": parameters or {}, "error_threshold": error_threshold}
    if rows is not None:
        # The card's rows: images may be paths, bytes or PIL images here; they travel as base64.
        body["input_data"] = {"data": [
            {k: (_b64(v) if k in ("image", "mask", "mask_image") and not isinstance(v, str) else v) for k, v in r.items()}
            for r in rows
        ]}  # fmt: skip
    else:
        body["input_file"] = input_file
    return Call("POST", "/v1/batches", {"json": body})


class Backoff:
    """Polling until something ends: growing delays, a deadline."""

    def __init__(self, what: str, timeout: float | None, poll_s: float, max_poll_s: float):
        self.what, self.timeout = what, timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.delay, self.max = poll_s, max_poll_s

    def next(self, status: str) -> float | None:
        """None when `status` is terminal; else seconds to sleep (TimeoutError past the deadline)."""
        if status in TERMINAL:
            return None
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise TimeoutError(f"{self.what} still {status} after {self.timeout}s")
        delay, self.delay = self.delay, min(self.max, self.delay * 1.5)
        return delay


class Stream:
    """A job's event stream across reconnects: the last id seen, resent as Last-Event-ID."""

    def __init__(self, job_id: str, reconnects: int):
        self.path, self.left, self.last_id = f"/v1/jobs/{job_id}/events", reconnects, ""
        self.done = False

    def headers(self) -> dict[str, str]:
        return {"Last-Event-ID": self.last_id} if self.last_id else {}

    def seen(self, event: str, data: str, event_id: str | None) -> Event | None:
        if not data:
            return None
        self.last_id = event_id or self.last_id
        self.done = event in TERMINAL
        return {"event": event, "id": event_id, "data": json.loads(data)}

    def lost(self, exc: Exception) -> None:
        """The connection dropped: try again (resuming), or give up after `reconnects` tries."""
        if self.left <= 0:
            raise exc
        self.left -= 1


def connection(base_url: str | None, api_key: str | None) -> tuple[str, dict[str, str]]:
    """The API's URL and the headers of every call (INPAINT_URL, INPAINT_API_KEY by default)."""
    base_url = base_url or os.environ.get("INPAINT_URL", "http://127.0.0.1:8000")
    api_key = api_key or os.environ.get("INPAINT_API_KEY")
    return base_url, ({"Authorization": f"Bearer {api_key}"} if api_key else {})
