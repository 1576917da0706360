"""compose.yaml, brought up for real: both images built, the stack started with docker compose, a job
submitted through the API container, run by a worker container (CPU, tiny-random) and its output
fetched through its presigned URL from the S3 container; then everything torn down.

The test's changes to compose.yaml live in tests/compose/cpu.override.yaml (images this host can make,
no GPU); tests/dockerbed.py makes the engine, the base image and the wheelhouse. It runs where root
can start Docker (CI does): elsewhere it fails loudly, like tests/test_hosts.py, unless
INPAINT_SKIP_COMPOSE=1 says to skip it.

On a fresh machine the first run also makes the base image and the wheelhouse (minutes): the test's
timeout is the sum of its steps' limits, so each step fails on its own limit, not the suite's 300 s.
"""

from __future__ import annotations

import io
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.fernet import Fernet
from PIL import Image

from stack.services import free_port
from tests.conftest import job_body
from tests.dockerbed import (
    LIMITS_S,
    QUICK_S,
    ROOT,
    Unavailable,
    base_image,
    compose_cli,
    docker_cli,
    engine,
    run,
    serve,
    step,
    wheelhouse,
)

# Seconds for the steps of every run: images built, stack up, the three waits of the test, torn down.
STEPS_S = {"build": 1500, "up": 600, "api": 180, "worker": 300, "job": 300, "down": 300}
pytestmark = [pytest.mark.slow, pytest.mark.timeout(sum(LIMITS_S.values()) + sum(STEPS_S.values()) + 10 * QUICK_S)]

TENANT_KEY = "sk-compose-" + secrets.token_hex(16)
METRICS_TOKEN = secrets.token_hex(16)  # opens /metrics and the detail of /readyz (production)


class Stack:
    def __init__(self, project: Path, name: str, env: dict[str, str], api_port: int, s3_port: int):
        self.project, self.name, self.env = project, name, env
        self.api = f"http://127.0.0.1:{api_port}"
        self.s3 = f"http://127.0.0.1:{s3_port}"

    def compose(self, *args: str, timeout: float = 900) -> str:
        files = ["-f", str(self.project / "compose.yaml"), "-f", str(self.project / "cpu.override.yaml")]
        return run(*compose_cli(), "-p", self.name, *files, *args, timeout=timeout, env=self.env, cwd=self.project)

    def logs(self) -> str:
        try:
            return self.compose("logs", "--no-color", "--tail=60", timeout=QUICK_S)
        except Exception as exc:  # a diagnostic only
            return f"(no logs: {exc})"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if os.environ.get("INPAINT_SKIP_COMPOSE") == "1":
        pytest.skip("INPAINT_SKIP_COMPOSE=1")
    tmp = tmp_path_factory.mktemp("compose")
    with ExitStack() as cleanup:
        try:
            compose_cli()
            env = cleanup.enter_context(engine(tmp / "dockerd.log"))
        except Unavailable as why:  # CI runs as root with docker.io: there it must run, so say why loudly
            pytest.fail(f"the compose test cannot run here: {why}")
        started = time.monotonic()
        base, wheels = base_image(env), wheelhouse()
        prepared = time.monotonic() - started
        project = tmp / "project"
        project.mkdir()
        shutil.copy2(ROOT / "compose.yaml", project / "compose.yaml")  # as users run it, byte for byte
        shutil.copy2(ROOT / "tests" / "compose" / "cpu.override.yaml", project / "cpu.override.yaml")
        api_port, s3_port = free_port(), free_port()
        (project / ".env").write_text(
            "\n".join([
                "INPAINT_ENVIRONMENT=development",  # production refuses the tiny-random model
                f"INPAINT_API_KEYS=acme:{TENANT_KEY}",
                f"INPAINT_SECRETS_KEY={Fernet.generate_key().decode()}",
                f"REDIS_PASSWORD={secrets.token_hex(12)}",
                "INPAINT_S3_ACCESS_KEY_ID=composetest",
                f"INPAINT_S3_SECRET_ACCESS_KEY={secrets.token_hex(16)}",
                "INPAINT_S3_BUCKET=inpaint",
                f"INPAINT_S3_PUBLIC_ENDPOINT_URL=http://127.0.0.1:{s3_port}",
                f"GRAFANA_ADMIN_PASSWORD={secrets.token_hex(8)}",
                f"INPAINT_METRICS_TOKEN={METRICS_TOKEN}",
                f"API_PORT={api_port}",
                f"S3_PORT={s3_port}",
            ]) + "\n"
        )  # fmt: skip
        tag = secrets.token_hex(4)
        wheels_url = cleanup.enter_context(serve(wheels))
        env = dict(env, TEST_REPO=str(ROOT), TEST_BASE_IMAGE=base, TEST_WHEELS_URL=wheels_url, TEST_IMAGE_TAG=tag)
        s = Stack(project, f"inpainttest{tag}", env, api_port, s3_port)
        try:
            print(f"\ncompose test: base image and wheelhouse ready in {prepared:.0f} s", flush=True)
            with step("building the api and worker images"):
                s.compose("build", timeout=STEPS_S["build"])
            with step("docker-compose up -d"):
                s.compose("up", "-d", timeout=STEPS_S["up"])
            yield s
        except Exception:
            print(s.logs())
            raise
        finally:
            s.compose("down", "-v", "--remove-orphans", timeout=STEPS_S["down"])
            # the two service images go (a few GB); the base image and the wheelhouse stay cached
            subprocess.run([docker_cli(), "image", "rm", "-f", f"inpaint-api:{tag}", f"inpaint-worker:{tag}"],
                           capture_output=True, env=env, timeout=QUICK_S)  # fmt: skip


