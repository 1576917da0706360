"""The service's own calls to tenants' servers (webhook replies, image URLs) against hostile servers
(`tests/hostile.py`): each call ends by its deadline, reads no more than it must, in bounded memory, and
one tenant's held fetches leave another tenant's submits alone.

Memory is measured in a process of its own, so the figure is the call's and nothing else's: its peak
RSS before and after the call, and the peak of what Python allocated during it (tracemalloc: an unpacked
chunk allocated and dropped may not raise the RSS peak of a process that was bigger before).
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.config import Settings
from shared.errors import Problem
from tests.conftest import auth, b64, isolated, job_body, make_pair, png_bytes, serve
from tests.hostile import Hostile

ROOT = Path(__file__).resolve().parents[1]

_PROBE = """
import json, resource, sys, time, tracemalloc
args = json.loads(sys.argv[1])
from shared.config import Settings
from shared.errors import Problem
from shared import fetch
from workers.io import webhooks

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

settings = Settings(**args["settings"])
fetch._client(settings), webhooks._client(args["timeout"])  # CA bundles loaded before the baseline
base, t0 = peak_mb(), time.monotonic()
tracemalloc.start()
try:
    if args["what"] == "webhook":
        outcome = str(webhooks.attempt_delivery(args["url"], {}, "{}", args["timeout"], True))
    else:
        outcome = "bytes:%d" % len(fetch.fetch_image(args["url"], "image", settings))
except Exception as exc:
    kind = "Problem" if isinstance(exc, Problem) else type(exc).__name__  # a refusal, whatever its class
    outcome = "%s %s %s" % (kind, getattr(getattr(exc, "code", ""), "value", ""), exc)
