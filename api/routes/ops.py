"""Probes and metrics for operators.

`/metrics` and the detail of `/readyz` (models, workers, auth mode) are for operators, not for everyone
who can reach the API port: with `INPAINT_METRICS_TOKEN` set they need `Authorization: Bearer <token>`;
without one they are open outside production (a laptop, the suite) and closed in production (/metrics
404, /readyz only ready or not). A token, not a port of its own: every API process behind the one port
answers it, however many a pod or a host runs.
"""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.deps import ServicesDep
from shared.config import Settings
from shared.errors import Code, Problem

router = APIRouter(tags=["operations"])


def _operator(request: Request, s: Settings) -> bool | None:
    """True: the caller may see operator detail; False: a token is set and was not given; None: no token
    is set (open outside production, closed in it)."""
    if not s.metrics_token:
        return None
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), s.metrics_token.encode())


@router.get("/healthz", summary="The process is up")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Redis and S3 reachable, a worker with its pipeline loaded")
def readyz(request: Request, svc: ServicesDep) -> JSONResponse:
    redis_ok = svc.jobs.ping()
    s3_ok = svc.storage.ping()
    workers = svc.registry.ready() if redis_ok else []
    ready = redis_ok and s3_ok and bool(workers)
    status = 200 if ready else 503
    allowed = _operator(request, svc.settings)
    if allowed is False or (allowed is None and svc.settings.environment == "production"):
        # Anyone may learn what the page shows (the open mode is announced there): never worker names.
        anonymous = {"status": "ready" if ready else "not_ready", "auth": svc.settings.auth}
        return JSONResponse(anonymous, status_code=status)
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
    return JSONResponse(body, status_code=status)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics(request: Request, svc: ServicesDep) -> Response:
    """Service-wide counts and queue state from Redis, then this API process's own metrics."""
    allowed = _operator(request, svc.settings)
    if allowed is False:
        raise Problem(401, Code.unauthorized, "/metrics needs the metrics token (Authorization: Bearer …)")
    if allowed is None and svc.settings.environment == "production":
        raise Problem(404, Code.not_found, "not found")  # closed: no token is configured
    cluster = generate_latest(request.app.state.cluster_metrics)
    return Response(cluster + generate_latest(), media_type=CONTENT_TYPE_LATEST)
