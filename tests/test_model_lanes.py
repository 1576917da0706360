"""One fleet, several models: each model's jobs wait in its own lane, which only its workers serve, with
the fair queue and the two priorities holding inside each lane (against a real redis-server)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from shared import catalog, keys
from shared.config import Settings
from shared.db import connect
from shared.errors import Problem
from shared.jobs.leases import Leases
from shared.jobs.record import new_job_id
from shared.jobs.routing import route
from shared.jobs.store import JobStore
from shared.queue import lane_queue
from shared.schemas import JobInput
from tests.conftest import isolated

LANES_DB = 16
MODELS = "tiny-random,tiny-random-sdxl,tiny-random-flux"


@pytest.fixture()
def fleet(settings: Settings) -> Iterator[tuple[Settings, JobStore]]:
    s = isolated(settings, LANES_DB).model_copy(update={"models": MODELS})
    store = JobStore(connect(s.redis_url), ttl_s=60)
    yield s, store
    store.r.flushdb()


def _submit(store: JobStore, s: Settings, tenant: str, model: str | None, priority: str = "interactive") -> str:
    """A job recorded as `submit_job` records it, with its turn in its model's queue."""
    routed = route(JobInput(prompt="p", model=model, priority=priority), s)  # type: ignore[arg-type]
    job_id = new_job_id()
    turn = f"turn-{job_id}"
    store.create(job_id, tenant, routed.params, "i", "m", "k", turn=turn, lane=routed.lane,
                 model_name=routed.model.name)  # fmt: skip
    return job_id


def _lane(s: Settings, name: str) -> str:
    return catalog.lane(catalog.resolve(name, s), s)


def test_a_job_is_only_ever_offered_to_workers_of_its_model(fleet: tuple[Settings, JobStore]) -> None:
    s, store = fleet
    default = _submit(store, s, "t", None)
    sdxl = _submit(store, s, "t", "inpaint/tiny-random-sdxl")
    flux = _submit(store, s, "t", "tiny-random-flux")
    assert _lane(s, "tiny-random") == ""  # the default model keeps the single-model names (queue `inpaint`)
    offered = {}
    for name in ("tiny-random", "tiny-random-sdxl", "tiny-random-flux"):
        lane = _lane(s, name)
        leases = Leases(store.r, 60, 3, lane)
        offered[name] = leases.next_job()
        # Its turn went to its model's queue, and only there.
        assert store.r.llen(keys.broker_list(lane_queue(lane))) == 1
    assert offered == {"tiny-random": default, "tiny-random-sdxl": sdxl, "tiny-random-flux": flux}
    assert store.get(sdxl).model_name == "tiny-random-sdxl" and store.get(sdxl).lane == "tiny-random-sdxl"

    # A claimed job whose worker vanished is rescued only by a worker of its model.
    sdxl_leases = Leases(store.r, 60, 3, _lane(s, "tiny-random-sdxl"))
    rec = store.get(sdxl)
    assert sdxl_leases.claim(rec, "w/1", lease_s=-1).outcome == "claimed"  # a lease that lapsed at once
    assert Leases(store.r, 60, 3, "").next_job() == default
    assert sdxl_leases.next_job() == sdxl


def test_fairness_and_priority_hold_inside_each_model(fleet: tuple[Settings, JobStore]) -> None:
    s, store = fleet
    # Tenant "heavy" queues 6 SDXL jobs, then "light" one; a bulk SDXL job and the default model's
    # backlog are queued too: neither changes the SDXL order.
    heavy = [_submit(store, s, "heavy", "tiny-random-sdxl") for _ in range(6)]
    bulk = _submit(store, s, "light", "tiny-random-sdxl", priority="bulk")
    for _ in range(5):
        _submit(store, s, "light", None)
    light = _submit(store, s, "light", "tiny-random-sdxl")
    leases = Leases(store.r, 60, 3, _lane(s, "tiny-random-sdxl"))
    order = []
    while (job_id := leases.next_job()) is not None:
        order.append(job_id)
        assert leases.claim(store.get(job_id), f"w/{len(order)}", lease_s=600).outcome == "claimed"
    # light's single interactive job starts second, not behind heavy's five others; bulk runs last.
    assert order[:2] == [heavy[0], light]
    assert order[2:7] == heavy[1:] and order[7] == bulk
    assert len(order) == 8  # none of the default model's jobs


