"""Outbound URLs (webhooks, image URLs) and the production guard, tried the way a hostile tenant would:
a DNS server that never answers, addresses every Python version should refuse, ports, an error text
that would tell a private address from a missing name, and the operator endpoints of the API."""

from __future__ import annotations

import json
import shutil
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from api.app import create_app
from shared import netguard
from shared.config import Settings
from stack.netbed import Netbed, available
from tests.conftest import ROOT, auth, isolated, job_body

# 1. One tenant's names that never resolve hold the resolver of every tenant

STALL, GOOD_ADDR = "stall", "198.18.0.77"  # names starting "stall" are never answered


def dns_answer(query: bytes) -> bytes | None:
    """A reply to one DNS query: an A record for good names, nothing for AAAA, NXDOMAIN for `nx…`,
    None (silence) for the names that stall."""
    qid, qd_end = query[:2], 12
    labels = []
    while query[qd_end]:
        n = query[qd_end]
        labels.append(query[qd_end + 1 : qd_end + 1 + n].decode())
        qd_end += 1 + n
    qtype = struct.unpack("!H", query[qd_end + 1 : qd_end + 3])[0]
    question = query[12 : qd_end + 5]
    name = ".".join(labels).lower()
    if name.startswith(STALL):
        return None
    if name.startswith("nx"):
        return qid + struct.pack("!HHHHH", 0x8183, 1, 0, 0, 0) + question
    if qtype != 1:  # AAAA and the rest: no such record
        return qid + struct.pack("!HHHHH", 0x8180, 1, 0, 0, 0) + question
    answer = struct.pack("!HHHIH", 0xC00C, 1, 1, 0, 4) + socket.inet_aton(GOOD_ADDR)
    return qid + struct.pack("!HHHHH", 0x8180, 1, 1, 0, 0) + question + answer


class DnsServer:
    """A UDP DNS server on the bed's own address (port 53), answering by `dns_answer`."""

    def __init__(self, ip: str):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((ip, 53))
        self.sock.settimeout(0.2)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                query, peer = self.sock.recvfrom(512)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                reply = dns_answer(query)
            except (IndexError, struct.error, UnicodeDecodeError):
                continue
            if reply is not None:
                self.sock.sendto(reply, peer)

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(5)
        self.sock.close()


# Runs on a host of the bed, whose resolver is the server above: 12 lookups of names that never answer
# from tenant `mallory` (all at once), one more once they are back, then one of a good name from `alice`.
PROBE = """
import inspect, json, time
from concurrent.futures import ThreadPoolExecutor
from shared import netguard

tenanted = "tenant" in inspect.signature(netguard.check_url).parameters

def check(url, tenant):
    kw = {"tenant": tenant} if tenanted else {}
    started = time.monotonic()
    try:
        netguard.check_url(url, True, 1.0, **kw)
        out = "ok"
    except Exception as exc:
        out = f"{type(exc).__name__}: {exc}"
    return out, round(time.monotonic() - started, 3)

with ThreadPoolExecutor(12) as pool:
    hostile = list(pool.map(lambda i: check(f"https://stall{i}.test/hook", "mallory"), range(12)))
again = check("https://stall-again.test/hook", "mallory")
good = check("https://good.test/hook", "alice")
print(json.dumps({"hostile": hostile, "again": again, "good": good}))
"""


@pytest.fixture
def dns_host() -> Iterator[list[str]]:
    """A host of a bed whose only DNS server is `DnsServer`: the command prefix that runs on it."""
    why = available()
    if why:  # CI runs as root: this must run there, so say why it cannot, loudly
        pytest.fail(f"the network test bed {why}")
    bed = Netbed().up()
    server = None
    etc = None
    try:
        host = bed.host("dns", 2)
        server = DnsServer(bed.driver_ip)
        etc = Path("/etc/netns") / host.ns  # `ip netns exec` mounts this resolv.conf over /etc's
        etc.mkdir(parents=True)
        (etc / "resolv.conf").write_text(f"nameserver {bed.driver_ip}\noptions timeout:5 attempts:2\n")
        yield host.prefix
    finally:
        if server is not None:
            server.stop()
        if etc is not None:
            shutil.rmtree(etc, ignore_errors=True)
        bed.down()


