"""The Python client of the inpaint service (httpx and httpx-sse only)."""

from inpaint_client.sdk import AsyncInpaintClient, InpaintClient, InpaintError, image_bytes
from inpaint_client.types import Batch, Event, Job, JobPage, Lora, LoraRef, Model
from inpaint_client.webhooks import WebhookVerificationError, verify_webhook

__all__ = [
    "AsyncInpaintClient", "Batch", "Event", "InpaintClient", "InpaintError", "Job", "JobPage", "Lora", "LoraRef",
    "Model", "WebhookVerificationError", "image_bytes", "verify_webhook",
]  # fmt: skip
