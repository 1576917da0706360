"""A small Python client for the inpaint API, sync and async, on httpx (imports nothing of the server).

    from client.sdk import InpaintClient
    with InpaintClient("http://127.0.0.1:8000", api_key="...") as c:
        job = c.submit("photo.png", "mask.png", "a red apple", num_inference_steps=30)
        for event in c.events(job["id"]):          # status and progress, as they happen
            print(event["event"], event["data"])
        job = c.wait(job["id"], timeout=120)
        png = c.download(job["outputs"][0]["url"])

`AsyncInpaintClient` has the same methods, awaited (`events` is an async iterator).
`verify_webhook(headers, body, secret)` checks a delivery's Standard Webhooks signature.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx

TERMINAL = ("succeeded", "failed", "canceled")
ImageLike = str | os.PathLike[str] | bytes | Any  # a path, raw bytes, or a PIL image
Job = dict[str, Any]


class InpaintError(Exception):
    """An error answered by the API: HTTP status, stable code and message."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.status, self.code, self.message = status, code, message


class WebhookVerificationError(Exception):
    """The delivery's signature or timestamp does not check out: do not trust its body."""


def image_bytes(img: ImageLike) -> bytes:
    """A path, bytes, or a PIL image, as the bytes to upload (PIL images as PNG)."""
    if isinstance(img, bytes):
        return img
    if isinstance(img, (str, os.PathLike)):
        return Path(img).read_bytes()
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _job_body(image: ImageLike, mask: ImageLike, prompt: str, params: dict[str, Any]) -> dict[str, Any]:
    return {
        "prompt": prompt,
        "image": base64.b64encode(image_bytes(image)).decode(),
        "mask": base64.b64encode(image_bytes(mask)).decode(),
        **params,
    }


def _check(resp: httpx.Response) -> Any:
    if resp.status_code >= 400:
        try:
            err = resp.json()["error"]
            raise InpaintError(resp.status_code, err["code"], err["message"])
        except (ValueError, KeyError, TypeError):
            raise InpaintError(resp.status_code, "http_error", resp.text[:200]) from None
    return resp.json()


def _settings(base_url: str | None, api_key: str | None) -> tuple[str, dict[str, str]]:
    base_url = base_url or os.environ.get("INPAINT_URL", "http://127.0.0.1:8000")
    api_key = api_key or os.environ.get("INPAINT_API_KEY")
    return base_url, ({"Authorization": f"Bearer {api_key}"} if api_key else {})


class _SseParser:
    """Server-Sent Events, a line at a time: `feed` returns {"event", "id", "data"} when a block ends."""

    def __init__(self) -> None:
        self.event, self.data = "message", ""
        self.id: str | None = None

    def feed(self, line: str) -> dict[str, Any] | None:
        out = None
        if line == "":
            if self.data:
                out = {"event": self.event, "id": self.id, "data": json.loads(self.data)}
            self.event, self.data, self.id = "message", "", None
        elif line.startswith("event:"):
            self.event = line[6:].strip()
        elif line.startswith("data:"):
            self.data += line[5:].strip()
        elif line.startswith("id:"):
            self.id = line[3:].strip()
        return out


class _Backoff:
    def __init__(self, job_id: str, timeout: float | None, poll_s: float, max_poll_s: float):
        self.job_id, self.timeout = job_id, timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.delay, self.max = poll_s, max_poll_s

    def next(self, job: Job) -> float | None:
        """None when the job has ended; else seconds to sleep (TimeoutError past the deadline)."""
        if job["status"] in TERMINAL:
            return None
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise TimeoutError(f"job {self.job_id} still {job['status']} after {self.timeout}s")
        delay, self.delay = self.delay, min(self.max, self.delay * 1.5)
        return delay


