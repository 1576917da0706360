"""SSRF guard for webhook URLs: http(s) only, and every address the host resolves to must be public.

Names resolve in a small pool of their own with a timeout: a slow or hostile DNS server can hold
those threads, never the threads that serve requests.
"""

from __future__ import annotations

import ipaddress
import socket
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

_resolver = ThreadPoolExecutor(max_workers=8, thread_name_prefix="dns")


class UrlForbidden(ValueError):
    """The URL may not receive webhooks."""


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str
    port: int
    addresses: tuple[str, ...]


def _public(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(addr, ipaddress.IPv6Address):
        # ::ffff:127.0.0.1 and friends are judged by the IPv4 address they carry.
        mapped = addr.ipv4_mapped or addr.sixtofour
        if mapped is not None:
            return _public(mapped)
    return addr.is_global and not (addr.is_multicast or addr.is_unspecified or addr.is_reserved)


def _resolve(host: str, port: int) -> list[Any]:
    return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)


def check_url(url: str, allow_private: bool = False, timeout_s: float = 2.0) -> Target:
    """Resolve `url` and refuse it unless it is http(s) to public addresses only (or private is allowed)."""
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        raise UrlForbidden("webhook URLs may not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
        httpx.URL(url)  # what cannot be sent must not be accepted
    except (ValueError, httpx.InvalidURL) as exc:
        raise UrlForbidden(f"not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise UrlForbidden("webhook URLs must be http or https")
    if not parts.hostname:
        raise UrlForbidden("webhook URL has no host")
    if parts.username or parts.password:
        raise UrlForbidden("webhook URLs may not carry credentials")
    port = port or (443 if parts.scheme == "https" else 80)
    pending = _resolver.submit(_resolve, parts.hostname, port)
    try:
        infos = pending.result(timeout=timeout_s)
    except FutureTimeout:
        pending.cancel()  # still queued behind slow lookups: never run it
        raise UrlForbidden(f"host {parts.hostname!r} did not resolve within {timeout_s:g}s") from None
    except (socket.gaierror, UnicodeError, OSError):
        raise UrlForbidden(f"host {parts.hostname!r} does not resolve") from None
    addresses = tuple(dict.fromkeys(str(info[4][0]) for info in infos))
    if not allow_private:
        for a in addresses:
            if not _public(ipaddress.ip_address(a.split("%")[0])):
                raise UrlForbidden(f"host {parts.hostname!r} resolves to a non-public address")
    return Target(parts.scheme, parts.hostname, port, addresses)
