"""SSRF guard for outbound URLs (webhooks, image URLs): the allowed schemes and ports only, and every
address the host resolves to must be public, judged by an explicit list of special-purpose ranges
(not by what this Python's `ipaddress` happens to know).

Every refusal of an address or a name has the same text: a caller cannot tell a private address from a
name that does not exist. Names resolve on threads of their own with a deadline, and one tenant's
lookups hold at most `INPAINT_DNS_TENANT_SHARE` of them at once, counting lookups still running after
their caller gave up: a DNS server that never answers costs its tenant its share, never another
tenant's lookups. A lookup past its deadline or beyond the share is `DnsUnavailable` (retry later),
not `UrlForbidden` (final).
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Collection
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from shared.config import Settings, get_settings
from shared.errors import Code, Problem
from shared.shares import Shares

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class UrlForbidden(ValueError):
    """The URL may not be called, now or later."""


class DnsUnavailable(Exception):
    """The name could not be resolved in time, or its tenant's share of the resolver is full: retry later."""

    def problem(self, field: str) -> Problem:
        """What a submit answers: 503 with Retry-After (the DNS's fault, not the URL's)."""
        return Problem(503, Code.dns_unavailable, f"`{field}`: {self}; retry shortly", field,
                       headers={"Retry-After": "5"})  # fmt: skip


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str
    port: int
    addresses: tuple[str, ...]


@dataclass(frozen=True)
class Rules:
    """What an outbound URL may be: its schemes, its ports (80 joins where http is allowed), and whether
    private addresses (and then any port) are allowed; `timeout_s` bounds its DNS lookup."""

    schemes: tuple[str, ...] = ("http", "https")
    ports: frozenset[int] = frozenset({443, 8443})
    allow_private: bool = False
    timeout_s: float = 2.0


def webhook_rules(s: Settings) -> Rules:
    """Webhook URLs: https only in production, http too elsewhere."""
    schemes = ("https",) if s.environment == "production" else ("http", "https")
    return Rules(schemes, frozenset(s.outbound_port_list()), s.webhook_allow_private, s.dns_timeout_s)


def image_rules(s: Settings) -> Rules:
    """Image URLs: https only, everywhere."""
    return Rules(("https",), frozenset(s.outbound_port_list()), s.fetch_allow_private, s.dns_timeout_s)


# IANA special-purpose ranges that are never a webhook receiver or an image host, whatever this Python's
# `ipaddress` says (192.0.0.0/24, fec0::/10 and 168.63.129.16 pass as global on some versions).
_DENIED = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
        "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15",
        "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
        "168.63.129.16/32",  # Azure's host endpoint (DNS, metadata, health): public-looking, never a receiver
        "::/128", "::1/128", "100::/64", "2001::/23", "2001:db8::/32", "fc00::/7", "fe80::/10", "fec0::/10",
        "ff00::/8",
    )
)  # fmt: skip
_MAPPED = ipaddress.ip_network("::ffff:0:0/96")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SIXTOFOUR = ipaddress.ip_network("2002::/16")


