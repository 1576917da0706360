"""A small Python client for the inpaint API (httpx only; imports nothing of the server)."""

from __future__ import annotations

import base64
import io
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

TERMINAL = ("succeeded", "failed", "canceled")
ImageLike = str | os.PathLike[str] | bytes | Any  # a path, raw bytes, or a PIL image


class InpaintError(Exception):
    """An error answered by the API: HTTP status, stable code and message."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.status, self.code, self.message = status, code, message


def _to_bytes(img: ImageLike) -> bytes:
    if isinstance(img, bytes):
        return img
    if isinstance(img, (str, os.PathLike)):
        return Path(img).read_bytes()
    buf = io.BytesIO()
    img.save(buf, format="PNG")  # a PIL image
    return buf.getvalue()


class InpaintClient:
    """Submit, poll, cancel and download jobs."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, timeout: float = 60.0):
        base_url = base_url or os.environ.get("INPAINT_URL", "http://127.0.0.1:8000")
        api_key = api_key or os.environ.get("INPAINT_API_KEY")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> InpaintClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        resp = self._http.request(method, path, **kw)
        if resp.status_code >= 400:
            try:
                err = resp.json()["error"]
                raise InpaintError(resp.status_code, err["code"], err["message"])
            except (ValueError, KeyError, TypeError):
                raise InpaintError(resp.status_code, "http_error", resp.text[:200]) from None
        return resp.json()

    def submit(
        self, image: ImageLike, mask: ImageLike, prompt: str, idempotency_key: str | None = None, **params: Any
    ) -> dict[str, Any]:
        """Submit a job; `params` are the optional fields of `POST /v1/jobs`."""
        body = {
            "prompt": prompt,
            "image": base64.b64encode(_to_bytes(image)).decode(),
            "mask": base64.b64encode(_to_bytes(mask)).decode(),
            **params,
        }
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._call("POST", "/v1/jobs", json=body, headers=headers)  # type: ignore[no-any-return]

    def get(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/jobs/{job_id}")  # type: ignore[no-any-return]

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/jobs/{job_id}/cancel")  # type: ignore[no-any-return]

    def list(self, status: str | None = None, limit: int = 20, cursor: str | None = None) -> dict[str, Any]:
        params = {k: v for k, v in {"status": status, "limit": limit, "cursor": cursor}.items() if v is not None}
        return self._call("GET", "/v1/jobs", params=params)  # type: ignore[no-any-return]

    def wait(
        self,
        job_id: str,
        timeout: float | None = None,
        on_update: Callable[[dict[str, Any]], None] | None = None,
        poll_s: float = 0.2,
        max_poll_s: float = 2.0,
    ) -> dict[str, Any]:
        """Poll with backoff until the job ends (or `timeout` passes: TimeoutError)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = poll_s
        while True:
            job = self.get(job_id)
            if on_update:
                on_update(job)
            if job["status"] in TERMINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout}s")
            time.sleep(delay)
            delay = min(max_poll_s, delay * 1.5)

    def download(self, url: str) -> bytes:
        """The bytes behind an output's presigned URL."""
        resp = httpx.get(url, timeout=60)
        resp.raise_for_status()
        return resp.content
