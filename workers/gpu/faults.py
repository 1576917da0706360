"""Fault injection for the reliability tests (`INPAINT_FAULT_INJECTION`, refused in production).

A job whose prompt is `__fault:<what>[:<seconds>]__` misbehaves on purpose in the worker:
`kill` (the process dies with SIGKILL, every attempt), `kill-once` (first attempt only),
`hang` (ignores the soft time limit, like a stuck kernel), `sleep:S`, `sleep-first:S` (the first
attempt only: a worker that stalls, then comes back after another finished the job), `oom` (an out-of-memory
error from the pipeline), `pause-before-upload:S` (time to take S3 away).
"""

from __future__ import annotations

import os
import re
import signal
import time
from typing import Any

from shared import keys

_FAULT = re.compile(r"^__fault:([a-z-]+)(?::([0-9.]+))?__")


def _parse(prompt: str) -> tuple[str, float]:
    m = _FAULT.match(prompt)
    return (m.group(1), float(m.group(2) or 0)) if m else ("", 0.0)


def before_pipeline(ctx: Any, rec: Any) -> None:
    what, seconds = _parse(rec.input.prompt)
    if not what:
        return
    if what in ("kill", "kill-once", "hang"):
        ctx.settle()  # the jobs ending behind this call end first: the fault hits the job that asks for it only
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
    elif what == "oom":
        import torch

        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")


def before_upload(rec: Any) -> None:
    what, seconds = _parse(rec.input.prompt)
    if what == "pause-before-upload":
        time.sleep(seconds)
