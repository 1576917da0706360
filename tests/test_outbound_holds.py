"""Connections a tenant holds open (event streams and waits): one budget per tenant, and a revoked key's
held connections end within seconds."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from api import holds
from api.app import create_app
from shared import keys, quotas
from shared.auth import Authenticator, KeyStore, hash_key
from shared.config import Settings
from shared.db import connect
from tests.conftest import auth, isolated, job_body, make_pair, png_bytes, serve

CAP = 4
WAITS = 100  # one tenant's concurrent waits against a cap of CAP
WAIT_S = 15  # how long each asks to wait: long enough that a refusal is clearly up front, on a busy CPU


@pytest.fixture(scope="module")
def held_api(settings: Settings) -> Iterator[tuple[str, Settings]]:
    """The API on uvicorn (held connections stay open) over a Redis database no worker consumes: its jobs
    never end, so every wait lasts its whole length."""
    s = isolated(settings, 13).model_copy(update={"max_streams_per_tenant": CAP, "score_timeout_s": 8.0})
    with serve(create_app(s)) as base:
        yield base, s


def _wait_submit(base: str, headers: dict[str, str], wait_s: int) -> tuple[int, dict[str, Any], dict[str, str], float]:
    t0 = time.monotonic()
    r = httpx.post(f"{base}/v1/jobs", json=job_body(), headers={**headers, "Prefer": f"wait={wait_s}"}, timeout=30)
    return r.status_code, r.json(), dict(r.headers), time.monotonic() - t0


def test_waits_past_the_tenants_budget_are_429_while_another_tenant_is_served(held_api):
    base, _ = held_api
    with ThreadPoolExecutor(WAITS + 1) as pool:
        alices = [pool.submit(_wait_submit, base, auth(), WAIT_S) for _ in range(WAITS)]
        time.sleep(0.5)  # alice's waits arrive first
        bob = pool.submit(_wait_submit, base, auth("bob"), 2)
        answers = [f.result() for f in alices]
        bob_status, bob_body, _, bob_s = bob.result()
    refused = [a for a in answers if a[0] == 429]
    served = [a for a in answers if a[0] == 202]
    assert len(refused) == WAITS - CAP and len(served) == CAP, [(a[0], a[1].get("error")) for a in answers]
    for _, body, headers, took in refused:
        assert body["error"]["code"] == "too_many_waits" and int(headers["retry-after"]) >= 1
        assert took < WAIT_S - 3, f"a refused wait took {took:.1f}s"  # refused up front, not after a wait
    assert all(took >= WAIT_S - 1 for *_, took in served)  # the jobs never end: each waited its whole length
    assert bob_status == 202 and bob_s >= 1.5, (bob_status, bob_body)  # another tenant waits as asked
    slowest = max(took for *_, took in refused)
    print(f"\n{WAITS} waits, cap {CAP}: {len(refused)} refused (slowest {slowest:.2f}s), bob waited {bob_s:.1f}s")


def test_streams_and_every_kind_of_wait_share_the_budget(held_api):
    """A stream, a /score and two job waits fill the budget; then every kind of wait, a replayed submit
    and another stream are refused."""
    base, s = held_api
    r = connect(s.redis_url)
    with ThreadPoolExecutor(4) as pool, httpx.Client(base_url=base, timeout=30) as c:
        job = c.post("/v1/jobs", headers=auth(), json=job_body()).json()["id"]
        c.post("/v1/jobs", headers={**auth(), "Idempotency-Key": "k1"}, json=job_body())
        before = r.zcard(keys.tenant_jobs("alice"))
        with c.stream("GET", f"/v1/jobs/{job}/events", headers=auth()) as stream:
            assert stream.status_code == 200
            img, mask = make_pair(64, 48)
            row = {"prompt": "x", "image": job_body()["image"], "mask_image": job_body()["mask"]}
            holders = [
                pool.submit(
                    httpx.post, f"{base}/score", json={"input_data": {"data": [row]}}, headers=auth(), timeout=30
                ),
                pool.submit(_wait_submit, base, auth(), 8),
                pool.submit(_wait_submit, base, auth(), 8),
            ]
            deadline = time.monotonic() + 10
            while r.zcard(keys.tenant_jobs("alice")) < before + 3:  # the holders' jobs exist: they wait
                assert time.monotonic() < deadline, "the holders never started waiting"
                time.sleep(0.05)
            time.sleep(0.3)
            wait1 = {**auth(), "Prefer": "wait=1"}
            edit_files = {
                "image": ("i.png", png_bytes(img.convert("RGBA")), "image/png"),
                "mask": ("m.png", png_bytes(mask.convert("RGBA")), "image/png"),
            }
            probes: dict[str, Callable[[], httpx.Response]] = {
                "jobs": lambda: c.post("/v1/jobs", headers=wait1, json=job_body()),
                "replay": lambda: c.post("/v1/jobs", headers={**wait1, "Idempotency-Key": "k1"}, json=job_body()),
                "predictions": lambda: c.post("/v1/models/x/y/predictions", headers=wait1, json={"input": {}}),
                "edits": lambda: c.post("/v1/images/edits", headers=auth(), data={"prompt": "x"}, files=edit_files),
                "score": lambda: c.post("/score", json={"input_data": {"data": [row]}}, headers=auth()),
                "stream": lambda: c.get(f"/v1/jobs/{job}/events", headers=auth(), timeout=5),
            }  # fmt: skip
            for kind, probe in probes.items():
                resp = probe()
                want = "too_many_streams" if kind == "stream" else "too_many_waits"
                seen = (kind, resp.status_code, resp.text[:200])
                assert resp.status_code == 429 and resp.headers.get("Retry-After"), seen
                assert resp.json()["error"]["code"] == want, seen
            assert c.post("/v1/jobs", headers={**auth("bob"), "Prefer": "wait=1"}, json=job_body()).status_code == 202
        done = [f.result() for f in holders]
        assert done[0].status_code == 504  # /score: its job never ends
        # Everything given back: alice may wait again.
        assert c.post("/v1/jobs", headers={**auth(), "Prefer": "wait=1"}, json=job_body()).status_code == 202


def test_every_listed_key_id_can_be_revoked(held_api):
    """Keys of an earlier release (a bare tenant, listed as `legacy_…`) are revoked by that id too."""
    _, s = held_api
    r = connect(s.redis_url)
    store = KeyStore(r)
    old = "ink_an-old-release-key-0123456789"
    r.hset(keys.api_keys(), hash_key(old), "dave")
    new_info, new = store.create("dave")
    authn = Authenticator("keys", {}, store)
    assert authn.tenant_for(old) == authn.tenant_for(new) == "dave"
    for info in store.list("dave"):
        assert store.revoke(info.id), f"{info.id} is listed but cannot be revoked"
    assert authn.tenant_for(old) is None and authn.tenant_for(new) is None
    assert store.list("dave") == [] and not store.revoke(new_info.id)


def test_a_revoked_key_ends_its_streams_and_waits_within_seconds(held_api):
    base, s = held_api
    r = connect(s.redis_url)
    store = KeyStore(r)
    info, key = store.create("carol")
    carol = {"Authorization": f"Bearer {key}"}

    def waited() -> tuple[int, float]:
        try:
            resp = httpx.post(f"{base}/v1/jobs", json=job_body(), headers={**carol, "Prefer": "wait=30"}, timeout=12)
        except httpx.ReadTimeout:
            return -1, time.monotonic()
        return resp.status_code, time.monotonic()

    with httpx.Client(base_url=base, timeout=12) as c, ThreadPoolExecutor(1) as pool:
        job = c.post("/v1/jobs", headers=carol, json=job_body()).json()["id"]
        with c.stream("GET", f"/v1/jobs/{job}/events", headers=carol) as stream:
            assert stream.status_code == 200
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("event:")) == "event: status"
            wait = pool.submit(waited)
            deadline = time.monotonic() + 10
            while len(r.zrange(keys.tenant_jobs("carol"), 0, -1)) < 2:  # the wait's job exists: it waits
                assert time.monotonic() < deadline, "the wait never started"
                time.sleep(0.05)
            time.sleep(0.3)
            assert store.revoke(info.id)
            revoked = time.monotonic()
            try:
                for _ in lines:
                    pass
                ended: float | str = time.monotonic() - revoked
            except httpx.ReadTimeout:
                ended = f"still open {time.monotonic() - revoked:.1f}s after the revocation"
        status, at = wait.result()
    assert isinstance(ended, float) and ended < 5, ended
    assert status == 401 and at - revoked < 5, f"the wait answered {status} {at - revoked:.1f}s after the revocation"
    print(f"\nafter the revocation: the stream ended in {ended:.2f}s, the wait answered 401 in {at - revoked:.2f}s")


def test_a_wait_keeps_its_place_while_its_body_arrives_slowly(held_api, monkeypatch):
    """A wait's place lasts as long as its request, however slowly the body comes: a place that lapsed
    under a connection still held would let a tenant hold more than its cap (slow uploads)."""
    base, s = held_api
    monkeypatch.setattr(holds, "STALE_S", 0.5)  # short leases: the test lasts seconds, not minutes
    monkeypatch.setattr(holds, "RENEW_S", 0.5)
    monkeypatch.setattr(quotas, "HOLD_LEASE_S", 3.0)
    r = connect(s.redis_url)
    _, key = KeyStore(r).create("erin")

    def slow_body() -> Iterator[bytes]:
        yield b'{"input": {'
        time.sleep(7)  # more than two leases
        yield b"}}"

    headers = {"Authorization": f"Bearer {key}", "Prefer": "wait=1", "Content-Type": "application/json"}
    live: list[tuple[float, int]] = []  # (when, places not lapsed)
    with ThreadPoolExecutor(1) as pool:
        post = pool.submit(httpx.post, f"{base}/v1/models/x/y/predictions", content=slow_body(), headers=headers,
                           timeout=30)  # fmt: skip
        while not post.done():
            live.append((time.monotonic(), r.zcount(keys.held("erin"), time.time(), "+inf")))
            time.sleep(0.1)
        post.result()
        ended = time.monotonic()
    taken = next(t for t, n in live if n == 1)
    lapsed = next((t for t, n in live if t > taken and n == 0), ended)
    assert ended - lapsed < 1, f"the place lapsed {lapsed - taken:.1f}s into a {ended - taken:.1f}s upload"
    print(f"\na {ended - taken:.1f}s upload held its place throughout (leases of 3 s)")
