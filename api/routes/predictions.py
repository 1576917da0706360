"""Replicate's prediction and model API over our jobs (`shared.predictions`), so that Replicate's own
clients run here by base URL: `replicate.Client(base_url=…)`, or `REPLICATE_BASE_URL`.

`POST /v1/predictions` (`{"version", "input", "webhook", "webhook_events_filter"}`) and
`POST /v1/models/{owner}/{name}/predictions` make a job; `Prefer: wait[=N]` answers once it ended, or,
after N seconds, as `starting`. `GET /v1/predictions[/{id}]`, `POST /v1/predictions/{id}/cancel`,
`GET /v1/predictions/{id}/outputs/{i}` (the output's bytes, behind the API key like every route),
`GET /v1/models[/{owner}/{name}[/versions[/{id}]]]`. Inputs are the job's fields; images are data:
URLs, https:// URLs (fetched once, behind the SSRF guard) or the tenant's files of `POST /v1/files`
(read from storage, never over the network). Errors are problem documents (`api.errors`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from api.deps import ServicesDep, TenantDep, base_url
from api.holds import Hold, holding
from api.requests import json_object, preferred_wait
from api.routes.jobs import tenant_job
from api.waiting import until_ended
from shared import catalog, keys, loras
from shared.errors import Code, Problem
from shared.fetch import fetch_all
from shared.files import file_id_in_url
from shared.jobs import lifecycle
from shared.jobs.record import JobRecord
from shared.jobs.submit import FieldsInvalid, image_bytes, image_urls, submit_job, validate_fields
from shared.jobs.view import find_job, own_outputs, to_job
from shared.predictions import (
    API_FIELD,
    EVENTS,
    INPUTS,
    MODEL_FIELD,
    VERSION_FIELD,
    Served,
    find_model,
    find_version,
    model_object,
    served_models,
    to_prediction,
    version_object,
)
from shared.services import Services
from shared.storage import ObjectMissing

router = APIRouter(tags=["replicate"])

_BODY = {"input", "version", "webhook", "webhook_completed", "webhook_events_filter", "stream"}
_IMAGES = ("image", "mask", "mask_image")


def _served(svc: Services) -> list[Served]:
    return served_models(svc.registry.ready(), svc.settings)


def _first_seen(svc: Services, model: Served) -> float:
    """When this service first served `model` at its revision: its version's `created_at`."""
    field = f"{model.ref}:{model.revision}"
    svc.r.hsetnx(keys.versions_seen(), field, repr(time.time()))
    return float(svc.r.hget(keys.versions_seen(), field) or time.time())


def _prediction(request: Request, svc: Services, rec: JobRecord, waited: bool = False) -> dict[str, Any]:
    return to_prediction(rec, to_job(rec, svc.storage), base_url(request, svc.settings), waited)


def _fields(
    svc: Services, tenant: str, body: dict[str, Any], hosts: set[str], fetched: dict[str, bytes]
) -> tuple[dict[str, Any], bytes | None, bytes | None]:
    """A prediction's body as a job's fields, and the images' bytes when one of them is a file of the
    tenant (named by a URL on this API's `hosts`): the other is then read as bytes too, by the same
    guarded fetch or decode as any image."""
    unknown = sorted(set(body) - _BODY)
    if unknown:
        raise Problem(422, Code.validation_error, f"{unknown[0]}: not a field of a prediction", unknown[0])
    given = body.get("input")
    if not isinstance(given, dict):
        raise Problem(422, Code.validation_error, "input: an object of the model's inputs is required", "input")
    wrong = sorted(set(given) - INPUTS)
    if wrong:
        raise Problem(422, Code.validation_error, f"input.{wrong[0]}: not an input of this model", f"input.{wrong[0]}")
    fields = dict(given)
    files = {name: fid for name in _IMAGES if isinstance(v := fields.get(name), str) and (fid := _file_id(v, hosts))}
    image = mask = None
    if files:
        got: dict[str, bytes] = {}
        for name in _IMAGES:
            value = fields.pop(name, None)
            if name in files:
                got[name] = svc.files.read(tenant, files[name])  # the tenant's own: never over the network
            elif isinstance(value, str):
                got[name] = image_bytes(value, name, svc.settings, fetched)
        image, mask = got.get("image"), got.get("mask", got.get("mask_image"))
        if image is None:
            raise Problem(422, Code.validation_error, "input.image: Field required", "input.image")
    if body.get("webhook") is not None and body.get("webhook_completed") is not None:
        raise Problem(
            422, Code.validation_error, "webhook_completed: give it or webhook, not both", "webhook_completed"
        )
    webhook = body.get("webhook") or body.get("webhook_completed")
    if webhook is not None:
        fields["webhook"] = webhook
        events = body.get("webhook_events_filter")
        if events is None:
            events = ["completed"] if body.get("webhook") is None else list(EVENTS)
        if not isinstance(events, list) or not all(isinstance(e, str) and e in EVENTS for e in events):
            raise Problem(422, Code.validation_error,
                          f"webhook_events_filter: a list of {', '.join(EVENTS)}", "webhook_events_filter")  # fmt: skip
        fields["webhook_events"] = sorted({EVENTS[e] for e in events})
    return fields, image, mask


