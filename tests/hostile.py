"""Servers that answer the service's outbound calls the way a hostile tenant's would, on 127.0.0.1.

- `bomb`: 200 with a gzip body that unpacks to `bomb_mb` MB of zeros (a few hundred KB on the wire);
- `header-tarpit`: the status line and headers one byte every `every_s`, for ever;
- `body-tarpit`: headers at once (a 1 MB body announced), then the body one byte every `every_s`;
- `silent`: reads the request and never answers.

Every connection is counted; `stop()` ends the trickles.
"""

from __future__ import annotations

import functools
import gzip
import socket
import ssl
import threading
from pathlib import Path


@functools.cache
def gzip_of_zeros(mb: int) -> bytes:
    return gzip.compress(b"\0" * (mb << 20), compresslevel=9)


class Hostile:
    def __init__(self, mode: str, tls: tuple[Path, Path] | None = None, every_s: float = 0.5, bomb_mb: int = 256):
        self.mode, self.every_s, self.bomb_mb = mode, every_s, bomb_mb
        self.connections = 0
        self.stopped = threading.Event()
        self._ctx: ssl.SSLContext | None = None
        if tls:
            self._ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._ctx.load_cert_chain(*tls)
        if mode == "bomb":
            gzip_of_zeros(bomb_mb)  # made before the first call, not on its clock
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=256)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, path: str = "/") -> str:
        return f"{'https' if self._ctx else 'http'}://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        self.stopped.set()
        self.sock.close()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            if self._ctx:
                conn.settimeout(10)
                conn = self._ctx.wrap_socket(conn, server_side=True)
            conn.settimeout(30)
            self._read_request(conn)
            getattr(self, "_" + self.mode.replace("-", "_"))(conn)
        except (OSError, ssl.SSLError):
            pass
        finally:
            conn.close()

    @staticmethod
    def _read_request(conn: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(body) < length:
            chunk = conn.recv(65536)
            if not chunk:
                return
            body += chunk

    def _trickle(self, conn: socket.socket, data: bytes) -> None:
        for i in range(len(data)):
            if self.stopped.wait(self.every_s):
                return
            conn.sendall(data[i : i + 1])

    def _bomb(self, conn: socket.socket) -> None:
        body = gzip_of_zeros(self.bomb_mb)
        head = f"HTTP/1.1 200 OK\r\ncontent-type: image/png\r\ncontent-encoding: gzip\r\ncontent-length: {len(body)}\r\n\r\n"
        conn.sendall(head.encode() + body)

    def _header_tarpit(self, conn: socket.socket) -> None:
        self._trickle(conn, b"HTTP/1.1 200 OK\r\n" + b"x-slow: " + b"a" * 10_000 + b"\r\n\r\n")

    def _body_tarpit(self, conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: image/png\r\ncontent-length: 1000000\r\n\r\n")
        self._trickle(conn, b"\0" * 1_000_000)

    def _silent(self, conn: socket.socket) -> None:
        self.stopped.wait(60)
