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


class Event(TypedDict):
    """One Server-Sent Event of a job: `status`, `progress`, or its terminal status."""

    event: str
    id: str | None
    data: Any
