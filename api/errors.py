"""Errors as values: `{"error": {"code", "message", "param"?}}` with the right status, never a traceback.

Domain code raises `shared.errors.Problem`; this module only turns failures into HTTP answers.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.errors import Code, Problem, unavailable
from shared.storage import StorageError

log = logging.getLogger(__name__)

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


def problem_response(p: Problem) -> JSONResponse:
    return error_response(p.status, p.code, p.message, p.param, p.headers, p.extra)


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
    async def _problem(_: Request, exc: Problem) -> JSONResponse:
        return problem_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(list(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, Code.http_error)
        return error_response(exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(redis.RedisError)
    async def _redis(_: Request, exc: redis.RedisError) -> JSONResponse:
        log.warning("redis unavailable: %s", exc)
        return problem_response(unavailable(Code.service_unavailable, "the job store"))

    @app.exception_handler(StorageError)
    async def _storage(_: Request, exc: StorageError) -> JSONResponse:
        log.warning("storage unavailable: %s", exc)
        return problem_response(unavailable(Code.storage_unavailable, "object storage"))
