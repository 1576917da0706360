"""The inpaint API from Python, sync and async, on httpx (nothing of the server is imported).

    from inpaint_client import InpaintClient
    with InpaintClient("http://127.0.0.1:8000", api_key="...") as c:
        job = c.submit("photo.png", "mask.png", "a red apple", num_inference_steps=30)
        for event in c.events(job["id"]):          # status and progress, as they happen
            print(event["event"], event["data"])
        job = c.wait(job["id"], timeout=120)
        png = c.download(job["outputs"][0]["url"])

`AsyncInpaintClient` has the same methods, awaited (`events` is an async iterator). What each call
sends and how its answer is read are defined once (`_Call`, `_read`); the two classes only do I/O.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import aconnect_sse, connect_sse

from inpaint_client.types import TERMINAL, Batch, Event, Job, JobPage

Rows = list[dict[str, Any]]  # a module-level name: inside the classes `list` is a method
ImageLike = str | os.PathLike[str] | bytes | Any  # a path, raw bytes, or a PIL image
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
class _Call:
    """One request: what the sync and async clients both send."""

    method: str
    path: str
    kwargs: dict[str, Any] = field(default_factory=dict)


def _read(resp: httpx.Response) -> Any:
    if resp.status_code >= 400:
        try:
            err = resp.json()["error"]
            raise InpaintError(resp.status_code, err["code"], err["message"])
        except (ValueError, KeyError, TypeError):
            raise InpaintError(resp.status_code, "http_error", resp.text[:200]) from None
    return None if resp.status_code == 204 else resp.json()


def _retry_after(resp: httpx.Response, attempt: int) -> float:
    try:
        return min(60.0, float(resp.headers.get("retry-after", "")))
    except ValueError:
        return min(30.0, 0.5 * 2**attempt) * random.uniform(0.8, 1.2)


def _submit(
    image: ImageLike, mask: ImageLike, prompt: str, idempotency_key: str | None, params: dict[str, Any]
) -> _Call:
    body = {"prompt": prompt, "image": _b64(image), "mask": _b64(mask), **params}
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    return _Call("POST", "/v1/jobs", {"json": body, "headers": headers})


def _list(status: str | None, limit: int, cursor: str | None) -> _Call:
    params = {k: v for k, v in {"status": status, "limit": limit, "cursor": cursor}.items() if v is not None}
    return _Call("GET", "/v1/jobs", {"params": params})


def _create_batch(
    rows: list[dict[str, Any]] | None, input_file: str | None, parameters: dict[str, Any] | None, error_threshold: int
) -> _Call:
    body: dict[str, Any] = {"parameters": parameters or {}, "error_threshold": error_threshold}
    if rows is not None:
        # The card's rows: images may be paths, bytes or PIL images here; they travel as base64.
        body["input_data"] = {"data": [
            {k: (_b64(v) if k in ("image", "mask", "mask_image") and not isinstance(v, str) else v) for k, v in r.items()}
            for r in rows
        ]}  # fmt: skip
    else:
        body["input_file"] = input_file
    return _Call("POST", "/v1/batches", {"json": body})


class _Backoff:
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


class _Stream:
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


def _settings(base_url: str | None, api_key: str | None) -> tuple[str, dict[str, str]]:
    base_url = base_url or os.environ.get("INPAINT_URL", "http://127.0.0.1:8000")
    api_key = api_key or os.environ.get("INPAINT_API_KEY")
    return base_url, ({"Authorization": f"Bearer {api_key}"} if api_key else {})


class InpaintClient:
    """Submit, follow, wait for, cancel, delete, list and download jobs; scoring batches; webhook secrets.

    `http_client`: your own `httpx.Client` (its base URL and headers are used as they are).
    Requests answered 429 or 503 are retried after their `Retry-After`, up to `max_retries` times.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 3,
        http_client: httpx.Client | None = None,
    ):
        url, headers = _settings(base_url, api_key)
        self._http = http_client or httpx.Client(base_url=url, headers=headers, timeout=timeout)
        self._files = httpx.Client(timeout=timeout)  # presigned URLs: no API key goes to the bucket
        self.max_retries = max_retries

    def close(self) -> None:
        self._http.close()
        self._files.close()

    def __enter__(self) -> InpaintClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, call: _Call) -> Any:
        for attempt in range(self.max_retries + 1):
            resp = self._http.request(call.method, call.path, **call.kwargs)
            if resp.status_code not in RETRIED or attempt == self.max_retries:
                return _read(resp)
            time.sleep(_retry_after(resp, attempt))

    def submit(
        self, image: ImageLike, mask: ImageLike, prompt: str, idempotency_key: str | None = None, **params: Any
    ) -> Job:
        """Submit a job; `params` are the optional fields of `POST /v1/jobs` (steps, seed, webhook…)."""
        return self._send(_submit(image, mask, prompt, idempotency_key, params))  # type: ignore[no-any-return]

    def get(self, job_id: str) -> Job:
        return self._send(_Call("GET", f"/v1/jobs/{job_id}"))  # type: ignore[no-any-return]

    def cancel(self, job_id: str) -> Job:
        return self._send(_Call("POST", f"/v1/jobs/{job_id}/cancel"))  # type: ignore[no-any-return]

    def delete(self, job_id: str) -> None:
        """Cancel if needed, and erase the job's inputs, outputs and record."""
        self._send(_Call("DELETE", f"/v1/jobs/{job_id}"))

    def list(self, status: str | None = None, limit: int = 20, cursor: str | None = None) -> JobPage:
        return self._send(_list(status, limit, cursor))  # type: ignore[no-any-return]

    def events(self, job_id: str, reconnects: int = 5) -> Iterator[Event]:
        """The job's events (`status`, `progress`, then its terminal status) until it ends; a dropped
        connection is resumed where it left off (Last-Event-ID)."""
        stream = _Stream(job_id, reconnects)
        while not stream.done:
            try:
                with connect_sse(self._http, "GET", stream.path, headers=stream.headers(), timeout=None) as src:
                    if src.response.status_code >= 400:
                        src.response.read()
                        _read(src.response)
                    for sse in src.iter_sse():
                        if (ev := stream.seen(sse.event, sse.data, sse.id)) is not None:
                            yield ev
                    stream.done = True  # the server closes after the terminal event
            except httpx.TransportError as exc:
                stream.lost(exc)

    def wait(
        self,
        job_id: str,
        timeout: float | None = None,
        on_update: Callable[[Job], None] | None = None,
        poll_s: float = 0.2,
        max_poll_s: float = 2.0,
    ) -> Job:
        """Poll with backoff until the job ends (TimeoutError past `timeout` seconds)."""
        backoff = _Backoff(f"job {job_id}", timeout, poll_s, max_poll_s)
        while True:
            job = self.get(job_id)
            if on_update:
                on_update(job)
            delay = backoff.next(job["status"])
            if delay is None:
                return job
            time.sleep(delay)

    def download(self, url: str) -> bytes:
        """The bytes behind an output's presigned URL."""
        resp = self._files.get(url)
        resp.raise_for_status()
        return resp.content

    def webhook_secret(self) -> str:
        """Your tenant's webhook signing secret (`whsec_…`), for `verify_webhook`."""
        return str(self._send(_Call("GET", "/v1/webhooks/default/secret"))["key"])

    def rotate_webhook_secret(self) -> str:
        """A new signing secret; the previous one keeps signing beside it for the overlap (24 h by default)."""
        return str(self._send(_Call("POST", "/v1/webhooks/default/secret/rotate"))["key"])

    def create_batch(
        self,
        rows: Rows | None = None,
        input_file: str | None = None,
        parameters: dict[str, Any] | None = None,
        error_threshold: int = -1,
    ) -> Batch:
        """A scoring batch: `rows` ({"prompt", "image", "mask_image"}, images as paths, bytes or PIL
        images) or the key of a JSONL/CSV object in the bucket (`input_file`)."""
        return self._send(_create_batch(rows, input_file, parameters, error_threshold))  # type: ignore[no-any-return]

    def get_batch(self, batch_id: str) -> Batch:
        return self._send(_Call("GET", f"/v1/batches/{batch_id}"))  # type: ignore[no-any-return]

    def cancel_batch(self, batch_id: str) -> Batch:
        return self._send(_Call("POST", f"/v1/batches/{batch_id}/cancel"))  # type: ignore[no-any-return]

    def wait_batch(self, batch_id: str, timeout: float | None = None, poll_s: float = 0.5) -> Batch:
        """Until every row has ended and the results manifest is written."""
        backoff = _Backoff(f"batch {batch_id}", timeout, poll_s, 5.0)
        while True:
            batch = self.get_batch(batch_id)
            done = batch["status"] in TERMINAL and batch.get("manifest_url")
            if (delay := backoff.next(batch["status"] if done else "running")) is None:
                return batch
            time.sleep(delay)

    def batch_results(self, batch: Batch) -> Rows:
        """The lines of a finished batch's `results.jsonl`: one per row, in input order."""
        text = self.download(batch["manifest_url"] or "").decode()
        return [json.loads(line) for line in text.splitlines() if line.strip()]


