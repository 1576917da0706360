"""Turning a request into a job: validate fields and images, store the inputs, record, enqueue.

The same path for every way in: `POST /v1/jobs`, `/score` rows and scoring-batch rows.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any

import redis
from pydantic import ValidationError

from shared import catalog, loras, tracing
from shared.config import Settings
from shared.db import NotReplicated, confirm
from shared.errors import Code, Problem
from shared.fetch import fetch_image, is_url
from shared.imaging import decode_base64, inspect_image, read_header
from shared.jobs import inputs
from shared.jobs.idempotency import Reservation
from shared.jobs.record import JobRecord, new_job_id
from shared.jobs.routing import check_size, route
from shared.jobs.store import QueueFull
from shared.netguard import DnsUnavailable, UrlForbidden, check_url, webhook_rules
from shared.schemas import MAX_SEED, JobCreate, JobInput, LoraRef, compatibility_key
from shared.services import Services
from shared.storage import StorageError, job_prefix


class FieldsInvalid(Exception):
    """The fields do not make a job; `errors` are pydantic's, for a 422 that names the field."""

    def __init__(self, exc: ValidationError):
        self.errors = exc.errors()


IMAGE_FIELDS = ("image", "mask", "mask_image")


def image_urls(fields: dict[str, Any]) -> list[tuple[str, str]]:
    """(URL, field) of each image given by URL, in a job's fields or in Replicate's `input` wrapper."""
    found = []
    for where in (fields, fields.get("input")):
        if isinstance(where, dict):
            found += [(v, f) for f in IMAGE_FIELDS if isinstance(v := where.get(f), str) and is_url(v.strip())]
    return found


def validate_fields(
    fields: dict[str, Any],
    image: bytes | None,
    mask: bytes | None,
    settings: Settings,
    fetched: Mapping[str, bytes] | None = None,
) -> tuple[JobInput, bytes, bytes]:
    """The job's parameters and image bytes from request fields (with the files of a multipart body);
    an image given as an https:// URL is taken from `fetched` (`shared.fetch.fetch_all`, in the API),
    else fetched here (blocking: run it in a thread)."""
    if image is not None:  # multipart: files travel beside the fields
        fields = {**fields, "image": "-", "mask": "-"}
        fields.pop("mask_image", None)
        if mask is None:
            raise Problem(422, Code.validation_error, "mask: a mask file is required", "mask")
    try:
        req = JobCreate.model_validate(fields)
    except ValidationError as exc:
        raise FieldsInvalid(exc) from None
    params = req.params()
    if image is None:
        image = image_bytes(req.image, "image", settings, fetched)
        name = "mask" if req.mask is not None else "mask_image"
        mask = image_bytes(req.mask if req.mask is not None else req.mask_image or "", name, settings, fetched)
    assert mask is not None
    return params, image, mask


def image_bytes(value: str, field: str, settings: Settings, fetched: Mapping[str, bytes] | None = None) -> bytes:
    url = value.strip()
    if not is_url(url):
        return decode_base64(value, field)
    return fetched[url] if fetched and url in fetched else fetch_image(url, field, settings)