def test_a_model_that_is_not_served_is_a_422_that_lists_the_served_ones(fleet: tuple[Settings, JobStore]) -> None:
    s, _ = fleet
    with pytest.raises(Problem) as err:
        route(JobInput(prompt="p", model="sdxl-inpainting"), s)  # in the catalog, not in this deployment
    assert err.value.status == 422 and err.value.code == "model_not_served"
    assert all(ref in err.value.message for ref in ("inpaint/tiny-random-sdxl", "inpaint/tiny-random-flux"))
    # A field the model has no use for, and steps past its limit, are named.
    with pytest.raises(Problem) as err:
        route(JobInput(prompt="p", model="tiny-random-flux", negative_prompt="blurry"), s)
    assert err.value.code == "unsupported_field" and err.value.param == "negative_prompt"
    flux = route(JobInput(prompt="p", model="tiny-random-flux"), s)
    assert flux.params.guidance_scale == 30.0  # FLUX Fill's own default, not SD's 7.5
    assert route(JobInput(prompt="p", model="tiny-random-flux", guidance_scale=3.5), s).params.guidance_scale == 3.5


def test_inpaint_up_starts_one_worker_per_model_and_a_worker_outside_the_list_refuses(settings: Settings) -> None:
    from stack.up import worker_plan

    assert worker_plan(Settings(model="tiny-random")) == [("worker", "tiny-random")]  # unchanged by default
    assert worker_plan(Settings(models=MODELS)) == [
        ("worker", "tiny-random"), ("worker-tiny-random-sdxl", "tiny-random-sdxl"),
        ("worker-tiny-random-flux", "tiny-random-flux"),
    ]  # fmt: skip
    assert catalog.check_worker(Settings(models=MODELS, model="tiny-random-flux")).name == "tiny-random-flux"
    with pytest.raises(catalog.UnknownModel, match="not one of INPAINT_MODELS"):
        catalog.check_worker(Settings(models="tiny-random", model="tiny-random-sdxl"))
    # The real command says so in one line, before any child is forked.
    import subprocess
    import sys

    from tests.conftest import ROOT, settings_env

    env = {**settings_env(settings), "INPAINT_MODELS": "tiny-random", "INPAINT_MODEL": "tiny-random-sdxl"}
    done = subprocess.run([sys.executable, "-m", "stack.cli", "worker"], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode != 0 and "not one of INPAINT_MODELS" in done.stderr, done.stderr[-2000:]


def test_a_deployment_that_names_no_real_model_or_an_unaccepted_licence_is_refused_at_start() -> None:
    from api.app import create_app

    with pytest.raises(catalog.UnknownModel, match="sdxl-inpaintng"):  # a typo would queue jobs nobody serves
        create_app(Settings(models="sd2-inpainting,sdxl-inpaintng"))
    with pytest.raises(catalog.UnknownModel, match="INPAINT_ACCEPT_LICENSES"):
        catalog.check_deployment(Settings(models="sd2-inpainting,flux-fill"))
    accepted = Settings(models="sd2-inpainting,flux-fill", accept_licenses="black-forest-labs/FLUX.1-Fill-dev")
    assert [m.name for m in catalog.check_deployment(accepted)] == ["sd2-inpainting", "flux-fill"]
    # Without INPAINT_MODELS, `auto`'s classical fallback is the default model, in the one lane.
    alone = Settings(model="auto")
    assert catalog.resolve("inpaint/classical", alone) == catalog.MODELS["sd2-inpainting"]
    assert catalog.lane(catalog.MODELS["classical"], alone) == ""
