"""SSRF guard for webhook URLs: http(s) only, and every address the host resolves to must be public."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit


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


def check_url(url: str, allow_private: bool = False) -> Target:
    """Resolve `url` and refuse it unless it is http(s) to public addresses only (or private is allowed)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UrlForbidden(f"not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise UrlForbidden("webhook URLs must be http or https")
    if not parts.hostname:
        raise UrlForbidden("webhook URL has no host")
    if parts.username or parts.password:
        raise UrlForbidden("webhook URLs may not carry credentials")
    port = port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError):
        raise UrlForbidden(f"host {parts.hostname!r} does not resolve") from None
    addresses = tuple(dict.fromkeys(str(info[4][0]) for info in infos))
    if not allow_private:
        for a in addresses:
            if not _public(ipaddress.ip_address(a.split("%")[0])):
                raise UrlForbidden(f"host {parts.hostname!r} resolves to a non-public address")
    return Target(parts.scheme, parts.hostname, port, addresses)
