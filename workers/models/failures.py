"""Why a job's model part could not be used, as values the worker ends that job with (importing nothing
of storage or Redis: the pure inference code raises them)."""

from __future__ import annotations

from shared.errors import Code


class AdapterFailed(Exception):
    """A job's adapter could not be used: the job fails with this code (`lora_not_found`,
    `lora_incompatible`, `lora_invalid`) and message; the worker goes on."""

    def __init__(self, code: Code, message: str):
        super().__init__(message)
        self.code, self.message = code, message
