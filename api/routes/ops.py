"""Probes and metrics for operators."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.deps import ServicesDep

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="The process is up")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Redis and S3 reachable, a worker with its pipeline loaded")
def readyz(svc: ServicesDep) -> JSONResponse:
    redis_ok = svc.jobs.ping()
    s3_ok = svc.storage.ping()
    workers = svc.registry.ready() if redis_ok else []
    ready = redis_ok and s3_ok and bool(workers)
    models = sorted({f"{w.get('model')}@{w.get('revision')}" for w in workers})
    body = {
        "status": "ready" if ready else "not_ready",
        "checks": {"redis": redis_ok, "s3": s3_ok, "workers": len(workers)},
        "models": models,  # what the ready workers serve, `name@revision`
        # the classical OpenCV fallback ignores prompts: a deployment should know it is serving it
        "fallback": any(w.get("model") == "classical" for w in workers),
        "auth": svc.settings.auth,  # "none": open single-user mode, every caller is tenant `default`
        "workers": workers,
    }
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics(request: Request) -> Response:
    """Service-wide counts and queue state from Redis, then this API process's own metrics."""
    cluster = generate_latest(request.app.state.cluster_metrics)
    return Response(cluster + generate_latest(), media_type=CONTENT_TYPE_LATEST)