traced = tracemalloc.get_traced_memory()[1] / 2**20
print(json.dumps({"outcome": outcome, "seconds": time.monotonic() - t0, "grew_mb": peak_mb() - base, "traced_mb": traced}))
"""


def probe(what: str, url: str, settings: Settings, timeout_s: float = 2.0, **update: Any) -> dict[str, Any]:
    """One webhook attempt or image fetch in a fresh process: its outcome, seconds, and peak RSS growth."""
    s = settings.model_copy(update={"fetch_timeout_s": timeout_s, **update}).model_dump(mode="json")
    arg = json.dumps({"what": what, "url": url, "timeout": timeout_s, "settings": s})
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, arg], cwd=ROOT, capture_output=True, text=True, timeout=60
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture
def hostile(request: pytest.FixtureRequest, tls: tuple[Path, Path]) -> Iterator[Hostile]:
    mode, secure = request.param
    server = Hostile(mode, tls if secure else None)
    yield server
    server.stop()


@pytest.mark.parametrize("hostile", [("bomb", False)], indirect=True)
def test_a_gzip_bomb_from_a_webhook_receiver_costs_the_worker_nothing(hostile, settings):
    got = probe("webhook", hostile.url("/hook"), settings)
    assert got["outcome"] == "200", got  # the status is all a delivery needs
    assert got["grew_mb"] < 24 and got["traced_mb"] < 4, got  # the reply unpacks to 256 MB


@pytest.mark.parametrize("hostile", [("header-tarpit", False), ("body-tarpit", False)], indirect=True)
def test_a_webhook_receiver_that_trickles_its_reply_is_cut_at_the_deadline(hostile, settings):
    got = probe("webhook", hostile.url("/hook"), settings, timeout_s=2.0)
    if hostile.mode == "body-tarpit":
        assert got["outcome"] == "200", got  # the status line came in time; the body is not waited for
    else:
        assert got["outcome"].startswith("DeadlineExceeded"), got
    assert got["seconds"] < 4.5, got


@pytest.mark.parametrize("hostile", [("header-tarpit", True), ("body-tarpit", True)], indirect=True)
def test_an_image_url_that_trickles_is_cut_at_the_deadline(hostile, settings):
    got = probe("fetch", hostile.url("/photo.png"), settings, timeout_s=2.0)
    assert got["outcome"].startswith("Problem image_fetch_failed"), got
    assert "longer than 2s" in got["outcome"], got
    assert got["seconds"] < 4.5, got


@pytest.mark.parametrize("hostile", [("bomb", True)], indirect=True)
def test_a_compressed_image_bomb_is_refused_before_it_is_unpacked(hostile, settings):
    got = probe("fetch", hostile.url("/photo.png"), settings, timeout_s=10.0, max_upload_bytes=4 << 20)
    assert got["outcome"].startswith("Problem image_too_large"), got
    # 256 MB unpacked, the cap 4 MB: at most about twice the cap (the unpacker's buffer grows by doubling).
    assert got["traced_mb"] < 12, got


def test_a_compressed_image_under_the_cap_arrives_unpacked(files, settings):
    img, _ = make_pair(64, 48)
    png = png_bytes(img)
    files.files["/gz.png"] = (200, gzip.compress(png), {"content-encoding": "gzip"})
    got = probe("fetch", files.url("/gz.png"), settings)
    assert got["outcome"] == f"bytes:{len(png)}", got
    files.files["/br.png"] = (200, png, {"content-encoding": "br"})
    got = probe("fetch", files.url("/br.png"), settings)
    assert got["outcome"].startswith("Problem image_fetch_failed"), got


@pytest.fixture
def api_with_tarpit(settings: Settings, tls: tuple[Path, Path]) -> Iterator[tuple[str, Hostile, Settings]]:
    from api.app import create_app

    s = isolated(settings, 14).model_copy(update={"fetch_timeout_s": 6.0, "fetch_tenant_share": 8})
    tarpit = Hostile("header-tarpit", tls)
    try:
        with serve(create_app(s)) as base:
            yield base, tarpit, s
    finally:
        tarpit.stop()


def test_one_tenants_tarpit_fetches_leave_another_tenants_submits_alone(api_with_tarpit):
    base, tarpit, s = api_with_tarpit
    _, mask = make_pair(64, 48)
    held = {"prompt": "x", "image": tarpit.url("/photo.png"), "mask": b64(png_bytes(mask))}
    answers: list[httpx.Response] = []

    def alice() -> None:
        with httpx.Client(base_url=base, timeout=60) as c:
            answers.append(c.post("/v1/jobs", headers=auth("alice"), json=held))

    with ThreadPoolExecutor(40) as pool:
        for _ in range(40):
            pool.submit(alice)
        deadline = time.monotonic() + 5
        while tarpit.connections < s.fetch_tenant_share and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # alice's other 32 submits are in by now, waiting for her share
        assert tarpit.connections == s.fetch_tenant_share, tarpit.connections  # her share, and no more
        with httpx.Client(base_url=base, timeout=5) as c:
            t0 = time.monotonic()
            r = c.post("/v1/jobs", headers=auth("bob"), json=job_body())
            bob_s = time.monotonic() - t0
        assert r.status_code == 202, r.text
        assert bob_s < 1.0, f"bob's submit took {bob_s:.2f}s while alice's fetches were held"
    # Alice's work ends with a clear error: her fetch's deadline, or her turn not coming in time.
    codes = {(a.status_code, a.json()["error"]["code"]) for a in answers}
    assert codes <= {(400, "image_fetch_failed"), (429, "too_many_fetches")}, codes
    assert all(a.headers.get("retry-after") for a in answers if a.status_code == 429)
    assert len(answers) == 40


def test_no_outbound_connection_outlives_its_call():
    """A pool keyed by address would carry one host name's TLS session to another host on the same
    address: every call has a connection of its own, even to a receiver that keeps connections alive."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from workers.io import webhooks

    opened: list[object] = []

    class KeepAlive(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            opened.append(self.client_address)
            super().setup()

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["content-length"]))
            self.send_response(204)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), KeepAlive)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for path in ("/a", "/b", "/c"):
            url = f"http://127.0.0.1:{server.server_address[1]}{path}"
            assert webhooks.attempt_delivery(url, {}, "{}", 5.0, True) == 204
        assert len(opened) == 3, opened
    finally:
        server.shutdown()
        server.server_close()


def test_a_cancelled_request_keeps_its_fetch_slot_until_the_fetch_ends(settings, tls):
    """The fetch's thread runs on after its request went away: its slot is the tenant's until it ends,
    or a tenant whose requests are cancelled would hold the whole pool."""
    import asyncio

    from shared import fetch

    s = settings.model_copy(update={"fetch_tenant_share": 1, "fetch_timeout_s": 3.0})
    tarpit = Hostile("header-tarpit", tls)

    async def scenario() -> tuple[int, int]:
        first = asyncio.create_task(fetch.fetch_all([(tarpit.url("/a.png"), "image")], "carol", s))
        while tarpit.connections < 1:
            await asyncio.sleep(0.05)
        first.cancel()
        second = asyncio.create_task(fetch.fetch_all([(tarpit.url("/b.png"), "image")], "carol", s))
        await asyncio.sleep(1.0)
        during = tarpit.connections  # the first fetch's thread still runs: the second waits its turn
        try:
            await second
        except Problem:
            pass  # the tarpit's deadline
        return during, tarpit.connections

    try:
        during, after = asyncio.run(scenario())
    finally:
        tarpit.stop()
    assert during == 1, during
    assert after == 2, after
