"""Waiting for a job to end inside one request (`Prefer: wait`, OpenAI's images API): woken by the job's
events through the process's one subscription (`api.hub`), with a re-read every second in case one is
missed."""

from __future__ import annotations

import asyncio
import time

from fastapi.concurrency import run_in_threadpool

from api.hub import EventHub
from shared.jobs.record import JobRecord
from shared.services import Services


async def until_ended(svc: Services, hub: EventHub, job_id: str, timeout_s: float) -> JobRecord | None:
    """The job once it has ended, or None if it has not within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    async with hub.listen(job_id) as events:
        while True:
            rec = await run_in_threadpool(svc.jobs.get, job_id)
            if rec is not None and rec.status.is_terminal:
                return rec
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                await asyncio.wait_for(events.get(), min(left, 1.0))
            except TimeoutError:
                pass