def _carried(addr: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv4-mapped, NAT64 or 6to4 address leads to (what a connection reaches)."""
    n = int(addr)
    if addr in _MAPPED or addr in _NAT64:
        return ipaddress.IPv4Address(n & 0xFFFFFFFF)
    if addr in _SIXTOFOUR:
        return ipaddress.IPv4Address((n >> 80) & 0xFFFFFFFF)
    return None


def public(addr: IPAddress) -> bool:
    """Whether `addr` is a public unicast address (an address that carries an IPv4 one is judged by it)."""
    if isinstance(addr, ipaddress.IPv6Address):
        carried = _carried(addr)
        if carried is not None:
            return public(carried)
    if any(addr.version == net.version and addr in net for net in _DENIED):
        return False
    return addr.is_global and not (addr.is_multicast or addr.is_unspecified or addr.is_reserved)


def _resolve(host: str, port: int) -> list[Any]:
    return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)


_lookups = Shares()  # resolver threads running, per tenant: a lookup counts until it ends, not until
# its caller stops waiting


def _lookup(host: str, port: int, tenant: str, timeout_s: float) -> list[Any]:
    """`getaddrinfo` on a thread of its own within `timeout_s`, within the tenant's share of the process's
    lookups (its bounds are the process's settings: the resolver is the process's)."""
    s = get_settings()
    if not _lookups.take(tenant, s.dns_tenant_share, s.dns_concurrency):
        raise DnsUnavailable(f"too many lookups are running, yours or all; host {host!r} not resolved")
    done: Future[list[Any]] = Future()

    def run() -> None:
        try:
            done.set_result(_resolve(host, port))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, who sorts it
            done.set_exception(exc)
        finally:
            _lookups.give_back(tenant)

    try:
        # A daemon thread: a lookup that never ends must not hold the process at exit either.
        threading.Thread(target=run, name="dns", daemon=True).start()
    except BaseException:
        _lookups.give_back(tenant)  # never started: it holds nothing
        raise
    try:
        return done.result(timeout=timeout_s)
    except FutureTimeout:
        raise DnsUnavailable(f"host {host!r} did not resolve within {timeout_s:g}s") from None


# getaddrinfo's answers that say the resolver failed (a SERVFAIL, a timeout), not that the name is absent.
_TRANSIENT = frozenset(
    e for e in (getattr(socket, n, None) for n in ("EAI_AGAIN", "EAI_FAIL", "EAI_SYSTEM", "EAI_MEMORY")) if e
)


def check_url(
    url: str,
    allow_private: bool = False,
    timeout_s: float = 2.0,
    *,
    tenant: str | None = None,
    rules: Rules | None = None,
) -> Target:
    """Resolve `url` (as `tenant`) and refuse it unless it keeps to `rules` (by default: http(s), ports
    443, 8443 and 80 for http, public addresses only, or any address and port with `allow_private`)."""
    rules = rules or Rules(allow_private=allow_private, timeout_s=timeout_s)
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        raise UrlForbidden("URLs may not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
        httpx.URL(url)  # what cannot be sent must not be accepted
    except (ValueError, httpx.InvalidURL) as exc:
        raise UrlForbidden(f"not a valid URL: {exc}") from None
    if parts.scheme not in rules.schemes:
        raise UrlForbidden(f"URLs must be {' or '.join(rules.schemes)}")
    if not parts.hostname:
        raise UrlForbidden("the URL has no host")
    if parts.username or parts.password:
        raise UrlForbidden("URLs may not carry credentials")
    port = port or (443 if parts.scheme == "https" else 80)
    if not rules.allow_private:
        _check_port(port, rules.ports, "http" in rules.schemes)
    # One text for every refusal of a name or an address: no oracle of what exists inside.
    refused = f"host {parts.hostname!r} is not a public address"
    try:
        # An address needs no lookup: it never takes a place in its tenant's share of the resolver.
        infos = [(None, None, None, "", (str(ipaddress.ip_address(parts.hostname)), port))]
    except ValueError:
        infos = None
    try:
        infos = infos or _lookup(parts.hostname, port, tenant or "", rules.timeout_s)
    except socket.gaierror as exc:
        if exc.errno in _TRANSIENT:  # the resolver failed, not the name: try again later
            raise DnsUnavailable(f"host {parts.hostname!r} could not be resolved now") from None
        raise UrlForbidden(refused) from None
    except (UnicodeError, OSError):
        raise UrlForbidden(refused) from None
    addresses = tuple(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise UrlForbidden(refused)
    if not rules.allow_private:
        for a in addresses:
            if not public(ipaddress.ip_address(a.split("%")[0])):
                raise UrlForbidden(refused)
    return Target(parts.scheme, parts.hostname, port, addresses)


def _check_port(port: int, ports: Collection[int], http: bool) -> None:
    allowed = set(ports) | ({80} if http else set())
    if port not in allowed:
        raise UrlForbidden(f"port {port} is not allowed (allowed: {', '.join(map(str, sorted(allowed)))})")
