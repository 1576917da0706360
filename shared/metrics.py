"""Prometheus metrics (prometheus-client).

Two kinds, on purpose. Counts that describe the whole service (jobs submitted, jobs finished by
status and error code, webhook deliveries by outcome) are kept in one Redis hash, incremented where
the event happens, and read by `ClusterCollector` on every API replica's `/metrics`: any replica
reports the same totals, and no count is lost when a worker process is replaced. Queue depth and
the oldest waiting job's age are read from Redis at scrape time. What one process observes (its
pipeline calls, batch sizes, images, GPU memory, webhook attempts) is a histogram or counter in that
process, served by the worker on `INPAINT_WORKER_METRICS_PORT` and by the webhooks worker on
`INPAINT_WEBHOOKS_METRICS_PORT`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from shared import keys
from shared.queue import IO_QUEUE, lane_queue

log = logging.getLogger(__name__)

# In the inference worker process
INFERENCE_SECONDS = Histogram(
    "inpaint_worker_inference_seconds", "Seconds per pipeline call (one batch)",
    buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128),
)  # fmt: skip
BATCH_SIZE = Histogram(
    "inpaint_worker_batch_size", "Jobs per pipeline call", buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
)
QUEUE_WAIT = Histogram(
    "inpaint_worker_queue_wait_seconds", "Seconds from submit to start",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
)  # fmt: skip
IMAGES = Counter("inpaint_worker_images_total", "Images produced (rate() is images per second)")
JOBS_ENDED = Counter("inpaint_worker_jobs_finished_total", "Jobs this worker ended", ["status", "code"])
GPU_MEMORY = Gauge("inpaint_worker_gpu_memory_bytes", "GPU memory allocated by this worker's PyTorch")

# In the webhooks worker process
WEBHOOK_ATTEMPTS = Counter("inpaint_webhook_attempts_total", "Webhook delivery attempts", ["outcome"])


def count(r: Any, field: str, n: int = 1) -> None:
    """A cluster-wide counter in Redis; never fails its caller (metrics are not worth an error)."""
    try:
        r.hincrby(keys.stats(), field, n)
    except Exception:
        log.debug("stats counter %s not written", field, exc_info=True)


class ClusterCollector(Collector):
    """Service-wide metrics read from Redis at scrape time."""

    def __init__(self, r: Any, lanes: dict[str, str] | None = None):
        self.r = r
        # Each served model's lane (shared.catalog.lane): its waiting jobs, ready workers and queue
        self.lanes = lanes if lanes is not None else {"": ""}
        self.queues = (*(lane_queue(lane) for lane in self.lanes.values()), IO_QUEUE)  # the broker's lists

    def collect(self) -> Iterator[Any]:
        r, now = self.r, time.time()
        try:
            stats: dict[str, str] = r.hgetall(keys.stats())
            per_model: dict[str, tuple[int, float, int]] = {}  # waiting, oldest's age, ready workers
            for model, lane in self.lanes.items():
                oldest = r.zrange(keys.waiting(lane), 0, 0)
                oldest_at = float(r.hget(keys.job(oldest[0]), "created_at") or 0) if oldest else 0.0
                ready_n = int(r.zcount(keys.lane_workers(lane), now, "+inf"))
                per_model[model] = (int(r.zcard(keys.waiting(lane))), now - oldest_at if oldest_at else 0.0, ready_n)
            broker = {q: int(r.llen(q)) for q in self.queues}
            workers = int(r.zcount(keys.workers(), now, "+inf"))
        except Exception:
            log.warning("metrics: Redis unavailable", exc_info=True)
            return
        depth = sum(w for w, _, _ in per_model.values())
        oldest_age = max((a for _, a, _ in per_model.values()), default=0.0)
        submitted = CounterMetricFamily("inpaint_jobs_submitted", "Jobs accepted by the API")
        submitted.add_metric([], float(stats.get("submitted", 0)))
        yield submitted
        finished = CounterMetricFamily(
            "inpaint_jobs_finished", "Jobs ended, by status and error code", labels=["status", "code"]
        )
        hooks = CounterMetricFamily(
            "inpaint_webhook_deliveries", "Webhook delivery attempts by outcome", labels=["outcome"]
        )
        for k, v in sorted(stats.items()):
            kind, _, rest = k.partition(":")
            if kind == "finished":
                status, _, code = rest.partition(":")
                finished.add_metric([status, code], float(v))
            elif kind == "webhook":
                hooks.add_metric([rest], float(v))
        yield finished
        yield hooks
        jobs_waiting = GaugeMetricFamily("inpaint_queue_jobs_waiting", "Jobs queued and not yet started")
        jobs_waiting.add_metric([], depth)
        yield jobs_waiting
        age = GaugeMetricFamily("inpaint_queue_oldest_age_seconds", "Age of the oldest job still waiting (0: none)")
        age.add_metric([], max(0.0, oldest_age))
        yield age
        by_model = {
            name: GaugeMetricFamily(f"inpaint_model_{name}", doc, labels=["model"])
            for name, doc in (
                ("jobs_waiting", "Jobs of each model queued and not yet started"),
                ("oldest_age_seconds", "Age of each model's oldest waiting job (0: none)"),
                ("workers_ready", "Inference workers of each model with its pipeline loaded"),
            )
        }
        for model, (waiting_n, age_s, ready_n) in per_model.items():
            by_model["jobs_waiting"].add_metric([model], waiting_n)
            by_model["oldest_age_seconds"].add_metric([model], max(0.0, age_s))
            by_model["workers_ready"].add_metric([model], ready_n)
        yield from by_model.values()
        messages = GaugeMetricFamily("inpaint_queue_messages", "Messages in each broker queue", labels=["queue"])
        for q, n in broker.items():
            messages.add_metric([q], n)
        yield messages
        ready = GaugeMetricFamily("inpaint_workers_ready", "Inference workers with their pipeline loaded")
        ready.add_metric([], workers)
        yield ready


def serve(port: int, host: str) -> None:
    """This process's own metrics on `port` (0: off); a taken port is a warning, not a crash."""
    if not port:
        return
    from prometheus_client import start_http_server

    try:
        start_http_server(port, addr=host)
    except OSError as exc:
        log.warning("metrics port %s:%d unavailable (%s); this process's metrics are not served", host, port, exc)
