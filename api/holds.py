"""Connections a request holds open (event streams, `Prefer: wait`, the images API, `/score`): one budget
per tenant, and an end for those of a revoked key.

Each held connection has a place in Redis (`Quotas.open_hold`, counted across replicas) that lapses
unless renewed, so a dead process's places free themselves. While anything is held, one task per process
renews every place in one round trip every few seconds, and every second checks in one round trip that
the stored keys behind them still exist: a revoked key's holds are marked, and their owners end them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from redis.exceptions import RedisError

from shared.errors import Code, Problem
from shared.quotas import HOLD_LEASE_S
from shared.services import Services

log = logging.getLogger(__name__)
CHECK_S = 1.0  # how often the keys behind held connections are re-checked
RENEW_S = 5.0  # how often their places are renewed (well within HOLD_LEASE_S)
STALE_S = HOLD_LEASE_S / 2  # a stream's hold untouched this long is let go (its response never started)


@dataclass(eq=False)
class Hold:
    holds: Holds = field(repr=False)
    tenant: str
    token: str
    digest: str | None  # the stored key's SHA-256; None for keys that cannot be revoked
    seen: float = field(default_factory=time.monotonic)
    owned: bool = False  # a wait's: given back by its block, so kept however long it goes untouched
    revoked: bool = False
    dropped: bool = False  # untouched for STALE_S: no longer renewed nor checked, until touched again

    def touch(self) -> None:
        """Say the connection is still held (at least every few seconds): only touched holds are kept."""
        self.seen = time.monotonic()
        if self.dropped:
            self.dropped = False
            self.holds.keep(self)


class Holds:
    """The process's held connections."""

    def __init__(self, svc: Services):
        self.svc = svc
        self._held: set[Hold] = set()
        self._task: asyncio.Task[None] | None = None

    async def take(self, request: Request, tenant: str, code: Code, owned: bool = False) -> Hold:
        """A place among the tenant's held connections, or 429 with `code` past the cap; an `owned` one
        is given back by its owner whatever happens, and is never let go as stale."""
        token = await run_in_threadpool(self.svc.quotas.open_hold, tenant, code)
        hold = Hold(self, tenant, token, getattr(request.state, "key_digest", None), owned=owned)
        self.keep(hold)
        return hold

    def keep(self, hold: Hold) -> None:
        """Renew the hold's place and check its key while it is held."""
        self._held.add(hold)
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._task = loop.create_task(self._watch(), name="held-connections")

    def let_go(self, hold: Hold) -> None:
        """Stop renewing and checking the hold (its place lapses by itself); see `give_back`."""
        self._held.discard(hold)
        if not self._held and self._task is not None:
            self._task.cancel()
            self._task = None

    def give_back(self, hold: Hold) -> None:
        """Free the place now. Synchronous, for an event stream's generator: a disconnect cancels it,
        and an await there could be cancelled before the place is given back (one ZREM)."""
        self.let_go(hold)
        with contextlib.suppress(RedisError):
            self.svc.quotas.close_hold(hold.tenant, hold.token)

    async def _watch(self) -> None:
        renewed = time.monotonic()
        while self._held:
            await asyncio.sleep(CHECK_S)
            now = time.monotonic()
            # A stream whose response never started, most likely: its place lapses. A wait's is kept
            # (a slow upload or image fetch before it touches): its block gives it back.
            for stale in [h for h in self._held if not h.owned and now - h.seen > STALE_S]:
                stale.dropped = True
                self._held.discard(stale)
            held = list(self._held)
            try:
                if now - renewed >= RENEW_S:
                    renewed = now
                    await run_in_threadpool(self.svc.quotas.renew_holds, [(h.tenant, h.token) for h in held])
                digests = sorted({h.digest for h in held if h.digest})
                gone = await run_in_threadpool(self.svc.keystore.revoked, digests) if digests else set()
            except RedisError as exc:  # nothing is revoked on a guess; the places outlast a short outage
                log.warning("could not check held connections: %s", exc)
                continue
            for h in held:
                h.revoked = h.revoked or h.digest in gone


def holds_of(request: Request) -> Holds:
    """The app's held connections (made on first use)."""
    state = request.app.state
    if getattr(state, "holds", None) is None:
        state.holds = Holds(state.services)
    return state.holds  # type: ignore[no-any-return]


@contextlib.asynccontextmanager
async def holding(request: Request, tenant: str) -> AsyncIterator[Hold]:
    """A wait's place for the block (429 `too_many_waits` past the tenant's cap)."""
    holds = holds_of(request)
    hold = await holds.take(request, tenant, Code.too_many_waits, owned=True)
    try:
        yield hold
    finally:
        holds.let_go(hold)
        with contextlib.suppress(RedisError):  # off the event loop; a thread call is not cut short
            await run_in_threadpool(holds.svc.quotas.close_hold, hold.tenant, hold.token)


def refuse_revoked(hold: Hold) -> None:
    """401 once the key behind the hold is revoked."""
    if hold.revoked:
        raise Problem(401, Code.unauthorized, "the API key was revoked", headers={"WWW-Authenticate": "Bearer"})
