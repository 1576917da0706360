"""Every error code the service speaks, and `Problem`: an error a client can act on.

One enum for both kinds, because they meet: a job's `error.code` (what ended it) and an HTTP
error body's `code` (why a request was refused) are read by the same clients, and `/score`
answers a job's code as its own. Codes are stable: a client may switch on them.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class Code(StrEnum):
    # Requests refused (HTTP error bodies)
    invalid_json = "invalid_json"
    invalid_base64 = "invalid_base64"
    invalid_multipart = "invalid_multipart"
    invalid_row = "invalid_row"
    unsupported_image_format = "unsupported_image_format"
    unsupported_media_type = "unsupported_media_type"
    invalid_image = "invalid_image"
    image_too_small = "image_too_small"
    image_too_large = "image_too_large"
    model_not_served = "model_not_served"  # not in this deployment's catalog (the message lists it)
    unsupported_field = "unsupported_field"  # a field the job's model has no use for
    mask_size_mismatch = "mask_size_mismatch"
    payload_too_large = "payload_too_large"
    validation_error = "validation_error"
    webhook_url_forbidden = "webhook_url_forbidden"
    input_file_forbidden = "input_file_forbidden"
    input_file_missing = "input_file_missing"
    unauthorized = "unauthorized"
    not_found = "not_found"
    method_not_allowed = "method_not_allowed"
    http_error = "http_error"
    job_not_cancelable = "job_not_cancelable"
    idempotency_key_reused = "idempotency_key_reused"
    idempotency_key_in_use = "idempotency_key_in_use"
    queue_full = "queue_full"
    tenant_queue_full = "tenant_queue_full"
    service_unavailable = "service_unavailable"
    too_many_batches = "too_many_batches"
    batch_too_large = "batch_too_large"
    too_many_streams = "too_many_streams"
    too_many_waits = "too_many_waits"  # streams and waits share one budget per tenant
    too_many_redeliveries = "too_many_redeliveries"
    too_many_files = "too_many_files"
    webhook_secret_fixed = "webhook_secret_fixed"  # noqa: S105 - an error code, not a secret
    image_url_forbidden = "image_url_forbidden"
    image_fetch_failed = "image_fetch_failed"
    too_many_fetches = "too_many_fetches"
    dns_unavailable = "dns_unavailable"  # a webhook or image host did not resolve in time: retry
    inference_failed = "inference_failed"  # /score: some rows failed for reasons worth retrying
    # LoRA adapters (`/v1/loras`, a job's `loras`); lora_incompatible and lora_not_found also end jobs
    lora_not_safetensors = "lora_not_safetensors"  # a pickle, a zip checkpoint or a broken header: never loaded
    lora_too_large = "lora_too_large"
    too_many_loras = "too_many_loras"  # the tenant holds INPAINT_MAX_LORAS_PER_TENANT adapters
    lora_invalid = "lora_invalid"  # a safetensors file, but no LoRA weights we can read in it
    lora_incompatible = "lora_incompatible"  # made for another model family
    lora_not_found = "lora_not_found"
    # Jobs that ended without succeeding (a job's `error.code`; some are also HTTP codes)
    invalid_input = "invalid_input"
    content_blocked = "content_blocked"
    out_of_memory = "out_of_memory"
    timeout = "timeout"
    worker_lost = "worker_lost"
    storage_unavailable = "storage_unavailable"
    non_finite_output = "non_finite_output"
    enqueue_failed = "enqueue_failed"
    internal = "internal"


# A job that failed with one of these would fail again with the same input: not worth a retry.
INPUT_CODES = frozenset(
    {Code.invalid_input, Code.content_blocked, Code.lora_incompatible, Code.lora_invalid, Code.lora_not_found}
)


class Problem(Exception):
    """A refusal a client can act on: HTTP status, stable code, message, and the field at fault."""

    def __init__(
        self,
        status: int,
        code: Code,
        message: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ):
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param
        self.headers, self.extra = headers, extra


def unavailable(code: Code, what: str, retry_after_s: int = 5) -> Problem:
    """A dependency is down: 503 with Retry-After."""
    return Problem(503, code, f"{what} is unavailable; retry shortly", headers={"Retry-After": str(retry_after_s)})
