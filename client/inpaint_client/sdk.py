"""The inpaint API from Python, sync and async, on httpx (nothing of the server is imported).

    from inpaint_client import InpaintClient
    with InpaintClient("http://127.0.0.1:8000", api_key="...") as c:
        job = c.submit("photo.png", "mask.png", "a red apple", num_inference_steps=30)
        for event in c.events(job["id"]):          # status and progress, as they happen
            print(event["event"], event["data"])
        job = c.wait(job["id"], timeout=120)
        png = c.download(job["outputs"][0]["url"])

`AsyncInpaintClient` has the same methods, awaited (`events` is an async iterator). What each call
sends and how its answer is read are defined once (`inpaint_client.calls`); the two classes only do I/O.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any

import httpx
from httpx_sse import aconnect_sse, connect_sse

from inpaint_client import calls
from inpaint_client.calls import RETRIED, Call, ImageLike, InpaintError, LoraLike, Rows, image_bytes, read
from inpaint_client.types import TERMINAL, Batch, Event, Job, JobPage, Lora, Model

__all__ = ["AsyncInpaintClient", "InpaintClient", "InpaintError", "image_bytes"]


class InpaintClient:
    """Submit, follow, wait for, cancel, delete, list and download jobs; served models and LoRA adapters;
    scoring batches; webhook secrets.

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
        url, headers = calls.connection(base_url, api_key)
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

    def _send(self, call: Call) -> Any:
        for attempt in range(self.max_retries + 1):
            resp = self._http.request(call.method, call.path, **call.kwargs)
            if resp.status_code not in RETRIED or attempt == self.max_retries:
                return read(resp)
            time.sleep(calls.retry_after(resp, attempt))

    def submit(
        self,
        image: ImageLike,
        mask: ImageLike,
        prompt: str,
        idempotency_key: str | None = None,
        model: str | None = None,
        loras: Iterable[LoraLike] | None = None,
        **params: Any,
    ) -> Job:
        """Submit a job; `params` are the optional fields of `POST /v1/jobs` (steps, seed, webhook…).

        Args:
            model: a served model's short name or id (`models()`); None: the deployment's default.
            loras: LoRA adapters: an uploaded one's id (`upload_lora`), an https:// URL, either with a
                scale as `(ref, 0.8)`, or `{"id"|"url": …, "scale": …}`.
        """
        call = calls.submit(image, mask, prompt, idempotency_key, params, model, loras)
        return self._send(call)  # type: ignore[no-any-return]

    def models(self) -> list[Model]:
        """The models served here, the default first, each with its ready workers and queue."""
        return self._send(Call("GET", "/v1/models"))["results"]  # type: ignore[no-any-return]

    def upload_lora(self, file: str | os.PathLike[str] | bytes, name: str | None = None) -> Lora:
        """Upload a `.safetensors` LoRA adapter (a path or its bytes); a job names it by the `id` answered."""
        return self._send(calls.upload_lora(file, name))  # type: ignore[no-any-return]

    def get(self, job_id: str) -> Job:
        return self._send(Call("GET", f"/v1/jobs/{job_id}"))  # type: ignore[no-any-return]

    def cancel(self, job_id: str) -> Job:
        return self._send(Call("POST", f"/v1/jobs/{job_id}/cancel"))  # type: ignore[no-any-return]

    def delete(self, job_id: str) -> None:
        """Cancel if needed, and erase the job's inputs, outputs and record."""
        self._send(Call("DELETE", f"/v1/jobs/{job_id}"))

    def list(self, status: str | None = None, limit: int = 20, cursor: str | None = None) -> JobPage:
        return self._send(calls.list_jobs(status, limit, cursor))  # type: ignore[no-any-return]

    def events(self, job_id: str, reconnects: int = 5) -> Iterator[Event]:
        """The job's events (`status`, `progress`, then its terminal status) until it ends; a dropped
        connection is resumed where it left off (Last-Event-ID)."""
        stream = calls.Stream(job_id, reconnects)
        while not stream.done:
            try:
                with connect_sse(self._http, "GET", stream.path, headers=stream.headers(), timeout=None) as src:
                    if src.response.status_code >= 400:
                        src.response.read()
                        read(src.response)
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
        backoff = calls.Backoff(f"job {job_id}", timeout, poll_s, max_poll_s)
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
        return str(self._send(Call("GET", "/v1/webhooks/default/secret"))["key"])

    def rotate_webhook_secret(self) -> str:
        """A new signing secret; the previous one keeps signing beside it for the overlap (24 h by default)."""
        return str(self._send(Call("POST", "/v1/webhooks/default/secret/rotate"))["key"])

    def create_batch(
        self,
        rows: Rows | None = None,
        input_file: str | None = None,
        parameters: dict[str, Any] | None = None,
        error_threshold: int = -1,
    ) -> Batch:
        """A scoring batch: `rows` ({"prompt", "image", "mask_image"}, images as paths, bytes or PIL
        images) or the key of a JSONL/CSV object in the bucket (`input_file`)."""
        return self._send(calls.create_batch(rows, input_file, parameters, error_threshold))  # type: ignore[no-any-return]

    def get_batch(self, batch_id: str) -> Batch:
        return self._send(Call("GET", f"/v1/batches/{batch_id}"))  # type: ignore[no-any-return]

    def cancel_batch(self, batch_id: str) -> Batch:
        return self._send(Call("POST", f"/v1/batches/{batch_id}/cancel"))  # type: ignore[no-any-return]

    def wait_batch(self, batch_id: str, timeout: float | None = None, poll_s: float = 0.5) -> Batch:
        """Until every row has ended and the results manifest is written."""
        backoff = calls.Backoff(f"batch {batch_id}", timeout, poll_s, 5.0)
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
        url, headers = calls.connection(base_url, api_key)
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

    async def _send(self, call: Call) -> Any:
        for attempt in range(self.max_retries + 1):
            resp = await self._http.request(call.method, call.path, **call.kwargs)
            if resp.status_code not in RETRIED or attempt == self.max_retries:
                return read(resp)
            await asyncio.sleep(calls.retry_after(resp, attempt))

    async def submit(
        self,
        image: ImageLike,
        mask: ImageLike,
        prompt: str,
        idempotency_key: str | None = None,
        model: str | None = None,
        loras: Iterable[LoraLike] | None = None,
        **params: Any,
    ) -> Job:
        call = calls.submit(image, mask, prompt, idempotency_key, params, model, loras)
        return await self._send(call)  # type: ignore[no-any-return]

    async def models(self) -> list[Model]:
        return (await self._send(Call("GET", "/v1/models")))["results"]  # type: ignore[no-any-return]

    async def upload_lora(self, file: str | os.PathLike[str] | bytes, name: str | None = None) -> Lora:
        return await self._send(calls.upload_lora(file, name))  # type: ignore[no-any-return]

    async def get(self, job_id: str) -> Job:
        return await self._send(Call("GET", f"/v1/jobs/{job_id}"))  # type: ignore[no-any-return]

    async def cancel(self, job_id: str) -> Job:
        return await self._send(Call("POST", f"/v1/jobs/{job_id}/cancel"))  # type: ignore[no-any-return]

    async def delete(self, job_id: str) -> None:
        await self._send(Call("DELETE", f"/v1/jobs/{job_id}"))

    async def list(self, status: str | None = None, limit: int = 20, cursor: str | None = None) -> JobPage:
        return await self._send(calls.list_jobs(status, limit, cursor))  # type: ignore[no-any-return]

    async def events(self, job_id: str, reconnects: int = 5) -> AsyncIterator[Event]:
        stream = calls.Stream(job_id, reconnects)
        while not stream.done:
            try:
                async with aconnect_sse(self._http, "GET", stream.path, headers=stream.headers(), timeout=None) as src:
                    if src.response.status_code >= 400:
                        await src.response.aread()
                        read(src.response)
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
        backoff = calls.Backoff(f"job {job_id}", timeout, poll_s, max_poll_s)
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
        return str((await self._send(Call("GET", "/v1/webhooks/default/secret")))["key"])

    async def rotate_webhook_secret(self) -> str:
        return str((await self._send(Call("POST", "/v1/webhooks/default/secret/rotate")))["key"])

    async def create_batch(
        self,
        rows: Rows | None = None,
        input_file: str | None = None,
        parameters: dict[str, Any] | None = None,
        error_threshold: int = -1,
    ) -> Batch:
        return await self._send(calls.create_batch(rows, input_file, parameters, error_threshold))  # type: ignore[no-any-return]

    async def get_batch(self, batch_id: str) -> Batch:
        return await self._send(Call("GET", f"/v1/batches/{batch_id}"))  # type: ignore[no-any-return]

    async def cancel_batch(self, batch_id: str) -> Batch:
        return await self._send(Call("POST", f"/v1/batches/{batch_id}/cancel"))  # type: ignore[no-any-return]
