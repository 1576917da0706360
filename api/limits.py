"""Request body limits, per route, enforced while the body streams in, before it is all buffered.

The routes that take images or files take up to `INPAINT_MAX_UPLOAD_BYTES`; every other route takes small
JSON at most (`SMALL_BODY_BYTES`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class _TooLarge(Exception):
    pass


def _payload(limit: int) -> bytes:
    msg = f"the request body is larger than {limit} bytes"
    return json.dumps({"error": {"code": "payload_too_large", "message": msg}}).encode()


SMALL_BODY_BYTES = 64 * 1024
LARGE_BODY_ROUTES = frozenset(
    {
        ("POST", "/v1/jobs"),
        ("POST", "/score"),
        ("POST", "/v1/batches"),
        ("POST", "/v1/images/edits"),
        ("POST", "/v1/files"),
        ("POST", "/v1/predictions"),
    }
)
# Routes with a parameter in their path that take images too (Replicate's model predictions).
LARGE_BODY_PATTERNS = (re.compile(r"/v1/models/[^/]+/[^/]+/predictions"),)


class BodySizeLimit:
    """413 as soon as Content-Length or the bytes received pass the route's limit."""

    def __init__(self, app: ASGIApp, limit: int, routes: Mapping[tuple[str, str], int] | None = None):
        """`routes`: (method, path) → a limit of its own (LoRA uploads take more than images)."""
        self.app, self.large, self.routes = app, limit, dict(routes or {})

    def limit_for(self, scope: Scope) -> int:
        method, path = scope.get("method", ""), scope.get("path", "").rstrip("/")
        if (method, path) in self.routes:
            return self.routes[(method, path)]
        if (method, path) in LARGE_BODY_ROUTES:
            return self.large
        if method == "POST" and any(p.fullmatch(path) for p in LARGE_BODY_PATTERNS):
            return self.large
        return SMALL_BODY_BYTES

    async def _reject(self, send: Send, limit: int) -> None:
        body = _payload(limit)
        await send({"type": "http.response.start", "status": 413, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close"),
        ]})  # fmt: skip
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > limit
                except ValueError:
                    too_big = False
                if too_big:
                    await self._reject(send, limit)
                    return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._reject(send, limit)
