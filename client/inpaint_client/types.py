"""The shapes the API answers with, for type checkers (at run time they are plain dicts)."""

from __future__ import annotations

from typing import Any, Literal, TypedDict

Status = Literal["queued", "running", "succeeded", "failed", "canceled"]
TERMINAL: tuple[Status, ...] = ("succeeded", "failed", "canceled")


class Output(TypedDict, total=False):
    url: str
    download_url: str | None
    content_type: str
    width: int
    height: int


class Progress(TypedDict):
    step: int
    total: int


class ErrorInfo(TypedDict):
    code: str
    message: str


class Job(TypedDict, total=False):
    id: str
    status: Status
    created_at: str
    started_at: str | None
    finished_at: str | None
    queue_position: int | None
    eta_s: float | None
    progress: Progress
    input: dict[str, Any]
    model: dict[str, str] | None
    outputs: list[Output]
    nsfw_content_detected: list[bool] | None
    safety: str | None
    error: ErrorInfo | None
    metrics: dict[str, Any]
    attempts: int


class JobPage(TypedDict):
    object: Literal["list"]
    data: list[Job]
    has_more: bool
    next_cursor: str | None


class Batch(TypedDict, total=False):
    id: str
    status: Literal["queued", "running", "succeeded", "failed", "canceled"]
    created_at: str
    finished_at: str | None
    counts: dict[str, int]
    progress: dict[str, int | None]
    error_threshold: int
    error: str | None
    manifest_url: str | None
    jobs: list[str | None]
    rejected_rows: list[dict[str, Any]]


class LoraRef(TypedDict, total=False):
    """A job's LoRA adapter: an uploaded one's `id` or an https:// `url`, and its `scale` (default 1)."""

    id: str
    url: str
    scale: float


class Lora(TypedDict, total=False):
    """An uploaded adapter (`POST /v1/loras`)."""

    id: str
    object: Literal["lora"]
    name: str
    size: int
    sha256: str
    family: str | None
    created_at: str


class Model(TypedDict, total=False):
    """A served model (`GET /v1/models`): Replicate's model object and this service's additions."""

    id: str  # owner/name, what a job's `model` may name (its short_name too)
    short_name: str
    revision: str | None
    family: str
    licence: dict[str, Any]
    input_limits: dict[str, Any]
    ready_workers: int  # 0: its jobs wait until a worker starts (it may be scaled from zero)
    queue_depth: int
    eta_s: float | None
    owner: str
    name: str
    url: str
    description: str


class Event(TypedDict):
    """One Server-Sent Event of a job: `status`, `progress`, or its terminal status."""

    event: str
    id: str | None
    data: Any
