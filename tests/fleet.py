"""The service spread over hosts of a network test bed (stack/netbed.py): Redis, S3, the API, the I/O
worker and inference workers each on a host of its own, a webhook receiver on the driver (this
process, 198.18.0.1). Tests cut hosts and paths and heal them; every host is torn down at the end."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from shared import keys
from shared.config import Settings
from shared.services import Services, build_services
from stack.netbed import Host, Netbed
from stack.services import Redis, SeaweedS3, Sentinel, wait_s3
from tests.conftest import KEYS, ROOT, Receiver, auth, settings_env

RANK = {"queued": 0, "running": 1, "succeeded": 2, "failed": 2, "canceled": 2}


class Fleet:
    def __init__(self, root: Path, base: Settings, ha: bool = False, **overrides: Any):
        """`ha`: Redis is a primary (on host `redis`), two replicas and three Sentinels, each on a host of
        its own, and every process finds the primary through the Sentinels."""
        self.root = root
        self.bed = Netbed().up()
        self.ha = ha
        self.redis: Redis | None = None
        self.replicas: list[Redis] = []
        self.sentinels: list[Sentinel] = []
        self.s3: SeaweedS3 | None = None
        try:
            self._start(base, overrides)
        except BaseException:
            self.stop()
            raise

    def _start(self, base: Settings, overrides: dict[str, Any]) -> None:
        bed = self.bed
        self.redis_host, self.s3_host = bed.host("redis", 2), bed.host("s3", 3)
        self.api_host, self.io_host = bed.host("api", 4), bed.host("io", 5)
        lag = {"min_replicas": 1, "max_lag_s": 2} if self.ha else {}
        self.redis = Redis(
            6379,
            self.root / "redis",
            host=self.redis_host.ip,
            password="fleet0123456789",
            prefix=self.redis_host.prefix,
            **lag,  # type: ignore[arg-type]
        )
        self.redis.start()
        ha: dict[str, Any] = {}
        if self.ha:
            for name, index in (("redis-b", 6), ("redis-c", 7)):
                h = bed.host(name, index)
                self.replicas.append(Redis(6379, self.root / name, host=h.ip, password=self.redis.password, prefix=h.prefix,
                                           replica_of=f"{self.redis_host.ip} 6379", **lag).start())  # type: ignore[arg-type]  # fmt: skip
            for name, index in (("sentinel-a", 8), ("sentinel-b", 9), ("sentinel-c", 10)):
                h = bed.host(name, index)
                self.sentinels.append(Sentinel(26379, self.root / name, f"{self.redis_host.ip} 6379", host=h.ip,
                                               password=self.redis.password, down_after_ms=2000,
                                               failover_timeout_ms=20000, prefix=h.prefix).start())  # fmt: skip
            deadline = time.monotonic() + 30
            while self.redis.client().info("replication").get("min_slaves_good_slaves", 0) < 2:
                assert time.monotonic() < deadline, "the replicas never attached"
                time.sleep(0.1)
            ha = {
                "redis_sentinels": ",".join(x.address for x in self.sentinels),
                "redis_wait_replicas": 1,
                "redis_wait_timeout_ms": 500,
            }
        self.s3 = SeaweedS3(self.root / "s3", "fleetaccess", "fleetsecret-0123456789", s3_port=8333,
                            host=self.s3_host.ip, prefix=self.s3_host.prefix).start()  # fmt: skip
        self.settings = base.model_copy(
            update={
                "redis_url": self.redis.url,
                "s3_endpoint_url": self.s3.endpoint,
                "s3_access_key_id": self.s3.access_key,
                "s3_secret_access_key": self.s3.secret_key,
                "environment": "test",
                "fault_injection": True,
                "worker_heartbeat_s": 0.5,  # a lease of 2 s
                "broker_visibility_timeout_s": 3,
                "broker_restore_interval_s": 1,
                "job_soft_time_limit_s": 60,
                "job_time_limit_s": 75,
                "webhook_retry_schedule_s": "1,4,8",
                "worker_metrics_port": 0,
                "webhooks_metrics_port": 0,
                "max_queued_per_tenant": 5000,
                **ha,
                **overrides,
            }
        )
        wait_s3(self.svc_storage(), 90)
        self.svc: Services = build_services(self.settings)
        self.svc.r.flushall()
        env = settings_env(self.settings)
        self.api_url = f"http://{self.api_host.ip}:8000"
        self.api_host.run(self._cli("api", "--host", self.api_host.ip, "--port", "8000"), env, self.log("api"), ROOT)
        self.io_host.run(self._cli("webhooks"), env, self.log("io"), ROOT)
        self.http = httpx.Client(base_url=self.api_url, headers=auth(), timeout=30)
        self.workers: dict[str, Host] = {}
        self.receiver = Receiver(bed.driver_ip)
        deadline = time.monotonic() + 60
        while True:
            try:
                if self.http.get("/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, self.tail("api")
            time.sleep(0.2)

    def primary(self) -> tuple[str, int]:
        """Where the Sentinels say the primary is now."""
        import redis

        for sentinel in self.sentinels:
            probe = redis.Redis(sentinel.host, sentinel.port, socket_timeout=2, decode_responses=True)
            try:
                host, port = probe.sentinel_get_master_addr_by_name("inpaint")  # type: ignore[misc]
                return str(host), int(port)
            except redis.RedisError:
                continue
            finally:
                probe.close()
        raise AssertionError("no Sentinel answers")

    def redis_on(self, ip: str) -> Redis:
        return next(x for x in (self.redis, *self.replicas) if x is not None and x.host == ip)

    def host_at(self, ip: str) -> Host:
        return next(h for h in self.bed.hosts.values() if h.ip == ip)

    def svc_storage(self) -> Any:
        from shared.storage import Storage

        return Storage(self.settings)

    @staticmethod
    def _cli(*args: str) -> list[str]:
        return [sys.executable, "-m", "stack.cli", *args]

    def log(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def tail(self, name: str, n: int = 60) -> str:
        try:
            return "\n".join(self.log(name).read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def add_worker(self, name: str, index: int) -> Host:
        host = self.bed.host(name, index)
        env = {**settings_env(self.settings), "OMP_NUM_THREADS": "1"}
        host.run(self._cli("worker", "--name", name), env, self.log(name), ROOT)
        self.workers[name] = host
        return host

    def children(self, host: Host) -> set[int]:
        """Pids of the worker processes running on `host` (Celery's parent and its pool children)."""
        pids: set[int] = set()
        for proc in host.procs:
            try:
                p = psutil.Process(proc.pid)
                pids |= {p.pid, *(c.pid for c in p.children(recursive=True))}
            except psutil.NoSuchProcess:
                pass
        return pids

    def host_of(self, owner: str) -> Host | None:
        """The worker host whose process holds a lease named `owner` (`hostname:pid/token`)."""
        pid = int(owner.split("/")[0].rsplit(":", 1)[1])
        return next((h for h in self.workers.values() if pid in self.children(h)), None)

    def ready(self, host: Host) -> bool:
        """Its pipeline is loaded: a registry entry of one of its processes."""
        pids = self.children(host)
        return any(int(w["name"].rsplit(":", 1)[1]) in pids for w in self.svc.registry.ready())

    def wait_ready(self, *hosts: Host, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not all(self.ready(h) for h in hosts):
            for h in hosts:
                dead = [p.pid for p in h.procs if p.poll() is not None]
                assert not dead, self.tail(h.name)
            assert time.monotonic() < deadline, "\n".join(self.tail(h.name) for h in hosts)
            time.sleep(0.2)

    def submit(self, **params: Any) -> str:
        from tests.conftest import job_body

        r = self.http.post("/v1/jobs", json=job_body(**params))
        assert r.status_code == 202, r.text
        return str(r.json()["id"])

    def job(self, job_id: str) -> dict[str, Any]:
        r = self.http.get(f"/v1/jobs/{job_id}")
        assert r.status_code == 200, r.text
        return dict(r.json())

    def wait_end(self, job_id: str, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while (job := self.job(job_id))["status"] not in ("succeeded", "failed", "canceled"):
            assert time.monotonic() < deadline, job
            time.sleep(0.2)
        return job

    def wait_status(self, job_id: str, status: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while (rec := self.svc.jobs.get(job_id)) is None or rec.status.value != status:
            assert time.monotonic() < deadline, rec.fields if rec else None
            time.sleep(0.05)
        return rec.fields

    def stop(self) -> None:
        if hasattr(self, "http"):
            self.http.close()
        if hasattr(self, "receiver"):
            self.receiver.server.shutdown()
            self.receiver.server.server_close()
        # started by their own classes: reaped here, not left to the GC
        for service in (self.redis, *self.replicas, *self.sentinels, self.s3):
            if service is not None and service.proc is not None and service.proc.poll() is None:
                service.proc.kill()
                service.proc.wait(10)
        self.bed.down()


class StatusLog:
    """Every status event the job store publishes, per job, as this driver saw them."""

    def __init__(self, fleet: Fleet):
        self.events: dict[str, list[str]] = {}
        self._stop = threading.Event()
        self._sub = fleet.svc.r.pubsub()
        self._sub.psubscribe(keys.events("*"))
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self._sub.get_message(ignore_subscribe_messages=True, timeout=0.5)
            except Exception:
                time.sleep(0.2)
                continue
            if msg and msg["type"] == "pmessage":
                ev = json.loads(msg["data"])
                if ev["type"] == "status":
                    self.events.setdefault(str(msg["channel"]).rsplit(":", 1)[1], []).append(ev["status"])

    def forward_only(self, job_id: str) -> list[str]:
        seq = self.events.get(job_id, [])
        assert seq == sorted(seq, key=RANK.__getitem__), seq
        assert sum(RANK[s] == 2 for s in seq) == 1, seq
        return seq

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sub.close()


__all__ = ["KEYS", "Fleet", "StatusLog"]
