"""Celery tasks of the inference worker: thin adapters over `workers.gpu.runner.process_job`.

Pool: prefork with one child per GPU. Celery enforces hard time limits only in prefork (the
parent kills and replaces a child that overruns), and the child, not the parent, loads the
pipeline in `worker_process_init`, so nothing touches CUDA in a process that forks.

Micro-batching keeps that pool. A threads pool (one thread per job feeding a shared GPU loop)
would batch too, but Celery enforces no time limits there, and `reject_on_worker_lost` would have
no parent to act on. Instead the one child runs the job its message names as the leader of a
micro-batch and claims compatible waiting jobs straight from the job store (`take_compatible`, the
same atomic claim a message uses). A message is a turn, not a job: the leader's is acknowledged once
its call is over, while its jobs end behind the next call (`WorkerContext.end_side_by_side`), covered by
their leases; a mate's message, when it arrives, runs other waiting work or nothing. The hard limit
still kills and replaces a stuck child, and the parent ends every member of that micro-batch, whose
ids the child wrote to Redis before the call.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Any

from billiard.einfo import ExceptionWithTraceback
from billiard.exceptions import WorkerLostError
from celery import Task, signals
from celery.exceptions import SoftTimeLimitExceeded
from celery.worker.request import Request

from shared import catalog, tracing
from shared.config import get_settings
from shared.errors import Code
from shared.jobs import lifecycle
from shared.metrics import GPU_MEMORY, serve
from shared.queue import RUN_TASK, Queue
from shared.schemas import Status
from shared.services import Services, build_services, process_services
from workers.app import app
from workers.gpu import faults
from workers.gpu.context import WorkerContext
from workers.gpu.runner import process_job
from workers.inpaint import adapters
from workers.inpaint.run import warm_up
from workers.models.loading import load_pipeline, prepare_for_serving
from workers.models.safety import load_checker

log = logging.getLogger(__name__)

_ctx: WorkerContext | None = None


class JobRequest(Request):
    """Runs in the worker's parent: the places where a child can no longer speak for its job."""

    def on_timeout(self, soft: bool, timeout: float) -> None:
        super().on_timeout(soft, timeout)
        if soft:
            return
        # The hard limit kills the child mid-job; the parent ends the job the child could not. The
        # child leaves the ready workers first: by the time anyone reads the job's end, the process
        # that ran it is no longer counted ready (its replacement registers when it has loaded).
        svc = process_services()
        _gone(svc, self.worker_pid)
        ran = svc.leases.turn_job(_turn(self.id, self.worker_pid))
        if ran is not None:
            job_id, owner = ran
            again = svc.leases.break_micro_batch(job_id, owner)
            if again:
                # A micro-batch hung: which job did it is unknown. Each member runs again alone, with a
                # turn of its own: the culprit times out by itself, the others succeed.
                for jid in again:
                    svc.queue.send_job(jid)
            elif (rec := svc.jobs.get(job_id)) is not None:
                msg = f"the job ran past its hard time limit of {timeout:.0f}s and its worker process was replaced"
                # Only while this child's claim holds it: a job another worker took since is not ours to end.
                lifecycle.end(svc, rec, Status.failed, owner, error=(Code.timeout, msg))
        _rerun_ending_behind(svc, self.worker_pid)  # after: the call's own jobs are dealt with above

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> None:
        exc = exc_info.exception
        if isinstance(exc, ExceptionWithTraceback):  # how billiard hands over a lost child's error
            exc = exc.exc
        if isinstance(exc, WorkerLostError):
            # The message goes back on the queue (reject_on_worker_lost): a turn for the job the dead
            # child ran, whose lease is freed now so that turn runs it at once. A micro-batch that
            # crashed its process: each member runs again alone, with a turn of its own.
            svc = process_services()
            _gone(svc, self.worker_pid)
            ran = svc.leases.turn_job(_turn(self.id, self.worker_pid))
            log.warning("the process running job %s died; its lease is dropped, its turn requeued", ran)
            if ran is not None:
                job_id, owner = ran
                again = svc.leases.break_micro_batch(job_id, owner)
                for jid in again[1:]:
                    svc.queue.send_job(jid)
                if not again:
                    svc.leases.release(job_id, owner)
            _rerun_ending_behind(svc, self.worker_pid)  # after: the call's own jobs are dealt with above
        super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)


def _name(pid: int) -> str:
    """A worker process's name: in the ready registry, and in the lease owners of its jobs."""
    return f"{socket.gethostname()}:{pid}"


