"""One trace per job across every hop: the API, the worker and the webhooks worker run as real
processes with OTEL_EXPORTER_OTLP_ENDPOINT pointing at an OTLP/HTTP collector in this test, and the
spans they export must form one tree from `POST /v1/jobs` to the webhook's HTTP request."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from shared.config import Settings
from shared.services import build_services
from stack.services import free_port, wait_port
from tests.conftest import Receiver, WorkerProcess, auth, job_body

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int


class Collector(Receiver):
    """An OTLP/HTTP traces receiver on loopback: the suite's Receiver, its bodies decoded as spans (a
    200 with no body is an empty ExportTraceServiceResponse)."""

    def of_trace(self, trace_id: str) -> list[Span]:
        spans = []
        for posted in self.at("/v1/traces"):
            req = ExportTraceServiceRequest()
            req.ParseFromString(posted["body"])
            for rs in req.resource_spans:
                service = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "")
                for ss in rs.scope_spans:
                    spans += [Span(service, s.name, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(), s.kind)
                              for s in ss.spans if s.trace_id.hex() == trace_id]  # fmt: skip
        return spans


@dataclass(frozen=True)
class Traced:
    base: str
    collector: Collector
    receiver: Receiver
    api_log: Path


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory, settings: Settings) -> Iterator[Traced]:
    tmp = tmp_path_factory.mktemp("tracing")
    collector, receiver = Collector(), Receiver()
    # A Redis database of its own: the suite's workers (database 0) never take this module's jobs.
    s = settings.model_copy(update={"redis_url": settings.redis_url.rsplit("/", 1)[0] + "/6",
                                    "worker_metrics_port": free_port(), "webhooks_metrics_port": free_port()})  # fmt: skip
    redis.Redis.from_url(s.redis_url).flushdb()
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.url(""), "OTEL_BSP_SCHEDULE_DELAY": "100", "OMP_NUM_THREADS": "1"}
    port = free_port()
    procs = [
        WorkerProcess(s, tmp / "worker.log", "worker", env=env).start(),
        WorkerProcess(s, tmp / "webhooks.log", "webhooks", env=env).start(),
        WorkerProcess(s, tmp / "api.log", "api", "--host", "127.0.0.1", "--port", str(port), env=env).start(),
    ]
    try:
        procs[0].wait_ready(build_services(s))
        wait_port(port, 60, procs[2].proc)
        yield Traced(f"http://127.0.0.1:{port}", collector, receiver, tmp / "api.log")
    finally:
        for p in procs:
            p.stop(20)
        receiver.server.shutdown()
        collector.server.shutdown()


def ancestors(span: Span, by_id: dict[str, Span]) -> list[Span]:
    chain = []
    while span.parent_id in by_id:
        span = by_id[span.parent_id]
        chain.append(span)
    return chain


def test_one_trace_from_submit_through_worker_to_webhook(traced: Traced) -> None:
    base, collector, receiver = traced.base, traced.collector, traced.receiver
    body = job_body(64, 64, seed=3, num_inference_steps=3, webhook=receiver.url("/traced"))
    r = httpx.post(f"{base}/v1/jobs", headers={**auth(), "X-Request-Id": "req-trace-1"}, json=body, timeout=30)
    assert r.status_code == 202, r.text
    assert r.headers["x-request-id"] == "req-trace-1"  # the caller's id comes back
    hook = receiver.wait("/traced", 1, timeout=120)[0]
    trace_id = hook["headers"]["traceparent"].split("-")[1]  # the webhook request carries the job's trace

    want = {("inpaint-api", "POST /v1/jobs"), ("inpaint-api", "S3.PutObject"), ("inpaint-api", "EVALSHA"), ("inpaint-worker", "inpaint.job"), ("inpaint-worker", "inpaint.pipeline"),
            ("inpaint-worker", "S3.PutObject"), ("inpaint-webhooks", "webhook.deliver"), ("inpaint-webhooks", "POST")}  # fmt: skip
    deadline = time.monotonic() + 30
    while not want <= {(s.service, s.name) for s in collector.of_trace(trace_id)} and time.monotonic() < deadline:
        time.sleep(0.2)
    spans = collector.of_trace(trace_id)
    assert want <= {(s.service, s.name) for s in spans}, sorted({(s.service, s.name) for s in spans})

    by_id = {s.span_id: s for s in spans}
    root = next(s for s in spans if s.name == "POST /v1/jobs" and s.service == "inpaint-api")
    assert root.parent_id == ""  # the trace starts where the client's request arrived
    job = next(s for s in spans if s.name == "inpaint.job")
    assert root in ancestors(job, by_id)  # the worker's span hangs under the submit, across Redis
    for name in ("inpaint.pipeline", "S3.PutObject"):
        assert job in ancestors(next(s for s in spans if s.name == name and s.service == "inpaint-worker"), by_id)
    deliver = next(s for s in spans if s.name == "webhook.deliver")
    assert root in ancestors(deliver, by_id)
    post = next(s for s in spans if s.service == "inpaint-webhooks" and s.name == "POST")
    assert by_id[post.parent_id] is deliver
    assert hook["headers"]["traceparent"].split("-")[2] == post.span_id  # the receiver can join the trace
    for s in spans:
        if s.service == "inpaint-api" and s.name in ("S3.PutObject", "EVALSHA"):
            assert root in ancestors(s, by_id)  # the inputs' puts and the record's Lua step, in the submit


def test_request_metrics_ids_and_access_log_on_every_answer(traced: Traced) -> None:
    base = traced.base
    r = httpx.get(f"{base}/v1/jobs/job_doesnotexist", headers=auth(), timeout=10)
    assert r.status_code == 404 and len(r.headers["x-request-id"]) == 32  # made up when the caller sent none
    assert httpx.get(f"{base}/v1/jobs/x", timeout=10).status_code == 401  # the gate's answers are counted too
    bad = httpx.get(f"{base}/healthz", headers={"X-Request-Id": "no spaces allowed"}, timeout=10)
    assert bad.headers["x-request-id"] != "no spaces allowed"
    text = httpx.get(f"{base}/metrics", timeout=10).text
    # one series per route template, whatever the ids; the gate answers before routing: "unmatched"
    assert 'inpaint_http_requests_total{method="GET",route="/v1/jobs/{job_id}",status="404"} 1.0' in text
    assert 'inpaint_http_requests_total{method="GET",route="unmatched",status="401"} 1.0' in text
    assert 'inpaint_http_request_duration_seconds_count{method="POST",route="/v1/jobs",status="202"} 1.0' in text
    access = [ln for ln in traced.api_log.read_text(errors="replace").splitlines() if "inpaint.access" in ln]
    assert any("GET /v1/jobs/job_doesnotexist 404" in ln and f"id={r.headers['x-request-id']}" in ln for ln in access)
    assert any("POST /v1/jobs 202" in ln and "id=req-trace-1" in ln for ln in access), access