class AsyncInpaintClient:
    """`InpaintClient` for asyncio: the same methods, awaited."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 3,
        http_client: httpx.AsyncClient | None = None,
    ):
        url, headers = _settings(base_url, api_key)
        self._http = http_client or httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout)
        self._files = httpx.AsyncClient(timeout=timeout)
        self.max_retries = max_retries

    async def aclose(self) -> None:
        await self._http.aclose()
        await self._files.aclose()

    async def __aenter__(self) -> AsyncInpaintClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _send(self, call: _Call) -> Any:
        for attempt in range(self.max_retries + 1):
            resp = await self._http.request(call.method, call.path, **call.kwargs)
            if resp.status_code not in RETRIED or attempt == self.max_retries:
                return _read(resp)
            await asyncio.sleep(_retry_after(resp, attempt))

    async def submit(
        self, image: ImageLike, mask: ImageLike, prompt: str, idempotency_key: str | None = None, **params: Any
    ) -> Job:
        return await self._send(_submit(image, mask, prompt, idempotency_key, params))  # type: ignore[no-any-return]

    async def get(self, job_id: str) -> Job:
        return await self._send(_Call("GET", f"/v1/jobs/{job_id}"))  # type: ignore[no-any-return]

    async def cancel(self, job_id: str) -> Job:
        return await self._send(_Call("POST", f"/v1/jobs/{job_id}/cancel"))  # type: ignore[no-any-return]

    async def delete(self, job_id: str) -> None:
        await self._send(_Call("DELETE", f"/v1/jobs/{job_id}"))

    async def list(self, status: str | None = None, limit: int = 20, cursor: str | None = None) -> JobPage:
        return await self._send(_list(status, limit, cursor))  # type: ignore[no-any-return]

    async def events(self, job_id: str, reconnects: int = 5) -> AsyncIterator[Event]:
        stream = _Stream(job_id, reconnects)
        while not stream.done:
            try:
                async with aconnect_sse(self._http, "GET", stream.path, headers=stream.headers(), timeout=None) as src:
                    if src.response.status_code >= 400:
                        await src.response.aread()
                        _read(src.response)
                    async for sse in src.aiter_sse():
                        if (ev := stream.seen(sse.event, sse.data, sse.id)) is not None:
                            yield ev
                    stream.done = True
            except httpx.TransportError as exc:
                stream.lost(exc)

    async def wait(
        self,
        job_id: str,
        timeout: float | None = None,
        on_update: Callable[[Job], None] | None = None,
        poll_s: float = 0.2,
        max_poll_s: float = 2.0,
    ) -> Job:
        backoff = _Backoff(f"job {job_id}", timeout, poll_s, max_poll_s)
        while True:
            job = await self.get(job_id)
            if on_update:
                on_update(job)
            delay = backoff.next(job["status"])
            if delay is None:
                return job
            await asyncio.sleep(delay)

    async def download(self, url: str) -> bytes:
        resp = await self._files.get(url)
        resp.raise_for_status()
        return resp.content

    async def webhook_secret(self) -> str:
        return str((await self._send(_Call("GET", "/v1/webhooks/default/secret")))["key"])

    async def rotate_webhook_secret(self) -> str:
        return str((await self._send(_Call("POST", "/v1/webhooks/default/secret/rotate")))["key"])

    async def create_batch(
        self,
        rows: Rows | None = None,
        input_file: str | None = None,
        parameters: dict[str, Any] | None = None,
        error_threshold: int = -1,
    ) -> Batch:
        return await self._send(_create_batch(rows, input_file, parameters, error_threshold))  # type: ignore[no-any-return]

    async def get_batch(self, batch_id: str) -> Batch:
        return await self._send(_Call("GET", f"/v1/batches/{batch_id}"))  # type: ignore[no-any-return]

    async def cancel_batch(self, batch_id: str) -> Batch:
        return await self._send(_Call("POST", f"/v1/batches/{batch_id}/cancel"))  # type: ignore[no-any-return]