class InpaintClient:
    """Submit, follow, wait for, cancel, list and download jobs."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, timeout: float = 60.0):
        url, headers = _settings(base_url, api_key)
        self._http = httpx.Client(base_url=url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> InpaintClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        return _check(self._http.request(method, path, **kw))

    def submit(
        self, image: ImageLike, mask: ImageLike, prompt: str, idempotency_key: str | None = None, **params: Any
    ) -> Job:
        """Submit a job; `params` are the optional fields of `POST /v1/jobs` (steps, seed, webhook…)."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._call("POST", "/v1/jobs", json=_job_body(image, mask, prompt, params), headers=headers)  # type: ignore[no-any-return]

    def get(self, job_id: str) -> Job:
        return self._call("GET", f"/v1/jobs/{job_id}")  # type: ignore[no-any-return]

    def cancel(self, job_id: str) -> Job:
        return self._call("POST", f"/v1/jobs/{job_id}/cancel")  # type: ignore[no-any-return]

    def list(self, status: str | None = None, limit: int = 20, cursor: str | None = None) -> dict[str, Any]:
        params = {k: v for k, v in {"status": status, "limit": limit, "cursor": cursor}.items() if v is not None}
        return self._call("GET", "/v1/jobs", params=params)  # type: ignore[no-any-return]

    def events(self, job_id: str) -> Iterator[dict[str, Any]]:
        """The job's events (`status`, `progress`, then its terminal status) until it ends."""
        with self._http.stream("GET", f"/v1/jobs/{job_id}/events", timeout=None) as resp:
            if resp.status_code >= 400:
                resp.read()
                _check(resp)
            parser = _SseParser()
            for line in resp.iter_lines():
                if (ev := parser.feed(line)) is not None:
                    yield ev
                    if ev["event"] in TERMINAL:
                        return

    def wait(
        self,
        job_id: str,
        timeout: float | None = None,
        on_update: Callable[[Job], None] | None = None,
        poll_s: float = 0.2,
        max_poll_s: float = 2.0,
    ) -> Job:
        """Poll with backoff until the job ends (TimeoutError past `timeout` seconds)."""
        backoff = _Backoff(job_id, timeout, poll_s, max_poll_s)
        while True:
            job = self.get(job_id)
            if on_update:
                on_update(job)
            delay = backoff.next(job)
            if delay is None:
                return job
            time.sleep(delay)

    def webhook_secret(self) -> str:
        """Your tenant's webhook signing secret (`whsec_…`), for `verify_webhook`."""
        return str(self._call("GET", "/v1/webhooks/default/secret")["key"])

    def rotate_webhook_secret(self) -> str:
        """A new signing secret; the previous one keeps signing beside it for the overlap (24 h by default)."""
        return str(self._call("POST", "/v1/webhooks/default/secret/rotate")["key"])

    def download(self, url: str) -> bytes:
        """The bytes behind an output's presigned URL."""
        resp = httpx.get(url, timeout=60)
        resp.raise_for_status()
        return resp.content


class AsyncInpaintClient:
    """`InpaintClient` for asyncio: the same methods, awaited."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, timeout: float = 60.0):
        url, headers = _settings(base_url, api_key)
        self._http = httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncInpaintClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _call(self, method: str, path: str, **kw: Any) -> Any:
        return _check(await self._http.request(method, path, **kw))

    async def submit(
        self, image: ImageLike, mask: ImageLike, prompt: str, idempotency_key: str | None = None, **params: Any
    ) -> Job:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return await self._call("POST", "/v1/jobs", json=_job_body(image, mask, prompt, params), headers=headers)  # type: ignore[no-any-return]

    async def get(self, job_id: str) -> Job:
        return await self._call("GET", f"/v1/jobs/{job_id}")  # type: ignore[no-any-return]

    async def cancel(self, job_id: str) -> Job:
        return await self._call("POST", f"/v1/jobs/{job_id}/cancel")  # type: ignore[no-any-return]

    async def list(self, status: str | None = None, limit: int = 20, cursor: str | None = None) -> dict[str, Any]:
        params = {k: v for k, v in {"status": status, "limit": limit, "cursor": cursor}.items() if v is not None}
        return await self._call("GET", "/v1/jobs", params=params)  # type: ignore[no-any-return]

    async def events(self, job_id: str) -> AsyncIterator[dict[str, Any]]:
        async with self._http.stream("GET", f"/v1/jobs/{job_id}/events", timeout=None) as resp:
            if resp.status_code >= 400:
                await resp.aread()
                _check(resp)
            parser = _SseParser()
            async for line in resp.aiter_lines():
                if (ev := parser.feed(line)) is not None:
                    yield ev
                    if ev["event"] in TERMINAL:
                        return

    async def wait(
        self,
        job_id: str,
        timeout: float | None = None,
        on_update: Callable[[Job], None] | None = None,
        poll_s: float = 0.2,
        max_poll_s: float = 2.0,
    ) -> Job:
        backoff = _Backoff(job_id, timeout, poll_s, max_poll_s)
        while True:
            job = await self.get(job_id)
            if on_update:
                on_update(job)
            delay = backoff.next(job)
            if delay is None:
                return job
            await asyncio.sleep(delay)

    async def webhook_secret(self) -> str:
        return str((await self._call("GET", "/v1/webhooks/default/secret"))["key"])

    async def rotate_webhook_secret(self) -> str:
        return str((await self._call("POST", "/v1/webhooks/default/secret/rotate"))["key"])

    async def download(self, url: str) -> bytes:
        async with httpx.AsyncClient(timeout=60) as http:
            resp = await http.get(url)
            resp.raise_for_status()
            return resp.content


def verify_webhook(headers: Mapping[str, str], body: str | bytes, secret: str) -> dict[str, Any]:
    """The delivery's payload if its Standard Webhooks signature and timestamp check out.

    `secret` is your tenant's secret (`client.webhook_secret()`); it may hold several space-separated
    secrets (yours before and after a rotation): any one of them verifies.
    Raises `WebhookVerificationError` otherwise: a forged, altered or replayed (older than 5 minutes)
    delivery.
    """
    from standardwebhooks.webhooks import Webhook
    from standardwebhooks.webhooks import WebhookVerificationError as _Invalid

    lowered = {k.lower(): v for k, v in headers.items()}
    text = body.decode() if isinstance(body, bytes) else body
    for s in secret.split():
        try:
            return Webhook(s).verify(text, lowered)  # type: ignore[no-any-return]
        except _Invalid:
            continue
    raise WebhookVerificationError("the webhook signature does not match any secret, or it is too old")
