"""The FastAPI application factory."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import swagger_ui_bundle
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry
from pydantic.json_schema import models_json_schema

from api import errors
from api.access import AccessLog
from api.gate import PUBLIC_PATHS, AuthGate
from api.hub import EventHub
from api.limits import BodySizeLimit
from api.routes import batches, events, files, jobs, loras, openai, ops, predictions, score, webhooks
from shared import catalog, tracing
from shared.config import Settings, get_settings
from shared.metrics import ClusterCollector
from shared.schemas import ErrorBody, JobCreate
from shared.services import build_services
from shared.storage import StorageError

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API for `settings` (the environment's by default)."""
    settings = settings or get_settings()
    tracing.setup("api")
    services = build_services(settings, interactive=True)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            services.storage.ensure_bucket()
        except StorageError as exc:
            log.warning("S3 is not reachable yet (%s); /readyz will say so", exc)
        if services.auth.is_open:
            log.warning("INPAINT_AUTH=none: the API is OPEN, every caller is tenant 'default' (single-user mode)")
        yield
        await app.state.hub.close()

    app = FastAPI(
        title="inpaint",
        version="0.1.0",
        summary="Image inpainting jobs: stable-diffusion-2-inpainting behind a queue",
        lifespan=lifespan,
        docs_url=None,  # served below from bundled Swagger UI assets, not a CDN
        redoc_url=None,
    )
    app.state.services = services
    app.state.hub = EventHub(settings)  # one Redis subscription for every event stream
    # Service-wide counts read from Redis at scrape time (shared.metrics), served beside this process's own.
    app.state.cluster_metrics = CollectorRegistry(auto_describe=False)
    # A model list that names nothing real, or a model whose licence is not accepted, is refused here:
    # its jobs would wait for ever.
    lanes = {m.name: catalog.lane(m, settings) for m in catalog.check_deployment(settings)}
    app.state.cluster_metrics.register(ClusterCollector(services.r, lanes))
    errors.install(app)
    app.include_router(jobs.router)
    app.include_router(events.router)
    app.include_router(score.router)
    app.include_router(batches.router)
    app.include_router(webhooks.router)
    app.include_router(openai.router)
    app.include_router(predictions.router)
    app.include_router(files.router)
    app.include_router(loras.router)
    app.include_router(ops.router)
    static = Path(__file__).parent / "static"
    app.mount("/static/swagger", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="swagger")
    app.mount("/static", StaticFiles(directory=static), name="static")
    page_csp = content_security_policy(settings)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        """The page: paint a mask, submit, watch the job, compare the result."""
        return FileResponse(static / "index.html", headers={"Cache-Control": "no-cache", **page_csp})

    @app.get("/docs", include_in_schema=False)
    def docs() -> FileResponse:
        """Swagger UI over /openapi.json."""
        return FileResponse(static / "docs.html", headers=DOCS_CSP)

    lora_upload = {("POST", "/v1/loras"): loras.body_limit(settings)}
    app.add_middleware(BodySizeLimit, limit=settings.max_upload_bytes, routes=lora_upload)
    app.add_middleware(AuthGate, auth=services.auth)  # no body is read before the key is checked
    app.add_middleware(AccessLog)  # outermost: every answer counted, logged and given its X-Request-Id
    tracing.instrument_app(app)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        # The job body is parsed by hand (JSON or multipart, with our own error codes): publish its schema.
        _, defs = models_json_schema(
            [(JobCreate, "validation"), (ErrorBody, "serialization")], ref_template="#/components/schemas/{model}"
        )
        schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
        # Every route but the public ones sits behind api.gate.AuthGate: say so, so clients send the key.
        schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        schema["security"] = [{"bearer": []}]
        for path, operations in schema["paths"].items():
            if path in PUBLIC_PATHS:
                for op in operations.values():
                    op["security"] = []
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def content_security_policy(settings: Settings) -> dict[str, str]:
    """The page's CSP: its own scripts and styles only; images also from the bucket (presigned results)."""
    endpoint = settings.s3_public_endpoint_url or settings.s3_endpoint_url
    parts = urlsplit(endpoint) if endpoint else None
    s3 = f"{parts.scheme}://{parts.netloc}" if parts else "https://*.amazonaws.com"
    policy = (
        f"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob: {s3}; "
        f"connect-src 'self' {s3}; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
    )
    return {"Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


# Swagger UI sets inline styles; its scripts still come only from this origin.
DOCS_CSP = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
}
