"""`GET /v1/jobs/{id}/events`: Server-Sent Events from Redis pub/sub, until the job ends."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from api.deps import Services, ServicesDep, TenantDep
from api.holds import Hold, Holds, holds_of
from api.hub import EventHub
from shared.errors import Code, Problem
from shared.jobs.record import JobRecord
from shared.jobs.view import find_job, to_job

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
KEEPALIVE_S = 15.0
RESYNC_S = 5.0  # pub/sub is fire-and-forget: re-read the record now and then, in case a message was missed


def _sse(event: str, data: object, event_id: int | None = None) -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _view(svc: Services, rec: JobRecord) -> dict[str, object]:
    pos = svc.jobs.queue_position(rec) if rec.status.value == "queued" else None
    return to_job(rec, svc.storage, pos).model_dump(mode="json")


async def _stream(
    svc: Services, hub: EventHub, holds: Holds, rec: JobRecord, last_id: int, hold: Hold
) -> AsyncIterator[bytes]:
    """Snapshot first (unless the client has it already), then live events, then the terminal event."""
    try:
        async with hub.listen(rec.id) as events:  # before the snapshot: nothing falls between
            async for chunk in _events(svc, events, rec, last_id, hold):
                yield chunk
    finally:
        holds.give_back(hold)


async def _events(
    svc: Services, events: asyncio.Queue[str], rec: JobRecord, last_id: int, hold: Hold
) -> AsyncIterator[bytes]:
    """The stream's chunks, until the job ends or its key is revoked."""
    job_id, tenant = rec.id, rec.tenant
    current = await run_in_threadpool(find_job, svc.jobs, svc.storage, tenant, job_id) or rec
    sent_status = None
    sent_step = -1
    yield b"retry: 2000\n\n"

    async def snapshot(r: JobRecord) -> AsyncIterator[bytes]:
        nonlocal sent_status, sent_step
        job = await run_in_threadpool(_view, svc, r)
        if r.status.is_terminal:
            yield _sse(r.status.value, job, r.events)
            return
        if r.status.value != sent_status:
            sent_status = r.status.value
            yield _sse("status", job, r.events)
        step, total = r.progress
        if r.status.value == "running" and step != sent_step:
            sent_step = step
            yield _sse("progress", {"step": step, "total": total}, r.events)

    if current.events > last_id or current.status.is_terminal:
        async for chunk in snapshot(current):
            yield chunk
    if current.status.is_terminal:
        return
    last_beat = last_sync = time.monotonic()
    while True:
        try:
            msg: str | None = await asyncio.wait_for(events.get(), 1.0)
        except TimeoutError:
            msg = None
        hold.touch()
        if hold.revoked:
            return  # the key was revoked: end here (a reconnect is refused 401)
        now = time.monotonic()
        resync = now - last_sync > RESYNC_S
        if msg is not None:
            ev = json.loads(msg)
            if ev["type"] == "progress":
                if ev["step"] != sent_step:
                    sent_step = ev["step"]
                    yield _sse("progress", {"step": ev["step"], "total": ev["total"]}, ev["id"])
            else:
                resync = True  # a status change: send the whole job, read fresh
        if resync:
            last_sync = now
            fresh = await run_in_threadpool(find_job, svc.jobs, svc.storage, tenant, job_id)
            if fresh is None:
                return
            async for chunk in snapshot(fresh):
                yield chunk
            if fresh.status.is_terminal:
                return
        if now - last_beat > KEEPALIVE_S:
            last_beat = now
            yield b": keep-alive\n\n"


@router.get("/{job_id}/events", summary="Server-Sent Events of a job", response_class=StreamingResponse)
async def job_events(
    job_id: str,
    request: Request,
    svc: ServicesDep,
    tenant: TenantDep,
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    """`status` and `progress` events, then one terminal event (`succeeded`, `failed`, `canceled`), then the end."""
    rec = await run_in_threadpool(find_job, svc.jobs, svc.storage, tenant, job_id) if job_id.isalnum() else None
    if rec is None:
        raise Problem(404, Code.not_found, f"no job {job_id!r}")
    try:
        last = int(last_event_id or 0)
    except ValueError:
        last = 0
    holds = holds_of(request)
    hold = await holds.take(request, tenant, Code.too_many_streams)  # 429 past the tenant's cap
    return StreamingResponse(
        _stream(svc, request.app.state.hub, holds, rec, last, hold),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
