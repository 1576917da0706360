"""The `sim` model: a pipeline call that holds its worker for a fixed time whatever its rows, reports
its steps through the real hook, and answers the input (what the fleet benchmark runs on)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from shared.config import Settings
from workers.inpaint.request import InpaintRequest
from workers.inpaint.run import run_batch
from workers.models.loading import load_pipeline, prepare_for_serving


def request(seed: int, steps: int = 4, outputs: int = 1) -> InpaintRequest:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8), "RGB")
    mask = Image.new("L", (64, 48), 0)
    return InpaintRequest(image=image, mask=mask, prompt="x", num_inference_steps=steps, seed=seed,
                          num_outputs=outputs, preserve_unmasked=False)  # fmt: skip


@pytest.fixture
def sim(settings: Settings):  # type: ignore[no-untyped-def]
    loaded = load_pipeline(settings.model_copy(update={"model": "sim", "sim_call_ms": 400, "device": "cpu"}))
    prepare_for_serving(loaded, settings.model_copy(update={"model": "sim", "batch_max_size": 8}))
    return loaded


def test_a_micro_batch_costs_one_call_whatever_its_rows(sim) -> None:  # type: ignore[no-untyped-def]
    assert (sim.kind, sim.plan.max_rows) == ("sim", 8)
    steps: list[tuple[int, int]] = []
    reqs = [request(i, outputs=2) for i in range(4)]
    started = time.perf_counter()
    results = run_batch(sim, reqs, lambda step, total: steps.append((step, total)) or [False] * len(reqs))
    took = time.perf_counter() - started
    assert 0.4 <= took < 0.8, took  # one call's time for 8 rows, not 8 calls
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]
    for req, res in zip(reqs, results, strict=True):
        assert not isinstance(res, BaseException)
        assert len(res.images) == 2
        assert all(np.array_equal(np.asarray(im), np.asarray(req.image)) for im in res.images)


def test_a_canceled_micro_batch_stops_at_the_next_step(sim) -> None:  # type: ignore[no-untyped-def]
    reqs = [request(0, steps=8), request(1, steps=8)]
    started = time.perf_counter()
    results = run_batch(sim, reqs, lambda step, total: [step >= 2] * 2)
    assert time.perf_counter() - started < 0.3
    assert all(type(r).__name__ == "Canceled" for r in results)
