"""Losing the Redis primary, on the network test bed: a primary, two replicas and three Sentinels, each
on a host of its own, the API, two workers and the I/O worker, while two tenants submit steadily.

What must hold through a failover: every submit answered 202 ends once (outputs that download, a
manifest, one terminal webhook), no status a client read goes backwards, and while there is no primary
the API answers 503 with `Retry-After`, never a 500, never a hang."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from shared.jobs.view import manifest_key
from stack.netbed import available
from tests.conftest import auth, job_body
from tests.fleet import RANK, Fleet

HANG_S = 10.0  # no answer may take longer: the API gives up on Redis within ~5 s
TENANTS = ("alice", "bob")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, settings: Any) -> Iterator[Fleet]:
    why = available()
    if why:
        pytest.fail(f"the network test bed {why}")
    f = Fleet(tmp_path_factory.mktemp("ha"), settings, ha=True)
    try:
        f.wait_ready(f.add_worker("w1", 11), f.add_worker("w2", 12))
        yield f
    finally:
        f.stop()


@dataclass
class Answer:
    sent: float
    took: float
    status: int
    tenant: str
    job_id: str = ""
    retry_after: str | None = None
    body: str = ""


@dataclass
class Traffic:
    """Tenants submitting one job every `every_s` each, and a client polling every job it was given."""

    fleet: Fleet
    path: str
    every_s: float = 0.3
    answers: list[Answer] = field(default_factory=list)
    seen: dict[str, list[str]] = field(default_factory=dict)  # job id -> statuses a client read, in order
    polls: list[Answer] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.threads = [threading.Thread(target=self._submit, args=(t,), daemon=True) for t in TENANTS]
        self.threads.append(threading.Thread(target=self._poll, daemon=True))
        for t in self.threads:
            t.start()

    def _client(self, tenant: str) -> httpx.Client:
        return httpx.Client(base_url=self.fleet.api_url, headers=auth(tenant), timeout=30)

    def _submit(self, tenant: str) -> None:
        with self._client(tenant) as http:
            i = 0
            while not self.stop.is_set():
                i += 1
                body = job_body(seed=i, num_inference_steps=2, webhook=self.fleet.receiver.url(self.path))
                sent = time.time()
                try:
                    r = http.post("/v1/jobs", json=body)
                except httpx.HTTPError as exc:
                    self.answers.append(Answer(sent, time.time() - sent, 0, tenant, body=repr(exc)))
                    continue
                jid = r.json().get("id", "") if r.status_code == 202 else ""
                self.answers.append(
                    Answer(sent, time.time() - sent, r.status_code, tenant, jid, r.headers.get("retry-after"), r.text)
                )
                time.sleep(self.every_s)

    def _poll(self) -> None:
        clients = {t: self._client(t) for t in TENANTS}
        try:
            while not self.stop.is_set():
                for a in [a for a in self.answers if a.job_id]:
                    statuses = self.seen.setdefault(a.job_id, [])
                    if statuses and statuses[-1] in ("succeeded", "failed", "canceled"):
                        continue
                    sent = time.time()
                    try:
                        r = clients[a.tenant].get(f"/v1/jobs/{a.job_id}")
                    except httpx.HTTPError as exc:
                        self.polls.append(Answer(sent, time.time() - sent, 0, a.tenant, a.job_id, body=repr(exc)))
                        continue
                    self.polls.append(Answer(sent, time.time() - sent, r.status_code, a.tenant, a.job_id,
                                             r.headers.get("retry-after"), r.text[:200]))  # fmt: skip
                    if r.status_code == 200:
                        status = r.json()["status"]
                        if not statuses or statuses[-1] != status:
                            statuses.append(status)
                time.sleep(0.2)
        finally:
            for c in clients.values():
                c.close()

    def halt(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def accepted(self) -> list[Answer]:
        return [a for a in self.answers if a.status == 202]

    def first_202_after(self, t: float) -> float | None:
        done = [a.sent + a.took for a in self.accepted() if a.sent > t]
        return min(done) - t if done else None


def check_answers(answers: list[Answer]) -> None:
    """Every answer a 2xx, or a 503 that says when to retry, and none slow."""
    for a in answers:
        assert a.status in (200, 202) or (a.status == 503 and a.retry_after), (a.status, a.body)
        assert a.took < HANG_S, (a.took, a.status, a.body)


def terminal_per_job(fleet: Fleet, path: str) -> dict[str, int]:
    count: dict[str, int] = {}
    for h in fleet.receiver.at(path):
        body = json.loads(h["body"])
        if body["type"] in ("job.succeeded", "job.failed", "job.canceled"):
            count[body["data"]["id"]] = count.get(body["data"]["id"], 0) + 1
    return count


def check_ended_once(fleet: Fleet, traffic: Traffic, path: str) -> None:
    ids = {a.job_id: a.tenant for a in traffic.accepted()}
    assert ids, "nothing was accepted"
    for jid, tenant in ids.items():
        deadline = time.monotonic() + 240
        while True:
            r = httpx.get(f"{fleet.api_url}/v1/jobs/{jid}", headers=auth(tenant), timeout=30)
            assert r.status_code == 200, (jid, r.status_code, r.text)  # a 202'd job is never lost
            job = r.json()
            if job["status"] in ("succeeded", "failed", "canceled"):
                break
            assert time.monotonic() < deadline, job
            time.sleep(0.3)
        assert job["status"] == "succeeded", job
        for out in job["outputs"]:
            assert httpx.get(out["url"], timeout=30).status_code == 200, (jid, out)
        deadline = time.monotonic() + 30
        while (doc := fleet.svc.storage.get_json(manifest_key(tenant, jid))) is None:
            assert time.monotonic() < deadline, f"no manifest for {jid}"
            time.sleep(0.2)
        assert doc["status"] == "succeeded", doc
    # One terminal webhook per job; a second could only come from a delivery still scheduled, or one
    # whose end a failover lost (its attempt then runs again a claim later).
    deadline = time.monotonic() + 90
    while not set(ids) <= set(terminal_per_job(fleet, path)):
        assert time.monotonic() < deadline, sorted(set(ids) - set(terminal_per_job(fleet, path)))
        time.sleep(0.5)
    time.sleep(3.0)
    assert {j: n for j, n in terminal_per_job(fleet, path).items() if n != 1} == {}
    for jid, statuses in traffic.seen.items():
        assert statuses == sorted(statuses, key=RANK.__getitem__), (jid, statuses)  # never backwards


def test_losing_the_primary_host_loses_no_acknowledged_job(fleet: Fleet) -> None:
    traffic = Traffic(fleet, "/lost")
    try:
        time.sleep(6.0)  # a steady state: jobs queued, running, ending
        before = len(traffic.accepted())
        assert before >= 10, [a.body for a in traffic.answers[-3:]]
        old = fleet.primary()
        killed_at = time.time()
        fleet.host_at(old[0]).cut()  # the machine is gone: its packets vanish, nothing resets a connection
        fleet.redis_on(old[0]).kill()
        deadline = time.monotonic() + 90
        while (window := traffic.first_202_after(killed_at)) is None or time.time() - killed_at < window + 8:
            assert time.monotonic() < deadline, "no submit was accepted after the failover"
            time.sleep(0.5)
    finally:
        traffic.halt()
    assert fleet.primary() != old
    during = [a for a in traffic.answers if killed_at < a.sent < killed_at + window]
    print(f"\nfailover window (kill -> first 202): {window:.1f} s; {len(during)} answers in it, "
          f"{sum(a.status == 503 for a in during)} of them 503")  # fmt: skip
    check_answers(traffic.answers)
    check_answers(traffic.polls)
    check_ended_once(fleet, traffic, "/lost")
    assert window < 30, window


def test_a_primary_cut_off_from_sentinels_and_replicas_stops_acknowledging(fleet: Fleet) -> None:
    """The API still reaches it; the Sentinels promote a replica. Without `min-replicas-to-write` and the
    wait for a replica, it would go on answering 202 for jobs that vanish when the partition heals."""
    if fleet.primary()[0] == fleet.redis_host.ip:
        pytest.skip("runs after the primary was lost once")
    # The host lost before comes back as a replica of the current primary: three data nodes again.
    lost = fleet.redis_host
    lost.heal()
    now = fleet.primary()
    fleet.redis.replica_of = f"{now[0]} {now[1]}"
    fleet.redis.start()
    deadline = time.monotonic() + 30
    while fleet.redis_on(now[0]).client().info("replication").get("min_slaves_good_slaves", 0) < 2:
        assert time.monotonic() < deadline, "the old primary did not come back as a replica"
        time.sleep(0.2)
    primary = fleet.host_at(now[0])
    others = [fleet.host_at(x.host) for x in (fleet.redis, *fleet.replicas) if x.host != now[0]]
    others += [fleet.host_at(s.host) for s in fleet.sentinels]
    traffic = Traffic(fleet, "/split")
    try:
        time.sleep(5.0)
        cut_at = time.time()
        for peer in others:  # both ways: neither side hears the other
            primary.cut_path(peer)
            peer.cut_path(primary)
        deadline = time.monotonic() + 90
        while (window := traffic.first_202_after(cut_at)) is None or time.time() - cut_at < window + 8:
            assert time.monotonic() < deadline, "no submit was accepted after the partition"
            time.sleep(0.5)
        # What the cut-off primary holds past this point reached no replica: nothing it acknowledged.
        for peer in others:
            primary.heal_path(peer)
            peer.heal_path(primary)
        healed_at = time.time()
        time.sleep(8.0)
    finally:
        traffic.halt()
    assert fleet.primary() != now
    print(f"\npartition: first 202 after the cut {window:.1f} s; healed {healed_at - cut_at:.1f} s after it")
    check_answers(traffic.answers)
    check_answers(traffic.polls)
    check_ended_once(fleet, traffic, "/split")