def wait_for(what: str, check: Any, timeout: float, stack: Stack) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(1)
    pytest.fail(f"{what} not within {timeout}s (last: {last})\n{stack.logs()}")


def test_a_job_runs_through_the_compose_stack(stack: Stack) -> None:
    auth = {"Authorization": f"Bearer {TENANT_KEY}"}
    wait_for("API healthy", lambda: httpx.get(f"{stack.api}/healthz", timeout=5).status_code == 200, STEPS_S["api"],
             stack)  # fmt: skip
    operator = {"Authorization": f"Bearer {METRICS_TOKEN}"}
    ready = wait_for("a worker ready", lambda: (r := httpx.get(f"{stack.api}/readyz", headers=operator, timeout=5))
                     .status_code == 200 and r.json(), STEPS_S["worker"], stack)  # fmt: skip
    anonymous = httpx.get(f"{stack.api}/readyz", timeout=5).json()
    assert anonymous == {"status": "ready", "auth": "keys"}, anonymous  # no models or workers for anyone
    assert [m.split("@")[0] for m in ready["models"]] == ["tiny-random"], ready

    assert httpx.post(f"{stack.api}/v1/jobs", json=job_body(64, 64, seed=7)).status_code == 401  # auth fails closed
    r = httpx.post(f"{stack.api}/v1/jobs", headers=auth, json=job_body(64, 64, seed=7, num_inference_steps=3))
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    job = wait_for("the job to end",
                   lambda: (j := httpx.get(f"{stack.api}/v1/jobs/{job_id}", headers=auth, timeout=5).json())["status"]
                   in ("succeeded", "failed", "canceled") and j, STEPS_S["job"], stack)  # fmt: skip
    assert job["status"] == "succeeded", job

    url = job["outputs"][0]["url"]
    assert url.startswith(stack.s3 + "/"), url  # signed for the host clients use, not the s3 service's name
    got = httpx.get(url, timeout=10)
    assert got.status_code == 200, got.text
    image = Image.open(io.BytesIO(got.content))
    assert image.format == "PNG" and image.size == (64, 64)
    unsigned = httpx.get(url.split("?", 1)[0], timeout=10)
    assert unsigned.status_code == 403  # the bucket is not public: only the signature opened it
