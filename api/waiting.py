"""Waiting for jobs to end inside one request (`Prefer: wait`, OpenAI's images API, `/score`): woken by
the jobs' events through the process's one subscription (`api.hub`), with a re-read every second in
case one is missed. Every wait holds a place in its tenant's budget (`api.holds`)."""

from __future__ import annotations

import asyncio
import time

from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from api.holds import Hold, refuse_revoked
from shared.jobs.record import JobRecord
from shared.services import Services


async def until_ended(request: Request, svc: Services, hold: Hold, job_id: str, timeout_s: float) -> JobRecord | None:
    """The job once it has ended, or None if it has not within `timeout_s`; 401 if the key is revoked."""
    ended = await all_ended(request, svc, hold, [job_id], timeout_s)
    return ended[0] if ended else None


async def all_ended(
    request: Request, svc: Services, hold: Hold, job_ids: list[str], timeout_s: float
) -> list[JobRecord] | None:
    """The jobs once every one has ended, None if they have not within `timeout_s` or the client left;
    401 if the key behind the wait is revoked meanwhile."""
    deadline = time.monotonic() + timeout_s
    async with request.app.state.hub.listen(*job_ids) as events:
        while True:
            hold.touch()
            refuse_revoked(hold)
            recs = await run_in_threadpool(svc.jobs.get_many, job_ids)
            if all(r is not None and r.status.is_terminal for r in recs):
                return [r for r in recs if r is not None]
            left = deadline - time.monotonic()
            if left <= 0 or await request.is_disconnected():  # nobody to answer: give the place back
                return None
            try:
                await asyncio.wait_for(events.get(), min(left, 1.0))
            except TimeoutError:
                pass
