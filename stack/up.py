"""`inpaint up`: the whole stack on this machine, children stopped cleanly on Ctrl-C or SIGTERM."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from shared.auth import OPEN_TENANT, KeyStore
from shared.catalog import slug
from shared.config import Settings
from shared.db import connect
from shared.storage import Storage
from stack.services import Redis, SeaweedS3, ServiceError, _port_free, stop_process, wait_port, wait_s3


def _child(args: list[str], env: dict[str, str], log_dir: Path, name: str) -> subprocess.Popen[bytes]:
    with open(log_dir / f"{name}.log", "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "stack.cli", *args], env=env, stdout=log, stderr=subprocess.STDOUT
        )


def worker_plan(settings: Settings) -> list[tuple[str, str]]:
    """(log name, INPAINT_MODEL) of each inference worker `inpaint up` starts: one per model of
    INPAINT_MODELS, else INPAINT_MODEL's alone; the default model's is `worker`."""
    models = settings.model_list() or [settings.model]
    return [("worker" if i == 0 else f"worker-{slug(m)}", m) for i, m in enumerate(models)]


def _first_key(settings: Settings, redis_url: str) -> str:
    """What to say about keys beside the URLs: in development with no key anywhere, a new key for
    tenant `default` (shown once); in open mode, that the API is open."""
    if settings.auth == "none":
        return "  auth       NONE: INPAINT_AUTH=none, the API is open (single-user mode)\n"
    store = KeyStore(connect(redis_url))
    if settings.environment != "development" or settings.api_key_map() or store.list():
        return ""
    info, key = store.create(OPEN_TENANT)
    return f"  API key    {key}  (tenant {OPEN_TENANT}, id {info.id}; shown once)\n"


def _path_hint(executable: str = sys.executable, path: str | None = None) -> str:
    """What to say when a shell would not find this `inpaint` (`make run` leaves it in .venv/bin)."""
    bin_dir = Path(executable).parent  # not resolved: a venv's python is a link out of the venv
    script = bin_dir / "inpaint"
    found = shutil.which("inpaint", path=path)
    if not script.exists() or (found and Path(found).resolve() == script.resolve()):
        return ""
    try:
        shown = bin_dir.absolute().relative_to(Path.cwd())
    except ValueError:
        shown = bin_dir.absolute()
    how = f"`source {shown}/activate` puts it first" if (bin_dir / "activate").exists() else f"add {shown} to PATH"
    where = f"PATH finds {found} first" if found else "not on PATH"
    return f"  commands   {shown}/inpaint ({where}: {how})\n"


def _announce_model(base: str) -> bool:
    """Once a worker is ready, say which model it serves (loudly if the classical fallback)."""
    try:
        ready = httpx.get(f"{base}/readyz", timeout=2).json()
    except (httpx.HTTPError, ValueError):
        return False
    if not ready.get("models"):
        return False
    print(f"  model      {', '.join(ready['models'])}", flush=True)
    if ready.get("fallback"):
        print(
            "  !!! the CLASSICAL OpenCV inpainter serves: it ignores prompts. `inpaint model fetch` gets the\n"
            "  !!! pinned stable-diffusion-2-inpainting weights; restart `inpaint up` afterwards.",
            flush=True,
        )
    return True


def run_up(settings: Settings) -> int:
    data = settings.data_dir.resolve()
    logs = data / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    try:
        redis_port = urlsplit(settings.redis_url).port or 6379
        s3_port = urlsplit(settings.s3_endpoint_url).port or 8333
    except ValueError as exc:  # a port past 65535
        print(f"inpaint up: {exc} in INPAINT_REDIS_URL or INPAINT_S3_ENDPOINT_URL")
        return 2
    for what, port in (("Redis", redis_port), ("S3", s3_port), ("API", settings.api_port)):
        if not _port_free(port):
            print(f"inpaint up: port {port} for {what} is taken; stop what uses it or set INPAINT_* to another port")
            return 2
    stopping = False

    def _stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    redis = Redis(redis_port, data / "redis", appendonly=True, appendfsync=settings.redis_appendfsync)
    s3 = SeaweedS3(data / "s3", settings.s3_access_key_id, settings.s3_secret_access_key, s3_port=s3_port)
    children: list[tuple[str, subprocess.Popen[bytes]]] = []
    code = 0
    try:
        print("starting redis-server …", flush=True)
        redis.start()
        print("starting SeaweedFS S3 …", flush=True)
        s3.start()
        wait_s3(Storage(settings), 90)
        env = dict(
            os.environ, INPAINT_DATA_DIR=str(data), INPAINT_REDIS_URL=redis.url, INPAINT_S3_ENDPOINT_URL=s3.endpoint
        )
        env["INPAINT_WEBHOOK_SECRET"] = settings.resolved_webhook_secret()
        first_key = _first_key(settings, redis.url)
        children.append(
            ("api", _child(["api", "--host", settings.api_host, "--port", str(settings.api_port)], env, logs, "api"))
        )
        for name, model in worker_plan(settings):
            children.append((name, _child(["worker"], {**env, "INPAINT_MODEL": model}, logs, name)))
        children.append(("webhooks", _child(["webhooks"], env, logs, "webhooks")))
        wait_port(settings.api_port, 60, children[0][1])
        base = f"http://{settings.api_host}:{settings.api_port}"
        print(
            f"\ninpaint is up\n  API        {base}\n  docs       {base}/docs\n  readiness  {base}/readyz\n"
            f"  S3         {s3.endpoint} (bucket {settings.s3_bucket})\n  Redis      {redis.url}\n"
            f"  logs       {logs}\n{first_key}{_path_hint()}Ctrl-C stops everything.\n",
            flush=True,
        )
        announced = False
        while not stopping:
            if not announced:
                announced = _announce_model(base)
            for name, proc in children:
                if proc.poll() is not None:
                    print(f"inpaint up: {name} exited with {proc.returncode}; see {logs / (name + '.log')}")
                    stopping, code = True, 1
            time.sleep(0.5)
    except ServiceError as exc:
        print(f"inpaint up: {exc}")
        code = 1
    finally:
        print("stopping …", flush=True)
        # Workers first (a warm shutdown lets the running job finish or go back to the queue), storage last.
        for _name, proc in reversed(children):
            stop_process(proc, 30)
        s3.stop()
        redis.stop()
        print("stopped.")
    return code
