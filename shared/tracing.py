"""OpenTelemetry traces: one trace per job, from `POST /v1/jobs` through the worker to its webhooks.

Off unless `OTEL_EXPORTER_OTLP_ENDPOINT` is set (then OTLP over HTTP, configured by the standard
`OTEL_*` variables: `OTEL_SERVICE_NAME`, `OTEL_TRACES_SAMPLER`, `OTEL_BSP_SCHEDULE_DELAY`, …). Off,
every call here is OpenTelemetry's no-op: nothing is recorded, nothing is sent.

The instrumentations cover each hop's libraries (FastAPI, Celery, Redis, botocore, httpx). A job's
turn is pushed into the queue with its record, not published by Celery, and a webhook attempt runs
long after the job and in another process, so the job carries its own trace context: the record's
`trace` (a W3C `traceparent`, taken where the job is submitted) is the parent of the worker's
`inpaint.job` span and of every `webhook.deliver` span of that job.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry import context, propagate, trace

log = logging.getLogger(__name__)
_tracer = trace.get_tracer("inpaint")
_enabled = False


def setup(service: str, celery: bool = False) -> bool:
    """Export this process's spans if OTEL_EXPORTER_OTLP_ENDPOINT says where; once per process, after
    any fork (a Celery child calls it when it starts). `celery`: also Celery's publish and task spans
    (context carried in each message's headers)."""
    global _enabled
    if _enabled or not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return _enabled
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.botocore import BotocoreInstrumentor
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    from opentelemetry.instrumentation.redis import RedisInstrumentor
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    name = os.environ.get("OTEL_SERVICE_NAME") or f"inpaint-{service}"
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    RedisInstrumentor().instrument()
    BotocoreInstrumentor().instrument()
    HTTPXClientInstrumentor().instrument()
    if celery:
        from opentelemetry.instrumentation.celery import CeleryInstrumentor

        CeleryInstrumentor().instrument()
    _enabled = True
    log.info("tracing on: spans of %s go to %s", name, os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"])
    return True


def instrument_app(app: Any) -> None:
    """A server span per request of the FastAPI `app`."""
    if _enabled:
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        FastAPIInstrumentor.instrument_app(app, excluded_urls="healthz,readyz,metrics")


def flush() -> None:
    """Send what is buffered (before a process exits)."""
    provider = trace.get_tracer_provider()
    if hasattr(provider, "force_flush"):
        provider.force_flush(5000)


def traceparent() -> str:
    """The current context as a W3C `traceparent` ("" when no span is recording)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent", "")


def start(name: str, parent: str = "", **attributes: Any) -> trace.Span:
    """A span that the caller ends, child of `parent` (a `traceparent`), else of the current span."""
    ctx = propagate.extract({"traceparent": parent}) if parent else None
    return _tracer.start_span(name, context=ctx, attributes={k: v for k, v in attributes.items() if v is not None})


@contextmanager
def span(name: str, parent: str = "", **attributes: Any) -> Iterator[trace.Span]:
    """`start` as the current span for the block; ended, with any exception recorded, after it."""
    s = start(name, parent, **attributes)
    token = context.attach(trace.set_span_in_context(s))
    try:
        yield s
    except BaseException as exc:
        s.record_exception(exc)
        s.set_status(trace.Status(trace.StatusCode.ERROR, type(exc).__name__))
        raise
    finally:
        context.detach(token)
        s.end()


def mark_failed(s: trace.Span | None, reason: str) -> None:
    if s is not None:
        s.set_status(trace.Status(trace.StatusCode.ERROR, reason))


@contextmanager
def inside(s: trace.Span | None) -> Iterator[None]:
    """`s` (started elsewhere, not ended here) as the current span for the block."""
    if s is None:
        yield
        return
    with trace.use_span(s, end_on_exit=False):
        yield
