"""Per request: an id (`X-Request-Id`, the caller's if it sent a sane one), one access-log line, and
the HTTP request metrics on `/metrics` (count and latency by method, route template and status).

A pure ASGI middleware, outermost: it sees every answer, the auth gate's 401s and the size limit's
413s included, and leaves streamed responses (event streams) streaming.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid

from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.logs import request_context

log = logging.getLogger("inpaint.access")
_SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

HTTP_REQUESTS = Counter(
    "inpaint_http_requests_total", "HTTP requests answered by the API", ["method", "route", "status"]
)
HTTP_SECONDS = Histogram(
    "inpaint_http_request_duration_seconds", "Seconds from a request's arrival to the end of its answer",
    ["method", "route", "status"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)  # fmt: skip


def route_of(scope: Scope) -> str:
    """The route's template (`/v1/jobs/{job_id}`), never the raw path: one series per route, whatever
    ids callers send. Static files are `/static`; a path no route matched is `unmatched`."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    if str(scope.get("path", "")).startswith("/static/"):
        return "/static"
    return "unmatched"


class AccessLog:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = sent if _SANE_ID.match(sent) else uuid.uuid4().hex
        started = time.perf_counter()
        status = 500  # what the client gets if the app fails before it answers
        answered = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, answered
            if message["type"] == "http.response.start":
                status, answered = int(message["status"]), True
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        with request_context(request_id):
            try:
                await self.app(scope, receive, send_with_id)
            except Exception:
                if answered:
                    raise  # half an answer cannot be mended: the server closes the connection
                # An unexpected error: a problem document the client can quote, the traceback in the log,
                # and an answer that ends normally, so a kept-alive connection stays usable.
                log.exception(
                    "unexpected error answering %s %s id=%s", scope.get("method"), scope.get("path"), request_id
                )
                status = 500
                body = _problem_body(request_id)
                await send_with_id(_problem_start(len(body)))
                await send({"type": "http.response.body", "body": body})
            finally:
                elapsed = time.perf_counter() - started
                method, route = scope.get("method", ""), route_of(scope)
                HTTP_REQUESTS.labels(method, route, str(status)).inc()
                HTTP_SECONDS.labels(method, route, str(status)).observe(elapsed)
                log.info("%s %s %d %.1fms id=%s", method, scope.get("path", ""), status, elapsed * 1000, request_id)


def _problem_body(request_id: str) -> bytes:
    message = f"an unexpected error on our side; quote request id {request_id} when reporting it"
    return json.dumps({"error": {"code": "internal", "message": message, "request_id": request_id}}).encode()


def _problem_start(length: int) -> Message:
    headers = [(b"content-type", b"application/problem+json"), (b"content-length", str(length).encode())]
    return {"type": "http.response.start", "status": 500, "headers": headers}
