"""The key check every route sits behind, done before a single byte of the body is read.

FastAPI reads and parses a route's body before its dependencies run, so a tenant dependency alone
would let anyone without a key make the API buffer and parse a 20 MB body. This ASGI middleware
answers 401 from the headers alone; routes read the tenant it found from `request.state.tenant`.
"""

from __future__ import annotations

import json
import logging

import anyio
import redis
from starlette.types import ASGIApp, Receive, Scope, Send

from shared.auth import Authenticator

log = logging.getLogger(__name__)

# What anyone may read: the page and its assets, the docs, probes and metrics.
PUBLIC_PATHS = frozenset({"/", "/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/favicon.ico"})
PUBLIC_PREFIXES = ("/static/",)


def bearer(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


async def _answer(send: Send, status: int, code: str, message: str, headers: list[tuple[bytes, bytes]]) -> None:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers,
    ]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


class AuthGate:
    def __init__(self, app: ASGIApp, auth: Authenticator):
        self.app, self.auth = app, auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
            await self.app(scope, receive, send)
            return
        key = bearer(scope)
        try:
            # Environment keys need no I/O; a stored key is one Redis read, off the event loop.
            tenant = self.auth.env_tenant(key) if key else None
            if tenant is None and (key or self.auth.is_open):
                tenant = await anyio.to_thread.run_sync(self.auth.tenant_for, key)
        except redis.RedisError as exc:
            log.warning("redis unavailable while checking a key: %s", exc)
            msg = "the job store is unavailable; retry shortly"
            await _answer(send, 503, "service_unavailable", msg, [(b"retry-after", b"5")])
            return
        if tenant is None:
            msg = "a valid API key is required: Authorization: Bearer <key>"
            await _answer(send, 401, "unauthorized", msg, [(b"www-authenticate", b"Bearer")])
            return
        state = scope.setdefault("state", {})
        state["tenant"] = tenant
        state["key_digest"] = self.auth.revocable(key)  # re-checked while a stream or wait is held
        await self.app(scope, receive, send)
