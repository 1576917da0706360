"""Fault injection for the reliability tests (`INPAINT_FAULT_INJECTION`, refused in production).

A job whose prompt is `__fault:<what>[:<seconds>]__` misbehaves on purpose in the worker:
`kill` (the process dies with SIGKILL, every attempt), `kill-once` (first attempt only),
`hang` (ignores the soft time limit, like a stuck kernel), `sleep:S`, `sleep-first:S` (the first
attempt only: a worker that stalls, then comes back after another finished the job), `oom` (an out-of-memory
error from the pipeline), `oom-in-batch` (the same, only in a call of more than one row), `pause-before-upload:S` (time to take S3 away), `slow-start:S` (the first
attempt's start, its inputs read, takes S seconds more), and, between a job's status change and the end of
its conclusion (`shared.jobs.lifecycle`): `die-after-<point>` (the child dies with SIGKILL there; points
`ended`, `read`, `manifest`, `webhook`), `die-all-after-<point>` (its parent first: the whole worker is lost) and
`pause-after-<point>:S`.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable
from typing import Any

from shared import keys

_FAULT = re.compile(r"^__fault:([a-z-]+)(?::([0-9.]+))?__")


def _parse(prompt: str) -> tuple[str, float]:
    m = _FAULT.match(prompt)
    return (m.group(1), float(m.group(2) or 0)) if m else ("", 0.0)


def before_pipeline(ctx: Any, rec: Any, rows: int = 1) -> None:
    """Before the pipeline call of `rows` jobs, `rec` among them."""
    what, seconds = _parse(rec.input.prompt)
    if not what:
        return
    if what in ("kill", "kill-once", "hang"):
        ctx.wait_endings()  # the jobs ending behind this call end first: the fault hits the job that asks for it only
    ctx.svc.r.incr(keys.fault_runs(rec.id))  # how many times a job really started running
    if what == "kill" or (what == "kill-once" and rec.attempts <= 1):
        os.kill(os.getpid(), signal.SIGKILL)
    elif what == "sleep" or (what == "sleep-first" and rec.attempts <= 1):
        time.sleep(seconds)
    elif what == "hang":
        deadline = time.monotonic() + 3600
        while time.monotonic() < deadline:
            try:
                time.sleep(0.1)
            except ctx.time_limit_error:
                continue
    elif what == "oom" or (what == "oom-in-batch" and rows > 1):
        import torch

        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")


def before_turn(ctx: Any) -> None:
    """A turn that raises before it claims anything (Celery then drops its message), while the test's
    count (`shared.keys.fault_failing_turns`) lasts."""
    r = ctx.svc.r
    if int(r.get(keys.fault_failing_turns()) or 0) > 0 and int(r.decr(keys.fault_failing_turns())) >= 0:
        raise RuntimeError("injected: this turn fails before its claim")


def checkpoint(rec: Any) -> Callable[[str], None]:
    """The hook `shared.jobs.lifecycle` calls at each named point of the job's ending."""
    what, seconds = _parse(rec.input.prompt)

    def at(point: str) -> None:
        if what == f"pause-after-{point}":
            time.sleep(seconds)
        if what == f"die-all-after-{point}":
            os.kill(os.getppid(), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)
        if what == f"die-after-{point}":
            os.kill(os.getpid(), signal.SIGKILL)

    return at


def slow_start(rec: Any) -> None:
    what, seconds = _parse(rec.input.prompt)
    if what == "slow-start" and rec.attempts <= 1:
        time.sleep(seconds)


def before_upload(rec: Any) -> None:
    what, seconds = _parse(rec.input.prompt)
    if what == "pause-before-upload":
        time.sleep(seconds)
