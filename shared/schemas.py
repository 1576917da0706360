"""Requests, jobs and errors: the words the API, the workers and clients share."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_PROMPT_CHARS = 2000
MAX_SEED = 2**32 - 1

MAX_LORAS = 3  # adapters per job
WebhookEvent = Literal["started", "progress", "completed"]
Priority = Literal["interactive", "bulk"]


class Status(StrEnum):
    """Job status; it only moves forward: queued → running → one terminal status."""

    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"

    @property
    def is_terminal(self) -> bool:
        return self in (Status.succeeded, Status.failed, Status.canceled)


class OutputFormat(StrEnum):
    png = "png"
    jpeg = "jpeg"
    webp = "webp"

    @property
    def content_type(self) -> str:
        return f"image/{self.value}"


class LoraRef(BaseModel):
    """A LoRA adapter for one job: an uploaded one (`POST /v1/loras`) by id, or an https:// URL fetched
    once (stored by content hash: the job keeps its id)."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(None, max_length=64)
    url: str | None = Field(None, max_length=2048)
    scale: float = Field(1.0, ge=-4, le=4)

    @model_validator(mode="after")
    def _one_source(self) -> LoraRef:
        if (self.id is None) == (self.url is None):
            raise ValueError("a LoRA names exactly one of `id` or `url`")
        return self


class JobInput(BaseModel):
    """Generation parameters of a job: everything but the images."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    # A catalog model (short name or owner/name id, `GET /v1/models`); none: the deployment's default.
    model: str | None = Field(None, max_length=200)
    loras: list[LoraRef] = Field(default_factory=list, max_length=MAX_LORAS)

    @field_validator("loras", mode="before")
    @classmethod
    def _no_loras(cls, value: object) -> object:
        return [] if value is None else value  # "loras": null is none, as "model": null is the default

    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    num_inference_steps: int = Field(50, ge=1, le=150)
    guidance_scale: float = Field(7.5, ge=0, le=30)
    strength: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    num_outputs: int = Field(1, ge=1, le=8)
    output_format: OutputFormat = OutputFormat.png
    preserve_unmasked: bool = True
    # Feathers the edge where the output meets the kept pixels, inward (pixels outside the mask stay
    # the input's own); 0: a hard edge.
    mask_blur: int = Field(4, ge=0, le=128)
    # Inpaint only a square around the mask (grown by crop_padding px), at the model's size
    # (INPAINT_CROP_SIZE), pasted back: better and faster on a large image with a small mask.
    crop_to_mask: bool = False
    crop_padding: int = Field(32, ge=0, le=2048)
    webhook: str | None = Field(None, max_length=2048)
    webhook_events: list[WebhookEvent] = Field(default_factory=lambda: ["completed"], max_length=3)  # type: ignore[arg-type]
    # interactive (the default for POST /v1/jobs and /score) runs before bulk (batch rows), whoever waited longer
    priority: Priority = "interactive"

    @model_validator(mode="after")
    def _at_least_one_step(self) -> JobInput:
        # diffusers runs int(steps * strength) steps and refuses zero: say so before the job is queued.
        if int(self.num_inference_steps * self.strength) < 1:
            raise ValueError("num_inference_steps × strength must be at least 1")
        return self


class JobCreate(JobInput):
    """The body of `POST /v1/jobs`: parameters plus the two images as base64 or data URLs."""

    image: str = Field(description="a PNG, JPEG or WebP image: base64, a data URL, or an https:// URL (fetched once)")
    mask: str | None = Field(
        None, description="base64, data URL or https:// URL; white = repaint, or, with an alpha channel, transparent"
    )
    mask_image: str | None = Field(None, description="alias of `mask` (the Azure ML field name)")

    @model_validator(mode="after")
    def _one_mask(self) -> JobCreate:
        if (self.mask is None) == (self.mask_image is None):
            raise ValueError("give exactly one of `mask` or `mask_image`")
        return self

    def params(self) -> JobInput:
        return JobInput.model_validate(self.model_dump(exclude={"image", "mask", "mask_image"}))


class Progress(BaseModel):
    step: int = 0
    total: int = 0


class Output(BaseModel):
    url: str
    download_url: str | None = Field(None, description="the same object, saved by a browser instead of shown")
    content_type: str
    width: int
    height: int


class ErrorInfo(BaseModel):
    code: str
    message: str


class ModelInfo(BaseModel):
    name: str
    revision: str


class Metrics(BaseModel):
    queue_s: float | None = None
    inference_s: float | None = None
    total_s: float | None = None
    batch_size: int | None = None  # jobs that shared this job's pipeline call (1: ran alone)


def compatibility_key(width: int, height: int, steps: int, guidance: float, strength: float, adapters: str = "") -> str:
    """What jobs must share to run in one pipeline call, as a micro-batch (sizes as the pipeline sees
    them: padded to 8; the same LoRA adapters at the same scales, `adapters`). Prompts, seeds, images
    and masks may differ. (Jobs of different models never meet: each model has its own lane.)"""
    pw, ph = width + (-width % 8), height + (-height % 8)
    key = f"{pw}x{ph}:s{steps}:g{guidance!r}:t{strength!r}"
    return f"{key}:l{adapters}" if adapters else key


class Job(BaseModel):
    """The job object of the contract."""

    id: str
    status: Status
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    queue_position: int | None = None
    eta_s: float | None = Field(None, description="estimated seconds until the job starts, from recent throughput")
    progress: Progress
    input: JobInput
    model_id: str | None = Field(None, description="the catalog model it runs on (`GET /v1/models`)")
    model: ModelInfo | None = Field(None, description="the model and revision that ran it")
    waiting_for: Literal["worker"] | None = Field(
        None, description="`worker`: queued while no worker of its model is ready (it may be scaled from zero)"
    )
    outputs: list[Output] = Field(default_factory=list)
    nsfw_content_detected: list[bool] | None = None
    safety: str | None = Field(None, description="the safety policy that judged the outputs (none, flag, blur, block)")
    error: ErrorInfo | None = None
    metrics: Metrics = Field(default_factory=Metrics)
    attempts: int = 0


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Job]
    has_more: bool
    next_cursor: str | None = None


class ErrorBody(BaseModel):
    error: ErrorInfo


class StoredOutput(BaseModel):
    """An output as the job store keeps it: an S3 key, signed into a URL when read."""

    key: str
    content_type: str
    width: int
    height: int
