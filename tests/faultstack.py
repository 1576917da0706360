"""A stack of its own for fault tests: Redis, SeaweedFS, inference workers and the I/O worker as
real processes, with fault injection on and short time limits, so tests can kill, restart and
starve them without touching the rest of the suite. Shared by the fault and ending tests."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from fastapi.testclient import TestClient

from shared import keys
from shared.config import Settings
from shared.jobs.view import manifest_key
from shared.services import build_services
from shared.storage import Storage, job_prefix
from stack.services import Redis, SeaweedS3, free_port, wait_s3
from tests.conftest import Receiver, WorkerProcess, auth, job_body

TERMINAL = ("succeeded", "failed", "canceled")


class Stack:
    def __init__(self, root: Path, base: Settings, through: Callable[[int], str] | None = None, **overrides: Any):
        """`through`: every process reaches Redis at the URL it gives for Redis' port (a proxy)."""
        self.root = root
        self.redis = Redis(free_port(), root / "redis", appendonly=True).start()
        if through is not None:
            overrides["redis_url"] = through(self.redis.port)
        self.s3 = SeaweedS3(root / "s3", "faultaccess", "faultsecret-0123456789").start()
        self.settings = base.model_copy(
            update={
                "data_dir": base.data_dir,  # share the saved tiny model
                "redis_url": self.redis.url,
                "s3_endpoint_url": self.s3.endpoint,
                "s3_access_key_id": self.s3.access_key,
                "s3_secret_access_key": self.s3.secret_key,
                "fault_injection": True,
                "job_soft_time_limit_s": 8,
                "job_time_limit_s": 11,
                "broker_visibility_timeout_s": 3,
                "broker_restore_interval_s": 1,
                "worker_heartbeat_s": 0.5,
                "job_max_attempts": 3,
                "max_queued_per_tenant": 5000,
                # Not the session worker's ports: taken first, they would hide its metrics from tests/test_metrics.py.
                "worker_metrics_port": 0,
                "webhooks_metrics_port": 0,
                **overrides,
            }
        )
        wait_s3(Storage(self.settings), 90)
        self.svc = build_services(self.settings)
        self.store, self.storage = self.svc.jobs, self.svc.storage
        self.workers: list[WorkerProcess] = []
        self.hooks = WorkerProcess(self.settings, root / "webhooks.log", "webhooks").start()

    def add_worker(self, name: str) -> WorkerProcess:
        # Two workers share two cores here: one torch thread each, or they fight over both.
        w = WorkerProcess(
            self.settings, self.root / f"worker-{name}.log", "worker", "--name", name, env={"OMP_NUM_THREADS": "1"}
        ).start()
        self.workers.append(w)
        return w

    def wait_workers(self, count: int, timeout: float = 180) -> None:
        """Until `count` worker processes serve: each alive, with a loaded child that is itself alive
        (a child killed a moment ago stays in the registry until its heartbeat runs out)."""
        deadline = time.monotonic() + timeout
        while self.live_children() < count:
            dead = [w.log_path.name for w in self.workers if w.proc is None or w.proc.poll() is not None]
            assert not dead, f"worker processes exited: {dead}"
            assert time.monotonic() < deadline, "\n".join(w.log_tail() for w in self.workers)
            time.sleep(0.2)

    def wait_running(self, *job_ids: str, timeout: float = 60) -> None:
        """Until every one of `job_ids` is running at the same time."""
        deadline = time.monotonic() + timeout
        while any(self.store.r.hget(keys.job(j), "status") != "running" for j in job_ids):
            assert time.monotonic() < deadline
            time.sleep(0.05)

    def live_children(self) -> int:
        alive = 0
        for entry in self.svc.registry.ready():
            try:
                pid = int(entry["name"].rsplit(":", 1)[1])
                alive += psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
            except (ValueError, psutil.NoSuchProcess):
                pass
        return alive

    def stop(self) -> None:
        for w in self.workers:
            w.stop(10)
        self.hooks.stop(10)
        self.s3.stop()
        self.redis.stop()
        self.store.r.close()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, settings: Settings) -> Iterator[Stack]:
    """The fault stack, shared by every module that asks for it (a module may define its own)."""
    s = Stack(tmp_path_factory.mktemp("faults"), settings)
    s.add_worker("a")
    s.add_worker("b")
    s.wait_workers(2)
    yield s
    s.stop()


def submit(api: TestClient, **params: Any) -> str:
    r = api.post("/v1/jobs", headers=auth(), json=job_body(**params))
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def wait_end(
    api: TestClient, job_id: str, timeout: float = 90, every: float = 0.1, meanwhile: Callable[[], None] | None = None
) -> dict[str, Any]:
    """The job once it has ended; `meanwhile` is called at each look before that."""
    deadline = time.monotonic() + timeout
    while True:
        r = api.get(f"/v1/jobs/{job_id}", headers=auth())
        if r.status_code == 200 and r.json()["status"] in TERMINAL:
            return dict(r.json())
        assert time.monotonic() < deadline, r.text
        if meanwhile is not None:
            meanwhile()
        time.sleep(every)


def outputs_in_s3(stack: Stack, job_id: str) -> list[str]:
    return stack.storage.list_keys(job_prefix("alice", job_id) + "outputs/")


def terminal_hooks(receiver: Receiver, path: str) -> list[dict[str, Any]]:
    return [json.loads(h["body"]) for h in receiver.at(path) if json.loads(h["body"])["type"] != "job.started"]


def manifest_of(stack: Stack, job_id: str, timeout: float = 10) -> dict[str, Any]:
    """The job's S3 manifest; written just after its terminal status, so wait for it a moment."""
    deadline = time.monotonic() + timeout
    while (doc := stack.storage.get_json(manifest_key("alice", job_id))) is None:
        assert time.monotonic() < deadline, f"no manifest for {job_id}"
        time.sleep(0.1)
    return doc


def ended_once(stack: Stack, receiver: Receiver, path: str, job_id: str, status: str, code: str | None = None) -> None:
    """The job ended `status` (with error `code`), its manifest says so, and its webhook at `path`
    got exactly one terminal event, of that status."""
    doc = manifest_of(stack, job_id)
    assert doc["status"] == status, doc
    error = json.loads(doc["error"]) if doc.get("error") else None
    assert (error or {}).get("code") == code, doc
    receiver.wait(path, 1)
    # A second terminal delivery could only come from one still scheduled (a retry, a re-claim a lease
    # later): wait until nothing of the job is, rather than for whatever time a duplicate might take.
    deadline = time.monotonic() + 30
    while scheduled := pending_deliveries(stack, job_id):
        assert time.monotonic() < deadline, scheduled
        time.sleep(0.1)
    hooks = [h for h in terminal_hooks(receiver, path) if h["data"]["id"] == job_id]
    assert [h["type"] for h in hooks] == [f"job.{status}"], hooks
    assert hooks[0]["data"]["status"] == status and (hooks[0]["data"]["error"] or {}).get("code") == code


def pending_deliveries(stack: Stack, job_id: str) -> list[str]:
    """The job's webhook deliveries still scheduled (due now or later)."""
    r = stack.store.r
    due = r.zrange(keys.deliveries_due(), 0, -1)
    return [s for s in due if json.loads(r.hget(keys.delivery(s), "job_id") or "null") == job_id]
