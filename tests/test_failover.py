"""Redis with Sentinels on loopback: a primary, two replicas and three Sentinels. What a store write that
was acknowledged becomes when the primary is lost, cut off from its replicas, or promoted away.

Two replicas, because every write waits for one (`min-replicas-to-write 1`, `WAIT 1`): after a failover
the promoted replica still has one to confirm its writes. With a single replica, the promoted one would
refuse every write until another replica attached (safe, but not available)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from shared.config import Settings
from shared.db import NotReplicated, acked, confirm, connect
from shared.jobs.deliveries import Deliveries
from shared.jobs.record import new_job_id
from shared.jobs.store import JobStore, QueueFull
from shared.schemas import JobInput
from stack.services import Redis, Sentinel, free_port

PASSWORD = "ha0123456789"
COUNT = "return redis.call('INCR', KEYS[1])"


@dataclass
class Group:
    primary: Redis
    replicas: list[Redis]
    sentinels: list[Sentinel]
    settings: Settings

    @property
    def replica(self) -> Redis:
        return self.replicas[0]

    def stop(self) -> None:
        for s in self.sentinels:
            s.stop()
        for r in (self.primary, *self.replicas):
            if r.proc is not None and r.proc.poll() is None:
                os.kill(r.proc.pid, signal.SIGCONT)
            r.stop()

    def master(self) -> tuple[str, int]:
        probe = redis.Redis("127.0.0.1", self.sentinels[0].port, socket_timeout=2)
        try:
            host, port = probe.sentinel_get_master_addr_by_name("inpaint")
            return str(host), int(port)
        finally:
            probe.close()


def start_group(root: Path, settings: Settings, max_lag_s: int = 2) -> Group:
    p1 = free_port()
    primary = Redis(p1, root / "primary", password=PASSWORD, min_replicas=1, max_lag_s=max_lag_s).start()
    replicas = [
        Redis(
            free_port(),
            root / f"replica{i}",
            password=PASSWORD,
            replica_of=f"127.0.0.1 {p1}",
            min_replicas=1,
            max_lag_s=max_lag_s,
        ).start()
        for i in range(2)
    ]
    sentinels = [
        Sentinel(
            free_port(),
            root / f"sentinel{i}",
            f"127.0.0.1 {p1}",
            password=PASSWORD,
            down_after_ms=1000,
            failover_timeout_ms=10000,
        ).start()
        for i in range(3)
    ]
    sentinel_list = ",".join(s.address for s in sentinels)
    ha = settings.model_copy(
        update={
            # the URL's host is a port where nothing listens: only the Sentinels say where Redis is
            "redis_url": f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0",
            "redis_sentinels": sentinel_list,
            "redis_wait_replicas": 1,
            "redis_wait_timeout_ms": 300,
        }
    )
    group = Group(primary, replicas, sentinels, ha)
    deadline = time.monotonic() + 20
    while redis.Redis.from_url(primary.url).info("replication").get("min_slaves_good_slaves", 0) < 2:
        assert time.monotonic() < deadline, "the replica never attached"  # and confirmed: writes are taken
        time.sleep(0.1)
    return group


@pytest.fixture
def group(tmp_path: Path, settings: Settings) -> Iterator[Group]:
    g = start_group(tmp_path, settings)
    try:
        yield g
    finally:
        g.stop()


def until(what: object, timeout: float) -> float:
    """Call `what` until it stops raising a Redis error: seconds it took."""
    start = time.monotonic()
    while True:
        try:
            what()  # type: ignore[operator]
            return time.monotonic() - start
        except redis.RedisError:
            assert time.monotonic() - start < timeout, "still failing"
            time.sleep(0.1)


def test_what_was_acknowledged_survives_the_loss_of_the_primary(group: Group) -> None:
    r = connect(group.settings)
    count = r.register_script(COUNT)
    for _ in range(200):
        acked(r, count, ["n"], [])  # each answered only once the replica holds it
    group.primary.kill()  # no shutdown: the machine is gone
    mark = r.register_script("return redis.call('SET', KEYS[1], ARGV[1])")  # safe to run twice, unlike INCR
    took = until(lambda: acked(r, mark, ["after"], ["1"]), timeout=30)  # the same client follows the promotion
    assert int(r.get("n")) == 200 and r.get("after") == "1"
    assert group.master()[1] in {x.port for x in group.replicas}
    assert took < 15, took


def test_a_write_the_replica_did_not_confirm_is_not_acknowledged(group: Group) -> None:
    r = connect(group.settings)
    count = r.register_script(COUNT)
    acked(r, count, ["n"], [])
    store = JobStore(r, 60)
    store.create(new_job_id(), "alice", JobInput(prompt="x"), "k", "k", "c")
    assert confirm(r)
    for replica in group.replicas:
        assert replica.proc is not None
        os.kill(replica.proc.pid, signal.SIGSTOP)  # attached, but confirms nothing
    with pytest.raises(NotReplicated):
        acked(r, count, ["n"], [])
    assert not confirm(r)  # a record read back is not answered as held
    with pytest.raises(QueueFull):  # a refusal wrote nothing: it needs no replica (not a 503)
        store.create(new_job_id(), "alice", JobInput(prompt="x"), "k", "k", "c", caps=(100, 1))
    # A webhook's end is not taken as recorded either: the I/O worker tries it again (after a failover,
    # on the new primary) instead of letting the delivery's claim lapse into a second send.
    with pytest.raises(NotReplicated):
        Deliveries(r, None, 60).finish("a-series")  # type: ignore[arg-type]  # finish needs no queue
    # Past `min-replicas-max-lag` the primary takes no writes at all; the connection lets go of it.
    time.sleep(3.5)
    with pytest.raises(redis.ConnectionError, match="cannot reach its replicas"):
        r.incr("n")
    for replica in group.replicas:
        os.kill(replica.proc.pid, signal.SIGCONT)
    until(lambda: acked(r, count, ["n"], []), timeout=15)


def test_connections_let_go_of_a_demoted_primary(group: Group) -> None:
    r = connect(group.settings)
    r.set("k", "v")
    probe = redis.Redis("127.0.0.1", group.sentinels[0].port, socket_timeout=5)
    probe.sentinel_failover("inpaint")  # a planned switch: the old primary becomes a replica
    deadline = time.monotonic() + 20
    old = redis.Redis.from_url(group.primary.url)
    while group.master()[1] == group.primary.port or old.info("replication")["role"] != "slave":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    until(lambda: r.set("k", "w"), timeout=20)  # READONLY on the old one: the next connection asks again
    promoted = next(x for x in group.replicas if x.port == group.master()[1])
    assert redis.Redis.from_url(promoted.url, decode_responses=True).get("k") == "w"


def test_a_replayed_submit_is_answered_only_once_a_replica_holds_its_job(group: Group) -> None:
    """The Idempotency-Key replay of a submit: the job found on the primary is answered 202 only when a
    replica confirms it holds it; while none does, 503 with Retry-After (a failover could still lose it)."""
    from fastapi.testclient import TestClient

    from api.app import create_app
    from tests.conftest import auth, job_body

    with TestClient(create_app(group.settings)) as client:
        h = {**auth(), "Idempotency-Key": "replay-behind-sentinels"}
        body = job_body()
        first = client.post("/v1/jobs", headers=h, json=body)
        assert first.status_code == 202, first.text
        for replica in group.replicas:
            assert replica.proc is not None
            os.kill(replica.proc.pid, signal.SIGSTOP)
        try:
            again = client.post("/v1/jobs", headers=h, json=body)
            assert again.status_code == 503 and again.headers["Retry-After"], again.text  # 202 before
        finally:
            for replica in group.replicas:
                os.kill(replica.proc.pid, signal.SIGCONT)
        deadline = time.monotonic() + 15
        while (replay := client.post("/v1/jobs", headers=h, json=body)).status_code == 503:
            assert time.monotonic() < deadline, replay.text
            time.sleep(0.2)
        assert replay.status_code == 202 and replay.json()["id"] == first.json()["id"]
