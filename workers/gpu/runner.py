"""One job from claim to its end, with the compatible jobs that share its pipeline call.

The child running a job's message is the leader of a micro-batch: it claims waiting compatible jobs
through the job store (the same atomic claim their own messages would use), runs them in one
pipeline call, and ends each with its own status, outputs and webhook through
`shared.jobs.lifecycle`. Every way a job can end is a value (a status and an error code), never a
half-written result: outputs are uploaded before the job is marked succeeded. Each job's own start
and end are `workers.gpu.running`'s.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis

from shared import tracing
from shared.errors import Code
from shared.jobs import lifecycle
from shared.jobs.lifecycle import durably
from shared.logs import job_context
from shared.metrics import BATCH_SIZE, INFERENCE_SECONDS, JOBS_ENDED
from shared.schemas import Status
from workers.gpu import faults
from workers.gpu.batcher import Item, gather
from workers.gpu.context import WorkerContext
from workers.gpu.outcomes import free_memory, is_oom
from workers.gpu.running import Running, end_with, finish, start
from workers.inpaint.run import run_batch
from workers.models.serving import rows_for_size

log = logging.getLogger(__name__)


def process_job(ctx: WorkerContext, hint: str = "", turn: str = "") -> Status | None:
    """Use one turn: run the job the fair queue puts first (or one whose worker vanished), with any
    compatible waiting jobs as its micro-batch mates. `hint` is the job the turn's message was sent
    for, for the log only: a turn is not bound to a job. `turn` (the message's task id) is noted
    with the job it runs, for the worker's parent.

    Returns the status of the job it ran (still `running` while it ends behind the next call, with
    `ctx.ends_behind`), or None when nothing was waiting.
    """
    with job_context(hint):
        for _ in range(8):  # another worker may claim the job we picked first: pick again
            job_id = ctx.svc.leases.next_job()
            if job_id is None:
                return None
            with job_context(job_id):
                outcome = _process(ctx, job_id, turn)
            if outcome is not _TAKEN:
                return outcome  # type: ignore[return-value]
        return None


_TAKEN = object()  # the picked job was claimed by someone else first
# Progress recorded at about this many steps of a call (every step of a short one): each record is
# a write and an event per job, the largest Redis cost of a job at 50 steps (docs/capacity.md).
PROGRESS_POINTS = 20


def _process(ctx: WorkerContext, job_id: str, turn: str) -> Status | object | None:
    svc = ctx.svc
    rec = svc.jobs.get(job_id)
    if rec is None or rec.lane != svc.leases.lane:  # (a job of another model is never this worker's)
        return _TAKEN
    owner = f"{ctx.name}/{uuid.uuid4().hex[:8]}"
    got = durably(svc.leases.claim)(rec, owner, ctx.lease_s)  # the owner is its token: safe to run twice
    if got.outcome == "exhausted":
        lifecycle.conclude_now(svc, job_id)  # the claim itself failed it: worker_lost
        JOBS_ENDED.labels("failed", Code.worker_lost).inc()
        return Status.failed
    if got.outcome != "claimed" or got.rec is None:
        return _TAKEN
    # The lease runs from the claim: renewed by the heartbeat through the start too (inputs, webhook).
    ctx.running([(job_id, owner)])
    if turn:
        svc.leases.note_turn(turn, job_id, owner, ctx.settings.job_time_limit_s + 60)
    leader = start(ctx, got.rec, owner)
    batch = [leader]
    try:
        if not leader.ended:
            batch = _gather(ctx, leader)
            _execute(ctx, batch)
    except ctx.time_limit_error as exc:
        # The call as a whole ran too long: which job made it so is unknown. Each runs again alone,
        # each with a turn of its own (this one ends now).
        again = durably(svc.leases.break_micro_batch)(leader.id, leader.owner) if len(batch) > 1 else []
        for jid in again:
            svc.queue.send_job(jid)
        if not again:
            for j in batch:
                if not j.ended:
                    end_with(ctx, j, exc)
    finally:
        ctx.running([])
        for j in batch:
            if j.span is not None and not j.handed_off:
                j.span.end()
        if len(batch) > 1:
            try:
                svc.leases.set_members(leader.id, [], 0)
            except redis.RedisError:
                log.warning("micro-batch record of %s not cleared; it expires by itself", leader.id)
    if ctx.ends_behind:
        return Status.running  # its ending runs behind the next call: no need to read it back
    final = svc.jobs.get(job_id)
    return final.status if final else None


def _gather(ctx: WorkerContext, leader: Running) -> list[Running]:
    """The leader plus waiting jobs that can share its pipeline call, within the batch window."""
    req = leader.request
    assert req is not None
    width, height = req.image.size
    max_rows = rows_for_size(ctx.pipeline.plan.max_rows, width, height)
    if ctx.pipeline.kind not in ("diffusers", "sim") or max_rows <= req.num_outputs or leader.rec.solo:
        return [leader]
    batch = [leader]

    # An interactive leader takes interactive mates only (bulk rows would slow its call); a bulk
    # leader runs when no interactive job waited, and takes those that arrived since first.
    classes = ("interactive",) if leader.rec.priority == "interactive" else ("interactive", "bulk")

    def take(key: str, rows_left: int) -> list[Item[Running]]:
        try:
            claimed, exhausted = ctx.svc.leases.take_compatible(key, classes, rows_left, ctx.name, ctx.lease_s)
        except redis.RedisError:
            return []  # Redis blinked: mates are an optimisation, the leader runs with what it has
        for stub in exhausted:
            lifecycle.conclude_now(ctx.svc, stub.id)
        if not claimed:
            return []
        ctx.running([(j.id, j.owner) for j in batch] + [(rec.id, owner) for rec, owner in claimed])
        # Mates start side by side: each one's inputs are a fetch and a decode, mostly waiting on S3.
        # A bad input ends its own job here, alone, never failing its mates.
        mates = ctx.side_by_side(lambda pair: start(ctx, *pair), claimed)
        batch.extend(mates)
        return [Item(m.request, m) for m in mates if m.request is not None and not m.ended]

    gathered = gather(Item(req, leader), take, max_rows, ctx.settings.batch_window_ms / 1000)
    runnable = [it.ref for it in gathered]
    if len(runnable) > 1:
        # The worker's parent reads this if it must kill the call: every member ends, not just the leader.
        members = [(j.id, j.owner) for j in runnable[1:]]
        ctx.svc.leases.set_members(leader.id, members, ctx.settings.job_time_limit_s + 60)
    return runnable + [j for j in batch if j.ended]


def _execute(ctx: WorkerContext, batch: list[Running]) -> None:
    """One pipeline call for the micro-batch; a failure of the whole call reruns its jobs one by one."""
    jobs = [j for j in batch if not j.ended]
    if not jobs:
        return
    try:
        if ctx.settings.faults_enabled:
            for j in jobs:
                faults.before_pipeline(ctx, j.rec, len(jobs))
        started = time.perf_counter()
        attrs: dict[str, Any] = {"inpaint.batch_size": len(jobs), "inpaint.jobs": [j.id for j in jobs]}
        with tracing.inside(jobs[0].span), tracing.span("inpaint.pipeline", **attrs):
            results = run_batch(ctx.pipeline, [j.request for j in jobs if j.request], _progress_hook(ctx, jobs))
        INFERENCE_SECONDS.observe(time.perf_counter() - started)
        BATCH_SIZE.observe(len(jobs))
    except ctx.time_limit_error:
        raise
    except Exception as exc:  # noqa: BLE001 - the whole call failed: each job alone says why
        if is_oom(exc):
            free_memory()
        if len(jobs) > 1:
            # Out of memory, or one input breaks the call: alone, each job succeeds or fails on its own.
            log.warning("a micro-batch of %d failed (%s); running its jobs one by one", len(jobs), type(exc).__name__)
            for j in jobs:
                _execute(ctx, [j])
            return
        end_with(ctx, jobs[0], exc)
        return

    # The jobs of a micro-batch end side by side, each one's encode, upload and end mostly a wait on
    # S3 and Redis; and behind the next pipeline call (the worker's), which need not wait for them.
    for j in jobs:
        j.handed_off = True
    ctx.end_side_by_side(
        lambda pair: finish(ctx, *pair, len(jobs)),
        list(zip(jobs, results, strict=True)),
        [(j.id, j.owner) for j in jobs],
    )


def _progress_hook(ctx: WorkerContext, jobs: list[Running]) -> Callable[[int, int], list[bool]]:
    # Decided once, not per denoising step: most jobs have no progress webhook.
    hooks = [bool(j.rec.input.webhook) and "progress" in j.rec.input.webhook_events for j in jobs]
    pairs = [(j.id, j.owner) for j in jobs]

    def on_step(step: int, total: int) -> list[bool]:
        for j in jobs:
            j.seen_total = total  # the scheduler's real count (PNDM adds a step), not the requested one
        # Every step asks whether a job was canceled; progress is recorded (and the leases renewed) at
        # about PROGRESS_POINTS steps of the call, the first and the last among them.
        every = -(-total // PROGRESS_POINTS)
        record = step == 1 or step >= total or step % every == 0
        try:
            if not record:
                return [f != 0 for f in ctx.svc.leases.report_many(pairs, None)]
            flags = ctx.svc.leases.report_many(pairs, ctx.lease_s, step, total)
            for j, hook in zip(jobs, hooks, strict=True):
                if hook:
                    ctx.svc.notify(j.rec, "progress")
        except redis.RedisError:
            return [False] * len(jobs)  # Redis blinked: progress is best effort, the jobs go on
        return [f != 0 for f in flags]  # 1: cancel asked; -1: the job is no longer ours (ended elsewhere)

    return on_step