def submit_job(
    svc: Services,
    tenant: str,
    params: JobInput,
    image: bytes,
    mask: bytes,
    job_id: str | None = None,
    batch_id: str = "",
    idempotency: Reservation | None = None,
    extra: dict[str, str] | None = None,
    fetched: Mapping[str, bytes] | None = None,
) -> JobRecord:
    """Validate the images, store them, record the job and enqueue its id (blocking: run it in a thread).

    With `job_id` (a batch row's), a job that already exists is returned as it is: a retried row is
    never a second job. With `idempotency`, the job names its Idempotency-Key in the step that records it.
    `extra`: more fields of its record (`JobStore.create`). `fetched`: LoRA adapters given by URL, as the
    API fetched them (`shared.loras.fetch_urls`); any other is fetched here.
    """
    s = svc.settings
    if job_id is not None and (existing := svc.jobs.get(job_id)) is not None:
        return existing
    # The header first (format, pixel limit): the rest of each image is checked while the inputs travel.
    read_header(image, "image", s.max_pixels)
    read_header(mask, "mask", s.max_pixels)
    routed = route(params, s)  # its model (a 422 when not served here) and that model's defaults
    # Its adapters: the tenant's, fitting its model (a URL's stored as the tenant's), kept by id and hash.
    adapters = loras.resolve_for_job(svc, tenant, routed.params.loras, routed.model, fetched)
    params = routed.params.model_copy(update={"loras": [LoraRef(id=a["id"], scale=a["scale"]) for a in adapters]})
    if params.webhook:
        try:
            check_url(params.webhook, tenant=tenant, rules=webhook_rules(s))
        except UrlForbidden as exc:
            raise Problem(422, Code.webhook_url_forbidden, str(exc), "webhook") from None
        except DnsUnavailable as exc:  # a slow or hostile DNS server: not the URL's fault, retry
            raise exc.problem("webhook") from None
    # Before anything is uploaded: a full queue refused at the price of one read, and a Redis that does
    # not answer found before a write is sent that might still land after the client got its 503. Not
    # binding (concurrent submits may all pass it): the create step checks the caps again.
    waiting, waiting_mine = svc.jobs.waiting_counts(tenant, routed.lane)
    if waiting >= s.max_queued_jobs:
        raise _full("queue_full", s)
    if waiting_mine >= s.max_queued_per_tenant:
        raise _full("tenant_queue_full", s)
    if params.seed is None:
        # A drawn seed is recorded, so every job can be reproduced.
        params = params.model_copy(update={"seed": secrets.randbelow(MAX_SEED + 1)})
    job_id = job_id or new_job_id()
    # Image and mask travel as one object: one put here, one get in the worker.
    key = job_prefix(tenant, job_id) + "inputs"
    puts = svc.storage.start_puts([(key, inputs.pack(image, mask), inputs.CONTENT_TYPE)])
    try:
        # Each image is checked (inspect_image) while the inputs travel to storage: a truncated or corrupt
        # image is still refused before the job exists (and its stored bytes removed).
        img = inspect_image(image, "image", s.max_pixels)
        msk = inspect_image(mask, "mask", s.max_pixels)
        if (img.width, img.height) != (msk.width, msk.height):
            raise Problem(
                400,
                Code.mask_size_mismatch,
                f"the mask is {msk.width}×{msk.height} but the image is {img.width}×{img.height}",
                "mask",
            )
        # What the pipeline will see: the image, or, for crop_to_mask, the square it is cropped to.
        side = catalog.crop_size(routed.model, s)
        width, height = (side, side) if params.crop_to_mask else (img.width, img.height)
        check_size(routed.model, width, height)
        steps, guidance, strength = params.num_inference_steps, params.guidance_scale, params.strength
        compat = compatibility_key(width, height, steps, guidance, strength, loras.adapters_key(adapters))
        puts.wait()
        # The record and its turn in one atomic step: a job always has a turn, and only a job has one.
        turn = svc.queue.turn_message(job_id, routed.lane)
        weight = s.weight_of(tenant)
        trace = tracing.traceparent()
        idem = idempotency.entry(job_id) if idempotency is not None else None
        try:
            caps = (s.max_queued_jobs, s.max_queued_per_tenant)
            return svc.jobs.create(
                job_id, tenant, params, key, key, compat, batch_id, weight, turn, trace, idem, caps, extra,
                lane=routed.lane, model_name=routed.model.name, adapters=adapters,
            )  # fmt: skip
        except QueueFull as full:
            raise _full(str(full), s) from None
        except NotReplicated:
            # Made on the primary, not yet held by enough replicas: a failover now could lose it. Not
            # acknowledged; the client's retry with its Idempotency-Key finds it if it survives.
            raise _Unknown from None
        except redis.RedisError:
            # Its reply was lost, twice: the job may exist all the same. Read it back before deciding.
            if (made := _read_back(svc, job_id)) is not None:
                return made
            raise
    except (Problem, StorageError, redis.RedisError):
        # No job: no inputs either (a put that did land is removed, in the background once every put
        # has ended: the caller gets its 400 or 503 now, whatever state the store is in).
        svc.storage.delete_soon([key], after=puts)
        raise
    except _Unknown:
        # Whether the job exists cannot be known now: its inputs stay (a job may need them), and the
        # client's retry with its Idempotency-Key finds the job if it was made.
        raise Problem(
            503, Code.service_unavailable, "the job store did not answer; retry", headers={"Retry-After": "1"}
        ) from None


def _full(cap: str, s: Settings) -> Problem:
    if cap == "queue_full":
        return Problem(429, Code.queue_full, "the queue is full; retry later", headers={"Retry-After": "30"})
    # One tenant's backlog must not crowd out the others: its own limit, its own 429.
    return Problem(
        429,
        Code.tenant_queue_full,
        f"you have {s.max_queued_per_tenant} jobs waiting; retry when some have started",
        headers={"Retry-After": "10"},
    )


class _Unknown(Exception):
    """The job store ran the create or not: nobody can tell now."""


def _read_back(svc: Services, job_id: str) -> JobRecord | None:
    """The job if the create ran, None if it did not; `_Unknown` while the store does not answer, or
    when replicas must hold it (Sentinels) and none confirms that it does."""
    try:
        rec = svc.jobs.get(job_id)
        if rec is not None and not confirm(svc.r):
            raise _Unknown
        return rec
    except redis.RedisError:
        raise _Unknown from None