def _rerun_ending_behind(svc: Services, pid: int | None) -> None:
    """The jobs a dead child was still ending behind its last call (docs/reliability.md): their leases
    are dropped and each gets a turn now, instead of waiting for the leases to lapse."""
    if pid is None:
        return
    for job_id in svc.leases.release_owned(_name(pid)):
        log.warning("job %s was ending behind its worker's call when the process died; it runs again", job_id)
        svc.queue.send_job(job_id)


def _gone(svc: Services, pid: int | None) -> None:
    """A child that is dead or being killed is no longer a ready worker (it would linger until its
    heartbeat ran out)."""
    if pid is not None:
        svc.registry.gone(_name(pid))


class JobTask(Task):
    Request = JobRequest


@app.task(bind=True, base=JobTask, name=RUN_TASK, max_retries=None)
def run_job(self: Task, job_id: str = "", waiter: str = "") -> None:
    """One turn: the worker runs whatever job the fair queue puts first (`process_job`). A turn that
    finds nothing waiting ends: every job made a turn of its own, and a lost job's lease lapses."""
    if _ctx is None:
        raise self.retry(countdown=5)
    if _ctx.settings.faults_enabled:
        faults.before_turn(_ctx)
    process_job(_ctx, job_id, _turn(self.request.id, os.getpid()))


def _turn(task_id: str | None, pid: int | None) -> str:
    """A turn as run by one process: a message the broker handed out twice (past its visibility
    timeout) may run in two processes at once, each with a job of its own."""
    return f"{task_id}:{pid}"


@signals.worker_process_init.connect
def _load_pipeline(**_: Any) -> None:
    """Load once per process, warm up, then advertise readiness (what /readyz counts)."""
    global _ctx
    tracing.setup("worker", celery=True)  # in the child: the exporter's thread must not cross a fork
    settings = get_settings()
    if settings.fault_injection and not settings.faults_enabled:
        log.warning(
            "INPAINT_FAULT_INJECTION is ignored outside INPAINT_ENVIRONMENT=test: fault prompts are plain prompts"
        )
    pipeline = load_pipeline(settings)
    if pipeline.kind == "diffusers":
        adapters.configure(pipeline.pipe, settings.lora_memory_slots)  # LoRA adapters kept loaded, at most
    # Batch budget, CUDA fast path, every compiled bucket warmed: before the worker says it is ready.
    prepare_for_serving(pipeline, settings)
    if settings.warmup:
        log.info("warm-up took %.2fs", warm_up(pipeline))
    checker = load_checker(settings, pipeline.device)  # refuses to start if a set policy has no checker
    # Its model's lane: the queue it gives turns to and the fair queue it claims from (shared.catalog).
    svc = build_services(settings, Queue(app, catalog.lane(catalog.worker_model(settings), settings)))
    svc.storage.ensure_bucket()
    _ctx = WorkerContext(
        svc=svc,
        pipeline=pipeline,
        name=_name(os.getpid()),
        checker=checker,
        time_limit_error=SoftTimeLimitExceeded,
        ends_behind=True,
    )
    if pipeline.device == "cuda":
        import torch

        GPU_MEMORY.set_function(lambda: float(torch.cuda.memory_allocated()))
    serve(settings.worker_metrics_port, settings.metrics_host)
    _ctx.heartbeat()
    threading.Thread(target=_heartbeat_loop, args=(_ctx,), name="heartbeat", daemon=True).start()
    plan = pipeline.plan
    log.info(
        "worker %s ready: %s@%s on %s; micro-batches of up to %s rows at 512x512, compile %s",
        _ctx.name, pipeline.name, pipeline.revision, pipeline.device, plan.max_rows, plan.compile,
    )  # fmt: skip


def _heartbeat_loop(ctx: WorkerContext) -> None:
    stop = threading.Event()
    while not stop.wait(ctx.settings.worker_heartbeat_s):
        try:
            ctx.heartbeat()
        except Exception:
            log.warning("heartbeat failed", exc_info=True)


@signals.worker_process_shutdown.connect
def _unregister(**_: Any) -> None:
    if _ctx is not None and not _ctx.wait_endings(timeout=_ctx.settings.job_time_limit_s):
        # (a warm shutdown, a recycled child) Those jobs' leases lapse and they run again elsewhere.
        log.warning("exiting with jobs still ending: %s", [job_id for job_id, _ in _ctx.ending()])
    tracing.flush()
    if _ctx is not None:
        try:
            _ctx.svc.registry.gone(_ctx.name)
        except Exception:  # shutting down; the registry entry expires by itself
            log.debug("could not unregister %s", _ctx.name, exc_info=True)
