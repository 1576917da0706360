"""The service on loopback for the benchmarks that time it whole: redis-server, SeaweedFS, and `inpaint`
API and worker processes started on demand with the tiny-random model, all stopped on exit."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.config import Settings  # noqa: E402
from shared.db import connect  # noqa: E402
from shared.jobs.registry import Registry  # noqa: E402
from shared.storage import Storage  # noqa: E402
from stack.services import Redis, SeaweedS3, free_port, stop_process, wait_port, wait_s3  # noqa: E402


def machine() -> str:
    """The machine a result was measured on, for its JSON."""
    return f"{platform.node()} ({os.cpu_count()} CPUs, {platform.processor() or platform.machine()})"


def env_for(settings: Settings) -> dict[str, str]:
    """The process environment that gives a child process exactly `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INPAINT_")}
    for name, value in settings.model_dump().items():
        if value is not None:
            env[f"INPAINT_{name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    env["HF_HUB_OFFLINE"] = "1"
    return env


class BenchStack:
    """`with BenchStack(**settings) as st:` then `st.start_api()`, `st.start_worker()`; `st.base` is the
    API's URL. With `root`, the processes run that tree's code."""

    def __init__(self, root: Path = ROOT, **settings: Any):
        self.root = root  # the tree whose code runs (another checkout for a baseline)
        self.overrides = settings
        self.tmp = Path(tempfile.mkdtemp(prefix="inpaint-bench-"))
        self.logs = self.tmp / "logs"
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> BenchStack:
        self.redis = Redis(free_port(), self.tmp / "redis").start()
        try:
            self.s3 = SeaweedS3(self.tmp / "s3", "benchaccess", "benchsecret-0123456789").start()
        except BaseException:
            self.redis.stop()
            raise
        s3 = self.s3
        self.settings = Settings(**{
            "data_dir": self.tmp / "data", "redis_url": self.redis.url, "s3_endpoint_url": s3.endpoint,
            "s3_access_key_id": s3.access_key, "s3_secret_access_key": s3.secret_key, "model": "tiny-random",
            "device": "cpu", "api_port": free_port(), **self.overrides,
        })  # fmt: skip
        self.logs.mkdir()
        self.registry = Registry(connect(self.settings.redis_url))
        try:
            wait_s3(Storage(self.settings), 90)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *_: type[BaseException] | BaseException | TracebackType | None) -> None:
        for p in self.procs:
            stop_process(p, 20)
        self.s3.stop()
        self.redis.stop()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.settings.api_port}"

    def start(self, name: str, *cmd: str) -> subprocess.Popen[bytes]:
        """`inpaint <cmd>` in the background, its output in logs/<name>.log."""
        with open(self.logs / f"{name}.log", "ab") as log:
            p = subprocess.Popen([sys.executable, "-m", "stack.cli", *cmd, "--log-level", "warning"],
                                 env=env_for(self.settings), cwd=self.root, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        self.procs.append(p)
        return p

    def start_api(self) -> subprocess.Popen[bytes]:
        """The API, once it listens."""
        api = self.start("api", "api", "--port", str(self.settings.api_port))
        wait_port(self.settings.api_port, 60, api)
        return api

    def start_worker(self, name: str = "worker", timeout: float = 180) -> subprocess.Popen[bytes]:
        """An inference worker, once one is ready (its model loaded and warmed)."""
        worker = self.start(name, "worker")
        deadline = time.monotonic() + timeout
        while not self.registry.ready():
            log = (self.logs / f"{name}.log").read_text()[-3000:]
            assert time.monotonic() < deadline and worker.poll() is None, log
            time.sleep(0.2)
        return worker
