"""A TCP proxy in front of `redis-server` that loses chosen replies: the server really runs the command,
then its client sees the connection drop before the answer (a fork or fsync stall, a reset, a failover).

Commands are read from the client's stream (RESP arrays) and paired in order with the server's replies.
A rule names what to lose: a predicate over one command (for a transaction, over every command from
MULTI to its EXEC, matched when the EXEC's reply comes) and how many times. When a matching reply
arrives, the proxy drops it and closes both sides; whatever the client re-sends runs again. Connections
that subscribe pass through untouched (their replies are not one per command).
"""

from __future__ import annotations

import hashlib
import random
import socket
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

Command = list[bytes]
Match = Callable[[list[Command]], bool]


def sha(script: str) -> bytes:
    """The SHA1 that EVALSHA names a script by."""
    return hashlib.sha1(script.encode()).hexdigest().encode()


def evalsha(script: str) -> Match:
    """The one script's runs (EVALSHA, or EVAL of its text), alone or inside a transaction."""
    digest, text = sha(script), script.encode()

    def match(group: list[Command]) -> bool:
        return any(
            len(c) > 1
            and ((c[0].upper() == b"EVALSHA" and c[1] == digest) or (c[0].upper() == b"EVAL" and c[1] == text))
            for c in group
        )

    return match


def command(name: str, *args: bytes) -> Match:
    """A command by name (and its first arguments), alone or inside a transaction."""
    want = name.upper().encode()

    def match(group: list[Command]) -> bool:
        return any(c and c[0].upper() == want and tuple(c[1 : 1 + len(args)]) == args for c in group)

    return match


@dataclass
class Rule:
    match: Match
    times: int = 1  # replies still to lose
    share: float = 1.0  # of the matching replies, the share lost (randomly) while `times` lasts
    lost: list[list[Command]] = field(default_factory=list)


class Push(list):
    """A RESP3 push message: out of band, it answers no command."""


class _Reader:
    """Incremental RESP2/RESP3 parser: feed bytes, take whole values (each as its parsed form and raw bytes;
    a RESP3 push, which answers no command, as `Push`)."""

    def __init__(self) -> None:
        self.buf = b""

    def feed(self, data: bytes) -> None:
        self.buf += data

    def take(self) -> tuple[object, bytes] | None:
        got = self._parse(0)
        if got is None:
            return None
        value, end = got
        raw, self.buf = self.buf[:end], self.buf[end:]
        return value, raw

    def _parse(self, pos: int) -> tuple[object, int] | None:
        nl = self.buf.find(b"\r\n", pos)
        if nl < 0:
            return None
        kind, line = self.buf[pos : pos + 1], self.buf[pos + 1 : nl]
        if kind in (b"+", b"-", b":", b"_", b"#", b",", b"("):
            return line, nl + 2
        if kind in (b"$", b"=", b"!"):
            n = int(line)
            if n < 0:
                return None, nl + 2
            end = nl + 2 + n + 2
            return (self.buf[nl + 2 : end - 2], end) if len(self.buf) >= end else None
        if kind in (b"*", b"%", b"~", b">", b"|"):
            n = int(line) * (2 if kind in (b"%", b"|") else 1)
            items: list[object] = [] if kind != b">" else Push()
            at = nl + 2
            for _ in range(max(n, 0)):
                got = self._parse(at)
                if got is None:
                    return None
                items.append(got[0])
                at = got[1]
            if kind == b"|":  # attributes come before the value they describe: one value with it
                got = self._parse(at)
                return (None, got[1]) if got is not None else None
            return items, at
        raise ValueError(f"not RESP: {self.buf[pos : pos + 20]!r}")


class LostReplies:
    """The proxy: `url` (same database path as the server's), `lose(match, times)` to arm a rule."""

    def __init__(self, upstream_port: int, db: int = 0, seed: int = 0) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.rules: list[Rule] = []
        self.lock = threading.Lock()
        self.random = random.Random(seed)
        self.cuts = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/{db}"
        self._open: set[socket.socket] = set()
        self._stopped = False
        threading.Thread(target=self._accept, name="lostreply-accept", daemon=True).start()

    def lose(self, match: Match, times: int = 1, share: float = 1.0) -> Rule:
        rule = Rule(match, times, share)
        with self.lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self.lock:
            self.rules.clear()

    def cut_all(self) -> None:
        """Drop every open connection (a restart as the clients see it)."""
        with self.lock:
            for s in list(self._open):
                _close(s)

    def stop(self) -> None:
        self._stopped = True
        _close(self.listener)
        self.cut_all()

    def _doomed(self, group: list[Command]) -> bool:
        with self.lock:
            for rule in self.rules:
                if rule.times > 0 and rule.match(group) and (rule.share >= 1 or self.random.random() < rule.share):
                    rule.times -= 1
                    rule.lost.append(group)
                    self.cuts += 1
                    return True
        return False

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=2)
                server.settimeout(None)
            except OSError:
                _close(client)
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                self._open |= {client, server}
            pending: deque[list[Command] | None] = deque()  # per command: its group, None = pass through
            state = {"passthrough": False}
            threading.Thread(target=self._upward, args=(client, server, pending, state), daemon=True).start()
            threading.Thread(target=self._downward, args=(client, server, pending, state), daemon=True).start()

    def _upward(self, client: socket.socket, server: socket.socket, pending: deque, state: dict) -> None:
        reader = _Reader()
        multi: list[Command] | None = None
        try:
            while data := client.recv(65536):
                if not state["passthrough"]:
                    reader.feed(data)
                    while (got := reader.take()) is not None:
                        cmd = [bytes(x) for x in got[0]] if isinstance(got[0], list) else [bytes(got[0] or b"")]
                        name = cmd[0].upper() if cmd else b""
                        if name == b"MULTI":
                            multi = [cmd]
                            pending.append(None)
                        elif multi is not None and name == b"EXEC":
                            multi.append(cmd)
                            pending.append(multi)
                            multi = None
                        elif multi is not None:
                            multi.append(cmd)
                            pending.append(None)  # its +QUEUED
                        else:
                            pending.append([cmd])
                        if name in (b"SUBSCRIBE", b"PSUBSCRIBE", b"SSUBSCRIBE", b"MONITOR"):
                            state["passthrough"] = True
                server.sendall(data)
        except OSError:
            pass
        finally:
            self._drop(client, server)

    def _downward(self, client: socket.socket, server: socket.socket, pending: deque, state: dict) -> None:
        reader = _Reader()
        try:
            while data := server.recv(65536):
                if state["passthrough"] and not pending:
                    client.sendall(data)
                    continue
                reader.feed(data)
                out = b""
                while (got := reader.take()) is not None:
                    if isinstance(got[0], Push):
                        out += got[1]
                        continue
                    group = pending.popleft() if pending else None
                    refused = got[1][:1] in (b"-", b"!")  # it did not run (NOSCRIPT, say): nothing to lose
                    if group is not None and not refused and self._doomed(group):
                        if out:
                            client.sendall(out)
                        self._drop(client, server)  # the server ran it; its answer is lost
                        return
                    out += got[1]
                if state["passthrough"] and not pending and reader.buf:
                    out, reader.buf = out + reader.buf, b""
                if out:
                    client.sendall(out)
        except OSError:
            pass
        finally:
            self._drop(client, server)

    def _drop(self, client: socket.socket, server: socket.socket) -> None:
        with self.lock:
            self._open -= {client, server}
        _close(client)
        _close(server)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass
