"""Replicate's vocabulary over our jobs: the prediction object, model ids and versions.

A prediction is a job seen through Replicate's HTTP API, so that its clients (`pip install replicate`,
`replicate` on npm) work by changing their base URL. The prediction's id is the job's id, and the job
is also at `/v1/jobs/{id}`. Statuses: a queued job is `starting`, a running one `processing`; the
three endings are the same words. `logs` is a progress line in tqdm's format, which the clients parse
into `prediction.progress`. `output` is a list of URLs served by the API itself: Replicate's clients
fetch outputs with their own HTTP client, which sends the API key, and S3 refuses a presigned URL that
also carries an `Authorization` header. Where no API base URL is known (a webhook, without
`INPAINT_PUBLIC_URL`), the outputs are presigned S3 URLs, which need no key.

Models are named `owner/name` as on Replicate: `stabilityai/stable-diffusion-2-inpainting` for
`sd2-inpainting`, `inpaint/<name>` for the others. A version's id is the model's pinned revision.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from shared import catalog
from shared.config import Settings
from shared.jobs.record import JobRecord, rfc3339
from shared.schemas import Job, JobCreate, Status

SD2_REF = "stabilityai/stable-diffusion-2-inpainting"
OWNER = "inpaint"  # the owner of the models this service names itself
API_FIELD = "api"  # a job record's field: "prediction" when it was made through Replicate's API
MODEL_FIELD = "pmodel"  # the model it was asked of (`owner/name`), until a worker runs it
VERSION_FIELD = "pversion"  # and the version, when one was asked for
# Not versioned by cog: `cog_version` is not a version number, so clients make no guess from it.
COG_VERSION = "inpaint"

_STATUS = {
    Status.queued: "starting",
    Status.running: "processing",
    Status.succeeded: "succeeded",
    Status.failed: "failed",
    Status.canceled: "canceled",
}
# Replicate's webhook events, as ours (`webhook_events_filter` → `webhook_events`)
EVENTS = {"start": "started", "output": "progress", "logs": "progress", "completed": "completed"}


def model_ref(name: str) -> str:
    """`owner/name` of a model the service serves under `name` (INPAINT_MODEL's words)."""
    found = catalog.find(name)
    return found.ref if found else f"{OWNER}/{name}"


def model_name(ref: str) -> str | None:
    """The inverse of `model_ref`, or None when the id names no model of ours."""
    if (found := catalog.find(ref)) is not None:
        return found.name
    owner, _, name = ref.partition("/")
    return name if owner == OWNER and name and "/" not in name else None


@dataclass(frozen=True)
class Served:
    """A model some ready worker serves (or, before any is ready, the one configured)."""

    name: str
    revision: str  # '' until a worker that serves it is ready

    @property
    def ref(self) -> str:
        return model_ref(self.name)


def served_models(workers: list[dict[str, str]], settings: Settings) -> list[Served]:
    """The deployment's models (`shared.catalog.served`), each at the revision a ready worker serves
    ('' while none is: a prediction may be queued before the first worker is up). A deployment of
    INPAINT_MODEL=auto alone serves what its workers found: both of `auto`'s choices before any is ready."""
    revisions: dict[str, str] = {}
    for w in sorted(workers, key=lambda w: w.get("name", "")):
        if w.get("model"):
            revisions.setdefault(w["model"], w.get("revision", ""))
    if settings.model == "auto" and not settings.model_list():
        names = sorted(revisions) or [catalog.SD2, catalog.CLASSICAL]
    else:
        names = [m.name for m in catalog.served(settings)]
    return [Served(n, revisions.get(n, "")) for n in names]


def find_model(served: list[Served], ref: str) -> Served | None:
    return next((m for m in served if m.ref == ref), None)


def find_version(served: list[Served], version: str) -> Served | None:
    """A version id (a revision), or `owner/name:revision`, or `owner/name` alone."""
    ref, _, rev = version.rpartition(":") if ":" in version else ("", "", version)
    if "/" in rev:  # `owner/name` without a version
        return find_model(served, rev)
    return next((m for m in served if m.revision and m.revision == rev and (not ref or m.ref == ref)), None)


# Replicate's input names for inpainting models are ours; these are the ones a prediction may set.
INPUTS = frozenset(JobCreate.model_fields) - {"webhook", "webhook_events"}


def logs_of(job: Job) -> str:
    """The job's progress as tqdm prints it (`  40%|████      | 20/50`), which clients parse."""
    lines = []
    if job.started_at:
        step, total = job.progress.step, job.progress.total
        if total:
            filled = min(10, step * 10 // total)
            lines.append(f"{step * 100 // total:3d}%|{'█' * filled}{' ' * (10 - filled)}| {step}/{total}")
    if job.error:
        lines.append(f"{job.error.code}: {job.error.message}")
    return "\n".join(lines)


def to_prediction(rec: JobRecord, job: Job, base: str | None, waited: bool = False) -> dict[str, Any]:
    """The prediction object of a job. `base`: the API's external URL (outputs through the API), or None
    (presigned outputs). `waited`: the answer to a create that waited (`Prefer: wait`) and saw no end:
    `starting`, as Replicate answers then, so that clients go on polling."""
    name = job.model.name if job.model else model_name(rec.fields.get(MODEL_FIELD, "")) or ""
    ref = model_ref(name) if name else rec.fields.get(MODEL_FIELD, "")
    version = job.model.revision if job.model else rec.fields.get(VERSION_FIELD, "")
    status = _STATUS[job.status]
    if waited and not job.status.is_terminal:
        status = "starting"
    if base is not None:
        output = [f"{base}/v1/predictions/{job.id}/outputs/{i}" for i in range(len(job.outputs))]
    else:
        output = [o.url for o in job.outputs]
    removed = bool(rec.fields.get("expired_at"))  # past INPAINT_RETENTION_S: its outputs are gone
    given = job.input.model_dump(mode="json", exclude={"webhook", "webhook_events"})
    metrics: dict[str, Any] = {}
    if job.metrics.inference_s is not None:
        metrics["predict_time"] = job.metrics.inference_s
    if job.metrics.total_s is not None:
        metrics["total_time"] = job.metrics.total_s
    body: dict[str, Any] = {
        "id": job.id,
        "model": ref,
        "version": version,
        "input": given,
        "output": output if job.status is Status.succeeded and not removed else None,
        "logs": logs_of(job),
        "error": f"{job.error.code}: {job.error.message}" if job.error else None,
        "status": status,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "completed_at": job.finished_at,
        "data_removed": removed,
        "metrics": metrics,
        "source": "api",
    }
    if base is not None:
        body["urls"] = {"get": f"{base}/v1/predictions/{job.id}", "cancel": f"{base}/v1/predictions/{job.id}/cancel"}
    return body


def version_object(model: Served, first_seen: float | None = None) -> dict[str, Any]:
    """A model version: its revision, and an OpenAPI description of the inputs a prediction takes."""
    # One document: the schema's own definitions (enums) become components, their refs rewritten.
    schema = json.loads(json.dumps(JobCreate.model_json_schema(ref_template="#/components/schemas/{model}")))
    definitions = schema.pop("$defs", {})
    props = {k: v for k, v in schema.get("properties", {}).items() if k in INPUTS}
    for name in ("image", "mask", "mask_image"):
        props[name] = {**props.get(name, {}), "type": "string", "format": "uri"}
    props["image"]["description"] = "the image: a data: URL, an https:// URL, or a file of POST /v1/files"
    inputs = {"type": "object", "title": "Input", "required": ["prompt", "image"], "properties": props}
    output = {"type": "array", "title": "Output", "items": {"type": "string", "format": "uri"}}
    return {
        "id": model.revision,
        "created_at": rfc3339(first_seen if first_seen is not None else time.time()),
        "cog_version": COG_VERSION,
        "openapi_schema": {
            "openapi": "3.0.2",
            "info": {"title": model.ref, "version": model.revision},
            "paths": {},
            "components": {"schemas": {**definitions, "Input": inputs, "Output": output}},
        },
    }


def model_object(
    model: Served, base: str, first_seen: float | None = None, live: tuple[int, int, float | None] | None = None
) -> dict[str, Any]:
    """Replicate's model object, and what this service adds: the catalog's pinning, licence and input
    limits, and, with `live` (ready workers, waiting jobs, ETA: `Registry.lane_state`), its queue."""
    owner, _, name = model.ref.partition("/")
    entry = catalog.find(model.name) or catalog.local_model(model.name)
    limits = entry.limits
    ours: dict[str, Any] = {
        "id": model.ref,
        "short_name": model.name,
        "revision": model.revision or entry.revision or None,
        "family": entry.family,
        "pipeline": entry.pipeline or None,
        "licence": {"name": entry.licence or None, "url": entry.licence_url or None,
                    "restricted": entry.needs_acceptance},
        "input_limits": {"max_side": limits.max_side, "max_steps": limits.max_steps,
                         "default_steps": limits.default_steps, "default_guidance": limits.default_guidance,
                         "ignored_fields": sorted(limits.ignores)},
    }  # fmt: skip
    if live is not None:
        ours.update(ready_workers=live[0], queue_depth=live[1], eta_s=live[2])
    license_url = entry.licence_url or None
    return {
        **ours,
        "url": f"{base}/v1/models/{model.ref}",
        "owner": owner,
        "name": name,
        "description": f"{model.ref}, served by this inpainting service",
        "visibility": "private",
        "github_url": None,
        "paper_url": None,
        "license_url": license_url,
        "run_count": 0,
        "cover_image_url": None,
        "default_example": None,
        "latest_version": version_object(model, first_seen) if model.revision else None,
    }
