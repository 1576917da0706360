"""Real services for the suite: redis-server, SeaweedFS S3 and Celery worker processes on loopback."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from shared.config import Settings
from shared.jobs.store import JobStore
from shared.services import Services, build_services
from shared.storage import Storage
from stack.services import Redis, SeaweedS3, free_port, stop_process, wait_s3

pytest_plugins = ["tests.faultstack"]  # the fault stack's fixture, for the modules that ask for it

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"alice": "key-alice-0123456789", "bob": "key-bob-0123456789"}
TERMINAL = ("succeeded", "failed", "canceled")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A failing test that used worker processes shows their last log lines and the broker's state:
    what CI keeps of a run is its output, not the temporary directories."""
    report = yield
    if report.when == "call" and report.failed:
        funcargs = getattr(item, "funcargs", {})
        procs = [v for v in funcargs.values() if isinstance(v, WorkerProcess)]
        stack = funcargs.get("stack")
        if stack is not None and hasattr(stack, "workers"):  # the fault stack (the compose test has its own)
            procs += [*stack.workers, stack.hooks]
            try:
                r = stack.store.r
                report.sections.append(("broker", f"queued {r.llen('inpaint')}, unacked {r.hlen('unacked')}"))
            except Exception as exc:  # Redis may be what the test took away
                report.sections.append(("broker", repr(exc)))
        for w in procs:
            report.sections.append((f"log tail {w.log_path.name}", w.log_tail(60)))
    return report


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a child process these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INPAINT_")}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        env[f"INPAINT_{name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    env["PYTHONUNBUFFERED"] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    return env


class WorkerProcess:
    """`inpaint worker` (or `inpaint webhooks`) as a real child process."""

    def __init__(
        self,
        settings: Settings,
        log_path: Path,
        command: str = "worker",
        *extra: str,
        env: dict[str, str] | None = None,
    ):
        self.settings, self.log_path, self.env = settings, log_path, env or {}
        self.args = [sys.executable, "-m", "stack.cli", command, *extra]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.args,
                env={**settings_env(self.settings), **self.env},
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def wait_ready(self, svc: Services, count: int = 1, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.log_tail()
            if len(svc.registry.ready()) >= count:
                return
            time.sleep(0.2)
        raise AssertionError("worker not ready:\n" + self.log_tail())

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, grace_s: float = 20) -> None:
        if self.proc is not None:
            stop_process(self.proc, grace_s)


@pytest.fixture(scope="session")
def tmp_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("inpaint")


@pytest.fixture(scope="session")
def redis_server(tmp_root: Path) -> Iterator[Redis]:
    server = Redis(free_port(), tmp_root / "redis", appendonly=True).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_root: Path) -> Iterator[SeaweedS3]:
    server = SeaweedS3(tmp_root / "s3", "testaccess", "testsecret-0123456789").start()
    yield server
    server.stop()


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (PEM files), for an HTTPS server on loopback."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@pytest.fixture(scope="session")
def tls(tmp_root: Path) -> tuple[Path, Path]:
    return self_signed(tmp_root / "tls")


class Files:
    """An HTTPS file server on 127.0.0.1 (a certificate the suite's settings trust): `files[path]` is
    (status, body, extra headers); every request is counted."""

    def __init__(self, cert: Path, key: Path) -> None:
        import ssl

        self.files: dict[str, tuple[int, bytes, dict[str, str]]] = {}
        self.hits: list[str] = []
        served = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                served.hits.append(self.path)
                status, body, headers = served.files.get(self.path, (404, b"", {}))
                self.send_response(status)
                for k, v in {"content-length": str(len(body)), **headers}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.port}{path}"


@pytest.fixture(scope="module")
def files(tls: tuple[Path, Path]) -> Iterator[Files]:
    f = Files(*tls)
    yield f
    f.server.shutdown()
    f.server.server_close()


@pytest.fixture(scope="session")
def settings(tmp_root: Path, redis_server: Redis, s3_server: SeaweedS3, tls: tuple[Path, Path]) -> Settings:
    s = Settings(
        environment="test",
        data_dir=tmp_root / "data",
        redis_url=redis_server.url,
        s3_endpoint_url=s3_server.endpoint,
        s3_access_key_id=s3_server.access_key,
        s3_secret_access_key=s3_server.secret_key,
        s3_bucket="inpaint-test",
        model="tiny-random",
        device="cpu",
        crop_size=64,  # crop_to_mask jobs are inpainted at 64×64: the tiny model's size, not SD2's 512
        api_keys=",".join(f"{t}:{k}" for t, k in KEYS.items()),
        webhook_secret="whsec_" + base64.b64encode(b"test-secret-0123456789abcdef0123").decode(),
        webhook_allow_private=True,
        fetch_allow_private=True,  # image URLs on the suite's own HTTPS server (tests/conftest.py: Files)
        fetch_ca_file=str(tls[0]),
        webhook_retry_schedule_s="0.2,0.2,0.2,0.2",
        worker_heartbeat_s=1.0,
        job_soft_time_limit_s=120,
        job_time_limit_s=150,
        worker_metrics_port=free_port(),
        webhooks_metrics_port=free_port(),
    )
    wait_s3(Storage(s), 90)
    return s


def isolated(settings: Settings, db: int) -> Settings:
    """The suite's settings on a Redis database of its own, emptied: what a test queues there (a job
    recorded without its turn, say) is never taken by the suite's worker, which serves database 0."""
    from shared.db import connect

    s = settings.model_copy(update={"redis_url": settings.redis_url.rsplit("/", 1)[0] + f"/{db}"})
    connect(s.redis_url).flushdb()
    return s


