"""Several models on one fleet, end to end: real worker processes each pinned to one tiny architecture
(SD2-shaped, SDXL, FLUX Fill), real Redis and S3, the API in process."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from shared.config import Settings
from shared.services import Services, build_services
from tests.conftest import WorkerProcess, auth, isolated, job_body, wait_for

FLEET_DB = 17
MODELS = "tiny-random,tiny-random-sdxl,tiny-random-flux"


class Fleet:
    def __init__(self, settings: Settings, tmp: Path):
        self.settings, self.tmp = settings, tmp
        self.svc: Services = build_services(settings)
        self.workers: dict[str, WorkerProcess] = {}

    def start(self, model: str) -> WorkerProcess:
        proc = WorkerProcess(self.settings, self.tmp / f"worker-{model}.log", env={"INPAINT_MODEL": model}).start()
        self.workers[model] = proc
        deadline = time.monotonic() + 180
        while not any(w.get("model") == model for w in self.svc.registry.ready()):
            assert proc.proc is not None and proc.proc.poll() is None, proc.log_tail()
            assert time.monotonic() < deadline, proc.log_tail()
            time.sleep(0.2)
        return proc

    def names_of(self, model: str) -> set[str]:
        return {w["name"] for w in self.svc.registry.ready() if w.get("model") == model}


@pytest.fixture(scope="module")
def fleet(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Fleet, TestClient]]:
    from api.app import create_app

    s = isolated(settings, FLEET_DB).model_copy(update={"models": MODELS})
    f = Fleet(s, tmp_path_factory.mktemp("fleet"))
    f.start("tiny-random")
    f.start("tiny-random-sdxl")
    try:
        with TestClient(create_app(s)) as client:
            yield f, client
    finally:
        for w in f.workers.values():
            w.stop()
        f.svc.r.flushdb()


def _submit(client: TestClient, **params: Any) -> str:
    r = client.post("/v1/jobs", headers=auth(), json=job_body(**params))
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def _models(client: TestClient) -> dict[str, dict[str, Any]]:
    r = client.get("/v1/models", headers=auth())
    assert r.status_code == 200, r.text
    return {m["short_name"]: m for m in r.json()["results"]}


def test_each_job_runs_only_on_a_worker_of_its_model(fleet: tuple[Fleet, TestClient]) -> None:
    f, client = fleet
    asked = {
        _submit(client, seed=1): "tiny-random",  # no model: the deployment's default
        _submit(client, seed=2, model="inpaint/tiny-random"): "tiny-random",
        _submit(client, seed=3, model="tiny-random-sdxl"): "tiny-random-sdxl",
        _submit(client, seed=4, model="inpaint/tiny-random-sdxl"): "tiny-random-sdxl",
    }
    for job_id, model in asked.items():
        job = wait_for(client, job_id, timeout=120)
        assert job["status"] == "succeeded", job
        assert job["model"]["name"] == model and job["model_id"] == f"inpaint/{model}"
        assert job["outputs"][0]["width"] == 64 and job["outputs"][0]["height"] == 48
        # The job records which worker ran it (its lease owner): one of its own model's.
        worker = f.svc.jobs.get(job_id).owner.split("/")[0]
        assert worker in f.names_of(model), (worker, model)


def test_a_model_without_a_ready_worker_queues_says_so_and_runs_when_one_starts(
    fleet: tuple[Fleet, TestClient],
) -> None:
    f, client = fleet
    job_id = _submit(client, model="tiny-random-flux")
    job = client.get(f"/v1/jobs/{job_id}", headers=auth()).json()
    assert job["status"] == "queued" and job["waiting_for"] == "worker"
    assert job["model_id"] == "inpaint/tiny-random-flux"
    models = _models(client)
    assert list(models) == ["tiny-random", "tiny-random-sdxl", "tiny-random-flux"]  # the default first
    assert [models[m]["ready_workers"] for m in models] == [1, 1, 0]
    assert models["tiny-random-flux"]["queue_depth"] == 1
    assert models["tiny-random-flux"]["input_limits"]["ignored_fields"] == ["negative_prompt"]
    time.sleep(2)
    assert client.get(f"/v1/jobs/{job_id}", headers=auth()).json()["status"] == "queued"  # nobody else took it

    f.start("tiny-random-flux")
    job = wait_for(client, job_id, timeout=120)
    assert job["status"] == "succeeded" and job["model"]["name"] == "tiny-random-flux", job
    assert job["waiting_for"] is None
    f.workers.pop("tiny-random-flux").stop()


def test_a_model_outside_the_deployment_and_a_field_its_model_ignores_are_422(
    fleet: tuple[Fleet, TestClient],
) -> None:
    _, client = fleet
    r = client.post("/v1/jobs", headers=auth(), json=job_body(model="black-forest-labs/FLUX.1-Fill-dev"))
    assert r.status_code == 422 and r.json()["error"]["code"] == "model_not_served"
    assert "inpaint/tiny-random-sdxl" in r.json()["error"]["message"]  # it lists what is served
    r = client.post("/v1/jobs", headers=auth(), json=job_body(model="tiny-random-flux", negative_prompt="blur"))
    assert r.status_code == 422 and r.json()["error"]["code"] == "unsupported_field"


def test_losing_one_models_only_worker_leaves_the_other_model_alone(fleet: tuple[Fleet, TestClient]) -> None:
    f, client = fleet
    f.workers.pop("tiny-random-sdxl").stop()
    sdxl = _submit(client, model="tiny-random-sdxl")
    default = [_submit(client, seed=i) for i in range(3)]
    for job_id in default:
        assert wait_for(client, job_id, timeout=120)["status"] == "succeeded"
    job = client.get(f"/v1/jobs/{sdxl}", headers=auth()).json()
    assert job["status"] == "queued" and job["waiting_for"] == "worker"
    assert _models(client)["tiny-random-sdxl"]["ready_workers"] == 0
