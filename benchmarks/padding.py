"""Partial micro-batches as the service runs them (`gpu_throughput.py --mix`): what padding to a
compiled bucket costs when the queue does not fill the batch."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from workers.models.loading import LoadedPipeline


def mix(loaded: LoadedPipeline, size: int, steps: int, counts: list[int], window: float) -> dict[str, Any]:
    """Partial batches as the service runs them: `n` queued jobs with the service's defaults (unmasked
    pixels composited back), drained; each micro-batch runs at its padded bucket."""
    from benchmarks.gpu_throughput import drain, make_request

    plan, out = loaded.plan, {}
    for n in counts:
        reqs = [replace(make_request(i, size, steps, seed=i), preserve_unmasked=True) for i in range(n)]
        got = drain(loaded, reqs, plan.max_rows, window)
        out[str(n)] = {
            "wall_s": got["wall_s"], "images_per_s": got["images_per_s"], "batch_sizes": got["batch_sizes"],
            "padded_rows": [plan.padded_rows(b, size, size, 7.5) for b in got["batch_sizes"]],
            "errors": sum(isinstance(r, BaseException) for r in got["results"].values()),
        }  # fmt: skip
    return out


def warm_buckets_for(spec: str, rows: int) -> list[int] | None:
    """The buckets to warm: the benchmark's {1, rows} (""), the worker's own ("worker"), or a list."""
    if spec == "worker":
        return None  # prepare's own: every power of two up to the batch, as a worker warms
    if spec:
        return sorted({int(b) for b in spec.split(",")})
    return sorted({1, rows})
