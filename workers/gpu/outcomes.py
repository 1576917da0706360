"""What each way a job can fail in the worker means to its user: a stable error code and a message."""

from __future__ import annotations

import gc
import logging

from shared.errors import Code
from shared.storage import StorageError
from workers.inpaint.request import NonFiniteOutput
from workers.inpaint.safety import ContentBlocked
from workers.models.failures import AdapterFailed

log = logging.getLogger(__name__)


class JobFailed(Exception):
    """A job fails with this code and message (bad inputs, inputs unreadable)."""

    def __init__(self, code: Code, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover
        pass
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


def failure(exc: BaseException, timed_out: bool, soft_limit_s: int) -> tuple[Code, str]:
    """The error a job ends with when `exc` ended it (`timed_out`: it was the soft time limit)."""
    if isinstance(exc, (JobFailed, AdapterFailed)):
        return exc.code, exc.message
    if isinstance(exc, ContentBlocked):
        return Code.content_blocked, f"blocked by the safety policy: {exc}; nothing was stored"
    if isinstance(exc, NonFiniteOutput):
        return Code.non_finite_output, "the pipeline produced NaN pixels; no black image was stored"
    if isinstance(exc, StorageError):
        return Code.storage_unavailable, "the outputs could not be written to storage"
    if timed_out:
        return Code.timeout, f"the job ran past its time limit of {soft_limit_s}s"
    if is_oom(exc):
        free_memory()
        return Code.out_of_memory, "the pipeline ran out of memory; try fewer outputs or a smaller image"
    log.error("job failed", exc_info=exc)
    return Code.internal, f"internal error ({type(exc).__name__})"