def _file_id(url: str, hosts: set[str]) -> str | None:
    """A file of this API's: its URL names one of the hosts the API answers as. Elsewhere, a URL with
    the same path is someone else's file, fetched like any image."""
    return file_id_in_url(url) if urlsplit(url).netloc.lower() in hosts else None


def _hosts(request: Request, svc: Services) -> set[str]:
    found = {request.url.netloc.lower(), urlsplit(base_url(request, svc.settings)).netloc.lower()}
    return {h for h in found if h}


async def _create(
    request: Request,
    svc: Services,
    tenant: str,
    prefer: str | None,
    choose: Callable[[dict[str, Any], list[Served]], Served],
) -> Response:
    """A prediction of the model `choose` picks, from the body and what is served."""
    t0 = time.monotonic()
    if preferred_wait(prefer):
        async with holding(request, tenant) as hold:  # before any work: a refused wait creates nothing
            return await _predict(request, svc, tenant, prefer, choose, t0, hold)
    return await _predict(request, svc, tenant, prefer, choose, t0, None)


async def _predict(
    request: Request,
    svc: Services,
    tenant: str,
    prefer: str | None,
    choose: Callable[[dict[str, Any], list[Served]], Served],
    t0: float,
    hold: Hold | None,
) -> Response:
    body = await run_in_threadpool(json_object, await request.body())
    model = choose(body, await run_in_threadpool(_served, svc))
    body = {k: v for k, v in body.items() if k != "version"}
    hosts = _hosts(request, svc)
    # Image URLs (but the tenant's own files) on the fetch pool, within the tenant's share.
    urls = [(url, field) for url, field in image_urls(body) if not _file_id(url.strip(), hosts)]
    fetched = await fetch_all(urls, tenant, svc.settings)
    fetched = {**fetched, **await loras.fetch_urls(loras.refs_in(body), tenant, svc.settings)}  # adapters by URL

    def submit() -> JobRecord:
        fields, image, mask = _fields(svc, tenant, body, hosts, fetched)
        try:
            params, image_b, mask_b = validate_fields(fields, image, mask, svc.settings, fetched)
        except FieldsInvalid as exc:
            first: dict[str, Any] = dict(exc.errors[0]) if exc.errors else {}
            loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
            msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
            param = f"input.{loc}" if loc and loc not in ("webhook", "webhook_events") else loc
            raise Problem(422, Code.validation_error, f"{param}: {msg}" if param else msg, param or None) from None
        if any(model.name == m.name for m in catalog.served(svc.settings)):
            params = params.model_copy(update={"model": model.name})  # its queue (auto's fallback: the default's)
        extra = {API_FIELD: "prediction", MODEL_FIELD: model.ref, VERSION_FIELD: model.revision}
        return submit_job(svc, tenant, params, image_b, mask_b, extra=extra, fetched=fetched)

    rec = await run_in_threadpool(submit)
    wait_s = preferred_wait(prefer)
    headers = {"Location": f"/v1/predictions/{rec.id}"}
    if wait_s and hold is not None:
        # Counted from the request's arrival, with a margin: the client's read timeout is the wait + 0.5 s.
        headers["Preference-Applied"] = f"wait={wait_s:g}"
        left = max(0.0, wait_s - (time.monotonic() - t0) - 0.3)
        ended = await until_ended(request, svc, hold, rec.id, left) if left else None
        now = ended or await run_in_threadpool(svc.jobs.get, rec.id) or rec
        answer = await run_in_threadpool(_prediction, request, svc, now, True)
        return JSONResponse(answer, status_code=201, headers=headers)
    return JSONResponse(await run_in_threadpool(_prediction, request, svc, rec), status_code=201, headers=headers)


@router.post("/v1/predictions", status_code=201, summary="Create a prediction (Replicate's API)")
async def create_prediction(
    request: Request,
    svc: ServicesDep,
    tenant: TenantDep,
    prefer: Annotated[str | None, Header(description="`wait` or `wait=N` (N ≤ 60 s)")] = None,
) -> Response:
    """`{"version": <a served model's revision, or owner/name[:revision]>, "input": {…}}`."""

    def by_version(body: dict[str, Any], served: list[Served]) -> Served:
        version = body.get("version")
        if not isinstance(version, str) or not version:
            raise Problem(422, Code.validation_error, "version: the id of a version of a served model", "version")
        if (model := find_version(served, version)) is None:
            raise Problem(404, Code.not_found, f"no version {version!r} of a model served here")
        return model

    return await _create(request, svc, tenant, prefer, by_version)


