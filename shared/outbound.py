"""Calls the service makes on a tenant's behalf (webhook deliveries, image URLs): each under a wall-clock
deadline, on a connection of its own, reading no more than it must.

httpx's timeouts bound each read, so a server that sends a byte every few seconds holds a call for ever.
Here a timer shuts the call's socket down at its deadline, whatever the call is doing then (connecting,
TLS, headers or body): the deadline is kept from outside the reads. No connection outlives its call: a
pool keyed by address would carry one host name's TLS session to another host on the same address.
Nothing is decompressed unasked: `read_capped` counts the bytes on the wire, and unpacks gzip or
deflate only up to a cap, before it allocates more.
"""

from __future__ import annotations

import socket
import ssl
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from shared.netguard import Target

WIRE_CHUNK = 64 * 1024


class DeadlineExceeded(httpx.TimeoutException):
    """The call as a whole took longer than its deadline."""


class TooLarge(Exception):
    """The body, on the wire or unpacked, is over its cap."""


class UnsupportedEncoding(Exception):
    """The body is packed in a way that is not unpacked here (only gzip and deflate are)."""


def client(verify: ssl.SSLContext | bool = True, op_timeout_s: float = 10.0) -> httpx.Client:
    """A client for tenants' URLs: no redirects, no proxy from the environment, no connection kept."""
    return httpx.Client(
        verify=verify,
        follow_redirects=False,  # a 3xx is an answer, never a hop to another host
        trust_env=False,
        timeout=httpx.Timeout(op_timeout_s, connect=min(5.0, op_timeout_s)),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=0),
    )


class _Watch:
    """Shuts the call's socket down once its deadline passes (a duplicate of the socket is kept: TLS
    detaches the original, and a shutdown reaches every descriptor of the connection)."""

    def __init__(self, deadline_s: float):
        self.expired = False
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(deadline_s, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def trace(self, event: str, info: dict[str, Any]) -> None:
        if event == "connection.connect_tcp.complete":
            sock = info["return_value"].get_extra_info("socket")
            with self._lock:
                self._sock = sock.dup()
                if self.expired:
                    self._shut()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            self._shut()

    def _shut(self) -> None:
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # already closed by its peer
                pass

    def close(self) -> None:
        self._timer.cancel()
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


@contextmanager
def call(
    http: httpx.Client,
    method: str,
    url: str,
    target: Target,
    *,
    deadline_s: float,
    headers: dict[str, str],
    content: bytes | None = None,
) -> Iterator[httpx.Response]:
    """The response, its body still unread, to a call to `url` that ends by `deadline_s` from now whatever
    the server does (`DeadlineExceeded` past it). Asks for an uncompressed body.

    The connection goes to the address `check_url` checked (`target`), not to a second DNS answer (no
    rebinding window); the Host header and TLS SNI still name the host, so virtual hosts and certificates
    work."""
    pinned = httpx.URL(url).copy_with(host=target.addresses[0], port=target.port)
    default_port = 443 if target.scheme == "https" else 80
    host = target.host if target.port == default_port else f"{target.host}:{target.port}"
    watch = _Watch(deadline_s)
    try:
        with http.stream(
            method,
            pinned,
            content=content,
            headers={"accept-encoding": "identity", **headers, "host": host},
            extensions={"sni_hostname": target.host, "trace": watch.trace},
        ) as resp:
            yield resp
    except httpx.HTTPError:
        if watch.expired:
            raise DeadlineExceeded(f"no complete answer within {deadline_s:g}s") from None
        raise
    finally:
        watch.close()


def read_capped(resp: httpx.Response, cap: int) -> bytes:
    """The body, at most `cap` bytes on the wire and at most `cap` unpacked (`TooLarge` else)."""
    length = resp.headers.get("content-length", "")
    if length.isdigit() and int(length) > cap:
        raise TooLarge(f"the body is {length} bytes")
    wire = bytearray()
    for chunk in resp.iter_raw(WIRE_CHUNK):
        wire += chunk
        if len(wire) > cap:
            raise TooLarge(f"the body is over {cap} bytes")
    encoding = resp.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return bytes(wire)
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise UnsupportedEncoding(f"the body is packed as {encoding!r}")
    # 47: a zlib or gzip header, told apart by the unpacker; deflate without its zlib header is raw.
    raw = encoding == "deflate" and not _zlib_header(wire)
    unpacker = zlib.decompressobj(-15 if raw else 47)
    try:
        body = unpacker.decompress(bytes(wire), cap + 1)
    except zlib.error as exc:
        raise UnsupportedEncoding(f"the body is not valid {encoding}: {exc}") from None
    if len(body) > cap or unpacker.unconsumed_tail:
        raise TooLarge(f"the body unpacks to over {cap} bytes")
    return body


def _zlib_header(data: bytes | bytearray) -> bool:
    return len(data) >= 2 and data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0
