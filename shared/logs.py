"""Logs: plain text for a terminal, one JSON object per line in production (`INPAINT_LOG_FORMAT=json`),
each line carrying the id of the job it is about (`job_context`), so a job's story is one query."""

from __future__ import annotations

import contextvars
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import trace

_job: contextvars.ContextVar[str | None] = contextvars.ContextVar("job_id", default=None)
_request: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


@contextmanager
def job_context(job_id: str) -> Iterator[None]:
    """Every log line inside this block (this thread or task) names `job_id`."""
    token = _job.set(job_id)
    try:
        yield
    finally:
        _job.reset(token)


@contextmanager
def request_context(request_id: str) -> Iterator[None]:
    """Every log line inside this block names the API request it serves (`X-Request-Id`)."""
    token = _request.set(request_id)
    try:
        yield
    finally:
        _request.reset(token)


class JobIdFilter(logging.Filter):
    """Stamps each line with its job, its request and, when tracing is on, its trace."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.job_id = _job.get()
        record.request_id = _request.get()
        span = trace.get_current_span().get_span_context()
        record.trace_id = format(span.trace_id, "032x") if span.is_valid else None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "job_id": getattr(record, "job_id", None),
            "request_id": getattr(record, "request_id", None),
            "trace_id": getattr(record, "trace_id", None),
            "pid": record.process,
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def configure_logging(fmt: str = "text", level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(JobIdFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("httpx", "httpcore"):  # a line per HTTP request: noise in a worker, and in the CLI's output
        logging.getLogger(noisy).setLevel(logging.WARNING)
