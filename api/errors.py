"""Errors as values: `{"error": {"code", "message", "param"?}}` with the right status, never a traceback.

Domain code raises `shared.errors.Problem`; this module only turns failures into HTTP answers.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.errors import Code, Problem, unavailable
from shared.storage import StorageError

log = logging.getLogger(__name__)

# Replicate's API answers errors as RFC 9457 problem documents (`detail`, `status`, `title`), which its
# clients read into `ReplicateError`: on its routes an error is that document, our `error` object in it.
REPLICATE_PREFIXES = ("/v1/predictions", "/v1/models", "/v1/files")
_HTTP_CODES = {404: Code.not_found, 405: Code.method_not_allowed, 401: Code.unauthorized, 413: Code.payload_too_large}


def error_response(
    status: int,
    code: str,
    message: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> JSONResponse:
    err: dict[str, Any] = {"code": str(code), "message": message}
    if param:
        err["param"] = param
    return JSONResponse({"error": err, **(extra or {})}, status_code=status, headers=headers)


def problem_response(p: Problem, request: Request | None = None) -> JSONResponse:
    answer = error_response(p.status, p.code, p.message, p.param, p.headers, p.extra)
    return _as_problem_document(answer, request)


def _as_problem_document(answer: JSONResponse, request: Request | None) -> JSONResponse:
    """On Replicate's routes, the same error as a problem document (`title`, `status`, `detail`)."""
    if request is None or not request.url.path.startswith(REPLICATE_PREFIXES):
        return answer
    body = json.loads(bytes(answer.body))
    err = body.get("error", {})
    try:
        title = HTTPStatus(answer.status_code).phrase
    except ValueError:
        title = "Error"
    doc = {"type": "about:blank", "title": title, "status": answer.status_code, "detail": err.get("message", title),
           **body}  # fmt: skip
    headers = {k: v for k, v in answer.headers.items() if k.lower() not in ("content-length", "content-type")}
    return JSONResponse(doc, status_code=answer.status_code, headers=headers, media_type="application/problem+json")


def _loc(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts)


def validation_error(errors: list[Any]) -> JSONResponse:
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    param = _loc(tuple(first.get("loc", ())))
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return error_response(422, Code.validation_error, f"{param}: {msg}" if param else msg, param or None)


def install(app: FastAPI) -> None:
    """Register the handlers that turn every failure into the contract's error body."""

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(exc, request)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _as_problem_document(validation_error(list(exc.errors())), request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, Code.http_error)
        answer = error_response(exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None))
        return _as_problem_document(answer, request)

    @app.exception_handler(redis.RedisError)
    async def _redis(request: Request, exc: redis.RedisError) -> JSONResponse:
        log.warning("redis unavailable: %s", exc)
        return problem_response(unavailable(Code.service_unavailable, "the job store"), request)

    @app.exception_handler(StorageError)
    async def _storage(request: Request, exc: StorageError) -> JSONResponse:
        log.warning("storage unavailable: %s", exc)
        return problem_response(unavailable(Code.storage_unavailable, "object storage"), request)


def error_responses(described: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """A route's error answers for the OpenAPI description: each status with its meaning, all `ErrorBody`."""
    body = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    return {status: {"description": text, "content": body} for status, text in described.items()}
