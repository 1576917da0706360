"""A job as stored: one Redis hash while it lives, one S3 manifest once it has ended."""

from __future__ import annotations

import json
import secrets
import time
from datetime import UTC, datetime
from typing import Any

from shared import keys
from shared.schemas import ErrorInfo, JobInput, ModelInfo, Status, StoredOutput

# Live only: never copied into the durable manifest.
# Fields that mean something only while the record lives (leases, step tokens, the terminal webhook's mark).
_LIVE_FIELDS = ("owner", "lease_until", "cancel_requested", "events", "step", "step_from", "end_webhook", "erase")


def encode(v: Any) -> str:
    """A Redis hash value: '' for None, JSON for containers, exact floats."""
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    if isinstance(v, (dict, list, bool)):
        return json.dumps(v)
    return repr(v) if isinstance(v, float) else str(v)


def rfc3339(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_job_id() -> str:
    """Time-ordered ids (ms clock, then randomness): lexical order is creation order."""
    return f"{int(time.time() * 1000):012x}{secrets.token_hex(10)}"


# Not stored: set on the record `JobStore.create` answers, the jobs ahead of it as it was queued (what
# the submit's 202 says, without another round trip).
AHEAD_AT_SUBMIT = "_ahead_at_submit"
ETA_AT_SUBMIT = "_eta_at_submit"  # its ETA in seconds then ('' unknown)


class JobRecord:
    """A job as stored: what the API shows plus what only the service needs (keys, owner)."""

    __slots__ = ("fields",)

    def __init__(self, fields: dict[str, str]):
        self.fields = fields

    def _f(self, name: str) -> float | None:
        v = self.fields.get(name)
        return float(v) if v not in (None, "") else None

    def _j(self, name: str) -> Any:
        v = self.fields.get(name)
        return json.loads(v) if v else None

    id = property(lambda self: self.fields["id"])
    tenant = property(lambda self: self.fields["tenant"])
    status = property(lambda self: Status(self.fields["status"]))
    image_key = property(lambda self: self.fields["image_key"])
    mask_key = property(lambda self: self.fields["mask_key"])
    owner = property(lambda self: self.fields.get("owner", ""))
    # Stored as `bkey` (its name in earlier releases): what jobs must share to run in one pipeline call.
    compat_key = property(lambda self: self.fields.get("bkey", ""))
    batch_id = property(lambda self: self.fields.get("batch", ""))  # the scoring batch of a batch row
    # The catalog model it runs on (its short name; '' in records of single-model releases: the default),
    # and that model's lane ('': the default model's), which only that model's workers serve (shared.catalog).
    model_name = property(lambda self: self.fields.get("model_name", ""))
    lane = property(lambda self: self.fields.get("lane", ""))
    trace = property(lambda self: self.fields.get("trace", ""))  # its submit's traceparent (shared.tracing)
    priority = property(lambda self: self.fields.get("priority") or "interactive")  # its class: interactive, bulk
    rows = property(lambda self: int(self.fields.get("rows") or 1))  # pipeline rows: its outputs
    solo = property(lambda self: self.fields.get("solo") == "1")  # broke a micro-batch: runs alone from now
    erased = property(lambda self: bool(self.fields.get("erase")))  # deleted (DELETE): gone once erased
    created_at = property(lambda self: self._f("created_at") or 0.0)
    ahead_at_submit = property(lambda self: int(v) if (v := self.fields.get(AHEAD_AT_SUBMIT)) else None)
    eta_at_submit = property(lambda self: self._f(ETA_AT_SUBMIT))
    started_at = property(lambda self: self._f("started_at"))
    finished_at = property(lambda self: self._f("finished_at"))
    inference_s = property(lambda self: self._f("inference_s"))
    attempts = property(lambda self: int(self.fields.get("attempts") or 0))
    events = property(lambda self: int(self.fields.get("events") or 0))
    progress = property(
        lambda self: (int(self.fields.get("progress_step") or 0), int(self.fields.get("progress_total") or 0))
    )

    @property
    def keys(self) -> list[str]:
        """The Redis keys a status change of this job touches (shared.jobs.scripts)."""
        return keys.for_job(self.id, self.tenant, self.compat_key, self.priority, self.batch_id, self.lane)

    @property
    def adapters(self) -> list[dict[str, Any]]:
        """Its LoRA adapters as the worker fetches them: [{"id", "sha256", "scale"}] (`shared.loras`)."""
        return self._j("adapters") or []

    @property
    def input(self) -> JobInput:
        return JobInput.model_validate_json(self.fields["input"])

    @property
    def outputs(self) -> list[StoredOutput]:
        return [StoredOutput.model_validate(o) for o in self._j("outputs") or []]

    @property
    def error(self) -> ErrorInfo | None:
        e = self._j("error")
        return ErrorInfo.model_validate(e) if e else None

    @property
    def model(self) -> ModelInfo | None:
        m = self._j("model")
        return ModelInfo.model_validate(m) if m else None

    @property
    def nsfw(self) -> list[bool] | None:
        return self._j("nsfw")  # type: ignore[no-any-return]

    def manifest(self) -> dict[str, Any]:
        """The durable copy written to S3 when the job ends."""
        doc: dict[str, Any] = {k: v for k, v in self.fields.items() if k not in _LIVE_FIELDS}
        doc["manifest_version"] = "1"
        return doc

    @classmethod
    def from_manifest(cls, doc: dict[str, Any]) -> JobRecord:
        return cls({k: str(v) for k, v in doc.items() if k != "manifest_version"})