def test_names_that_never_resolve_hold_only_their_tenants_share_of_the_resolver(dns_host):
    env = {"PATH": "/usr/bin:/bin", "INPAINT_DNS_TENANT_SHARE": "2", "INPAINT_DNS_CONCURRENCY": "32"}
    python = str(ROOT / ".venv" / "bin" / "python")
    done = subprocess.run([*dns_host, python, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(got, indent=1))
    good_outcome, good_s = got["good"]
    assert good_outcome == "ok" and good_s < 5, got  # another tenant's name resolves despite the stalls
    # The stalled tenant is told to come back (retryable), not that its URL is forbidden for good.
    assert all(out.startswith("DnsUnavailable") for out, _ in got["hostile"]), got
    again_outcome, again_s = got["again"]
    # Its lookups still run after their callers gave up: they still count, so the next one fails fast.
    assert again_outcome.startswith("DnsUnavailable") and again_s < 0.9, got
    assert not issubclass(netguard.DnsUnavailable, netguard.UrlForbidden)


def test_a_stalled_dns_at_submit_is_a_503_with_retry_after(settings, monkeypatch):
    def stalled(*_: object) -> None:
        raise netguard.DnsUnavailable("host 'x' did not resolve in time; retry shortly")

    monkeypatch.setattr(netguard, "_lookup", stalled)
    s = isolated(settings, 13).model_copy(update={"webhook_allow_private": False})
    with TestClient(create_app(s)) as c:
        r = c.post("/v1/jobs", headers=auth(), json=job_body(webhook="https://hooks.example/h"))
    assert r.status_code == 503 and r.json()["error"]["code"] == "dns_unavailable", r.text
    assert int(r.headers["retry-after"]) >= 1


def test_a_delivery_whose_host_did_not_resolve_in_time_is_retried(svc, monkeypatch):
    from shared import keys
    from shared.jobs.deliveries import Delivery
    from shared.jobs.record import new_job_id
    from workers.io.webhooks import deliver

    def stalled(*_: object) -> None:
        raise netguard.DnsUnavailable("host 'hooks.example' did not resolve within 2s")

    monkeypatch.setattr(netguard, "_lookup", stalled)
    job_id = new_job_id()
    d = Delivery(job_id, "alice", "https://hooks.example/h", "msg_dns", "job.started", "now", {"id": job_id})
    assert deliver(svc, d) is not None  # a delay: retried on the schedule, not dropped
    log = [json.loads(e) for e in svc.r.lrange(keys.deliveries(job_id), 0, -1)]
    assert log[-1]["outcome"] == "retrying" and "dns" in log[-1]["error"], log


# 2. Addresses, ports and schemes

EDGES = [
    "http://192.0.0.9/hook", "http://[fec0::1]/hook", "http://168.63.129.16/hook", "http://192.88.99.1/hook",
    "http://198.51.100.7/hook", "http://203.0.113.9/hook", "http://198.19.255.1/hook", "http://240.0.0.1/hook",
    "http://[64:ff9b::a00:1]/hook", "http://[2002:a00:1::]/hook", "http://[::ffff:169.254.169.254]/hook",
    "http://[100::1]/hook", "http://[2001:db8::1]/hook", "http://[2001::1]/hook", "http://[fd00::1]/hook",
    "http://[ff02::1]/hook", "http://[::]/hook",
]  # fmt: skip


@pytest.mark.parametrize("url", EDGES)
def test_special_purpose_addresses_are_refused_whatever_the_python(url):
    with pytest.raises(netguard.UrlForbidden):
        netguard.check_url(url)


def test_only_the_usual_ports_unless_private_addresses_are_allowed():
    # Parsed and checked only: a literal address resolves without a packet, and nothing connects.
    with pytest.raises(netguard.UrlForbidden, match="port"):
        netguard.check_url("https://93.184.216.34:22/hook")
    with pytest.raises(netguard.UrlForbidden, match="port"):
        netguard.check_url("https://93.184.216.34:6379/hook")
    for url in ("https://93.184.216.34/hook", "https://93.184.216.34:8443/hook", "http://93.184.216.34/hook"):
        assert netguard.check_url(url).addresses == ("93.184.216.34",)
    assert netguard.check_url("http://127.0.0.1:6379/hook", allow_private=True).port == 6379  # the suite's hosts


def test_one_text_for_a_private_address_and_a_name_that_does_not_resolve(monkeypatch):
    with pytest.raises(netguard.UrlForbidden) as private:
        netguard.check_url("https://10.1.2.3/hook")

    def nxdomain(host: str, port: int) -> list[object]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(netguard, "_resolve", nxdomain)
    with pytest.raises(netguard.UrlForbidden) as missing:
        netguard.check_url("https://10.1.2.3/hook")
    assert str(private.value) == str(missing.value)


def test_webhooks_are_https_only_in_production(settings):
    s = isolated(settings, 13).model_copy(update={"environment": "production", "webhook_allow_private": False})
    with TestClient(create_app(s)) as c:
        r = c.post("/v1/jobs", headers=auth(), json=job_body(webhook="http://93.184.216.34/hook"))
    assert r.status_code == 422 and r.json()["error"]["code"] == "webhook_url_forbidden", r.text
    assert "https" in r.json()["error"]["message"]


# 3. The production guard and the operator endpoints

PRODUCTION = {
    "s3_secret_access_key": "a-real-long-secret-0123456789",
    "secrets_key": "b" * 43 + "=",
    "model": "sd2-inpainting",
}


@pytest.mark.parametrize("flag", ["webhook_allow_private", "fetch_allow_private"])
def test_production_refuses_private_outbound_addresses(flag):
    Settings(environment="production", **PRODUCTION, _env_file=None)  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match=flag.upper()):
        Settings(environment="production", **PRODUCTION, **{flag: True}, _env_file=None)  # type: ignore[call-arg]


def test_production_metrics_and_readiness_detail_are_not_public(settings):
    s = isolated(settings, 13).model_copy(update={"environment": "production"})
    with TestClient(create_app(s)) as c:
        assert c.get("/metrics").status_code == 404
        ready = c.get("/readyz")
        # Only what the page shows anyone (the auth mode announces the open mode): no models, no workers.
        assert set(ready.json()) == {"status", "auth"}, ready.text


def test_the_metrics_token_opens_metrics_and_readiness_detail(settings):
    s = isolated(settings, 13).model_copy(update={"metrics_token": "m-token-0123456789"})
    with TestClient(create_app(s)) as c:
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert set(c.get("/readyz").json()) == {"status", "auth"}
        token = {"Authorization": "Bearer m-token-0123456789"}
        assert "text/plain" in c.get("/metrics", headers=token).headers["content-type"]
        assert "checks" in c.get("/readyz", headers=token).json()