@pytest.fixture(scope="session")
def svc(settings: Settings) -> Services:
    return build_services(settings)


@pytest.fixture(scope="session")
def store(svc: Services) -> JobStore:
    return svc.jobs


@pytest.fixture(scope="session")
def storage(settings: Settings) -> Storage:
    return Storage(settings)


@pytest.fixture(scope="session")
def worker(settings: Settings, svc: Services, tmp_root: Path) -> Iterator[WorkerProcess]:
    proc = WorkerProcess(settings, tmp_root / "worker.log").start()
    proc.wait_ready(svc)
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def webhook_worker(settings: Settings, tmp_root: Path) -> Iterator[WorkerProcess]:
    proc = WorkerProcess(settings, tmp_root / "webhooks.log", "webhooks").start()
    time.sleep(3)
    assert proc.proc is not None and proc.proc.poll() is None, proc.log_tail()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def client(settings: Settings) -> Iterator[TestClient]:
    from api.app import create_app

    with TestClient(create_app(settings)) as c:
        yield c


def at(rfc3339: str) -> float:
    """A job's timestamp (`created_at`, `started_at`, …) in seconds since the epoch."""
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


def auth(tenant: str = "alice") -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


def png_bytes(img: Image.Image, fmt: str = "PNG", **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def make_pair(
    w: int = 64, h: int = 48, box: tuple[int, int, int, int] | None = None
) -> tuple[Image.Image, Image.Image]:
    """A patterned image and a mask with one white box."""
    import numpy as np

    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), ((xx + yy) % 256)], -1).astype("uint8")
    img = Image.fromarray(arr, "RGB")
    mask = Image.new("L", (w, h), 0)
    mask.paste(255, box or (w // 4, h // 4, w // 2, h // 2))
    return img, mask


def job_body(w: int = 64, h: int = 48, **params: Any) -> dict[str, Any]:
    img, mask = make_pair(w, h)
    return {"prompt": "a red apple", "image": b64(png_bytes(img)), "mask": b64(png_bytes(mask)),
            "num_inference_steps": 3, **params}  # fmt: skip


def wait_for(client: TestClient, job_id: str, tenant: str = "alice", timeout: float = 90,
             until: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:  # fmt: skip
    deadline = time.monotonic() + timeout
    done = until or (lambda j: j["status"] in TERMINAL)
    while True:
        r = client.get(f"/v1/jobs/{job_id}", headers=auth(tenant))
        assert r.status_code == 200, r.text
        job = r.json()
        if done(job):
            return job
        assert time.monotonic() < deadline, f"job {job_id} stuck: {job}"
        time.sleep(0.05)


class Receiver:
    """A webhook endpoint (or an S3 stand-in) on 127.0.0.1 that answers from a script per path and
    records every request: POST, PUT and DELETE."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.requests: list[dict[str, Any]] = []
        self.scripts: dict[str, list[int]] = {}
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with receiver.lock:
                    receiver.requests.append(
                        {"method": self.command, "path": self.path, "headers": dict(self.headers), "body": body,
                         "at": time.time()}
                    )  # fmt: skip
                    script = receiver.scripts.get(self.path, [200])
                    code = script.pop(0) if len(script) > 1 else script[0]
                if code == 0:  # never answer in time
                    time.sleep(30)
                    return
                self.send_response(code)
                if 300 <= code < 400:
                    self.send_header("Location", f"http://{receiver.host}:{receiver.port}/redirected")
                self.send_header("content-length", "0")
                self.end_headers()

            do_PUT = do_DELETE = do_POST

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def at(self, path: str) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.requests if r["path"] == path]

    def arrival(self, path: str, job_id: str, timeout: float = 30) -> float | None:
        """When (`time.time()`) the first webhook about `job_id` reached `path`; None if none in `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            for r in self.at(path):
                if json.loads(r["body"]).get("data", {}).get("id") == job_id:
                    return float(r["at"])
            if time.monotonic() > deadline:
                return None
            time.sleep(0.05)

    def wait(self, path: str, count: int, timeout: float = 30) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.at(path)) < count:
            assert time.monotonic() < deadline, f"{path}: {len(self.at(path))} of {count} requests"
            time.sleep(0.05)
        return self.at(path)


@pytest.fixture(scope="module")
def receiver():
    r = Receiver()
    yield r
    r.server.shutdown()
    r.server.server_close()


@pytest.fixture(scope="module")
def api(stack: Any) -> Iterator[TestClient]:
    """An in-process API over the `stack` fixture of the module that asks (reliability, load)."""
    from api.app import create_app

    with TestClient(create_app(stack.settings)) as c:
        yield c


@contextmanager
def serve(app: Any, tls: tuple[Path, Path] | None = None) -> Iterator[str]:
    """`app` served by uvicorn on a loopback port, for as long as the block runs; over HTTPS with `tls`
    (a certificate and its key)."""
    import uvicorn

    port = free_port()
    ssl = {"ssl_certfile": str(tls[0]), "ssl_keyfile": str(tls[1])} if tls else {}
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **ssl))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def http_api(settings: Settings, worker: object) -> Iterator[str]:
    """The API served by uvicorn on a loopback port (for browsers and HTTP clients), with a worker."""
    from api.app import create_app

    with serve(create_app(settings)) as base:
        yield base


@pytest.fixture(scope="module")
def tiny_lora() -> bytes:
    """A tiny-random LoRA adapter (peft keys), for the LoRA tests."""
    from tests.lora_files import tiny_adapter

    return tiny_adapter(1)


@pytest.fixture(scope="module")
def other_lora() -> bytes:
    """Another one, in diffusers' key format."""
    from tests.lora_files import tiny_adapter

    return tiny_adapter(2, fmt="diffusers")