@router.post("/v1/models/{owner}/{name}/predictions", status_code=201, summary="Create a prediction of a model")
async def create_model_prediction(
    owner: str,
    name: str,
    request: Request,
    svc: ServicesDep,
    tenant: TenantDep,
    prefer: Annotated[str | None, Header(description="`wait` or `wait=N` (N ≤ 60 s)")] = None,
) -> Response:
    """A prediction of the model's current version (`{"input": {…}}`)."""
    return await _create(request, svc, tenant, prefer, lambda _body, served: _named(served, owner, name))


@router.get("/v1/predictions", summary="List predictions")
def list_predictions(
    request: Request,
    svc: ServicesDep,
    tenant: TenantDep,
    cursor: Annotated[str | None, Query(max_length=64, pattern=r"^[0-9a-f]+$")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict[str, Any]:
    """The tenant's jobs, newest first, as predictions: `{"results", "next", "previous"}` (cursor pages)."""
    ids = svc.jobs.list_ids(tenant, limit + 1, cursor)
    results = []
    for jid, rec in zip(ids[:limit], svc.jobs.get_many(ids[:limit]), strict=True):
        if rec is None or rec.erased:
            rec = find_job(svc.jobs, svc.storage, tenant, jid)
        if rec is not None:
            results.append(_prediction(request, svc, rec))
    base = base_url(request, svc.settings)
    after = f"{base}/v1/predictions?cursor={ids[limit - 1]}&limit={limit}" if len(ids) > limit else None
    return {"previous": None, "next": after, "results": results}


@router.get("/v1/predictions/{prediction_id}", summary="Get a prediction")
def get_prediction(prediction_id: str, request: Request, svc: ServicesDep, tenant: TenantDep) -> dict[str, Any]:
    return _prediction(request, svc, tenant_job(svc, tenant, prediction_id))


@router.post("/v1/predictions/{prediction_id}/cancel", summary="Cancel a prediction")
def cancel_prediction(prediction_id: str, request: Request, svc: ServicesDep, tenant: TenantDep) -> dict[str, Any]:
    """Queued: canceled now; running: at its next denoising step; ended: answered as it is."""
    rec = tenant_job(svc, tenant, prediction_id)
    if not rec.status.is_terminal:
        lifecycle.cancel(svc, rec)
    return _prediction(request, svc, svc.jobs.get(prediction_id) or rec)


@router.get("/v1/predictions/{prediction_id}/outputs/{index}", summary="A prediction's output image")
def prediction_output(prediction_id: str, index: int, svc: ServicesDep, tenant: TenantDep) -> Response:
    """The bytes of output `index`: what `FileOutput.read()` of Replicate's client fetches, with the key."""
    rec = tenant_job(svc, tenant, prediction_id)
    outputs = own_outputs(rec)  # the same list the prediction's `output` numbers
    if not 0 <= index < len(outputs):
        raise Problem(404, Code.not_found, f"prediction {prediction_id} has no output {index}")
    out = outputs[index]
    try:
        data = svc.storage.get(out.key)
    except ObjectMissing:
        raise Problem(404, Code.not_found, f"prediction {prediction_id}'s output {index} is gone") from None
    return Response(data, media_type=out.content_type)


@router.get("/v1/models", summary="The models served here")
def list_models(request: Request, svc: ServicesDep) -> dict[str, Any]:
    base = base_url(request, svc.settings)
    results = [_model_object(svc, m, base) for m in _served(svc)]
    return {"previous": None, "next": None, "results": results}


def _model_object(svc: Services, model: Served, base: str) -> dict[str, Any]:
    """The model object with its live queue: ready workers, waiting jobs and a new job's ETA."""
    entry = catalog.find(model.name) or catalog.local_model(model.name)
    live = svc.registry.lane_state(catalog.lane(entry, svc.settings))
    return model_object(model, base, _first_seen(svc, model) if model.revision else None, live)


def _named(served: list[Served], owner: str, name: str) -> Served:
    if (model := find_model(served, f"{owner}/{name}")) is None:
        raise Problem(404, Code.not_found, f"no model {owner}/{name} is served here")
    return model


def _model(svc: Services, owner: str, name: str) -> Served:
    return _named(_served(svc), owner, name)


@router.get("/v1/models/{owner}/{name}", summary="A model served here")
def get_model(owner: str, name: str, request: Request, svc: ServicesDep) -> dict[str, Any]:
    return _model_object(svc, _model(svc, owner, name), base_url(request, svc.settings))


@router.get("/v1/models/{owner}/{name}/versions", summary="A model's versions")
def list_versions(owner: str, name: str, svc: ServicesDep) -> dict[str, Any]:
    model = _model(svc, owner, name)
    results = [version_object(model, _first_seen(svc, model))] if model.revision else []
    return {"previous": None, "next": None, "results": results}


@router.get("/v1/models/{owner}/{name}/versions/{version_id}", summary="A version of a model")
def get_version(owner: str, name: str, version_id: str, svc: ServicesDep) -> dict[str, Any]:
    model = _model(svc, owner, name)
    if not model.revision or version_id != model.revision:
        raise Problem(404, Code.not_found, f"no version {version_id!r} of {owner}/{name} is served here")
    return version_object(model, _first_seen(svc, model))
