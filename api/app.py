"""The FastAPI application factory."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry
from pydantic.json_schema import models_json_schema

from api import errors
from api.limits import BodySizeLimit
from api.routes import batches, events, jobs, ops, score
from shared.config import Settings, get_settings
from shared.metrics import ClusterCollector
from shared.schemas import ErrorBody, JobCreate
from shared.services import build_services
from shared.storage import StorageError

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API for `settings` (the environment's by default)."""
    settings = settings or get_settings()
    services = build_services(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            services.storage.ensure_bucket()
        except StorageError as exc:
            log.warning("S3 is not reachable yet (%s); /readyz will say so", exc)
        try:
            if services.auth.is_open():
                log.warning("no API key is configured: the API is OPEN, every caller is tenant 'default'")
        except Exception:  # noqa: BLE001 - Redis may come up after the API
            log.warning("Redis is not reachable yet; /readyz will say so")
        yield

    app = FastAPI(
        title="inpaint",
        version="0.1.0",
        summary="Image inpainting jobs: stable-diffusion-2-inpainting behind a queue",
        lifespan=lifespan,
    )
    app.state.services = services
    # Service-wide counts read from Redis at scrape time (shared.metrics), served beside this process's own.
    app.state.cluster_metrics = CollectorRegistry(auto_describe=False)
    app.state.cluster_metrics.register(ClusterCollector(services.r))
    errors.install(app)
    app.include_router(jobs.router)
    app.include_router(events.router)
    app.include_router(score.router)
    app.include_router(batches.router)
    app.include_router(ops.router)
    static = Path(__file__).parent / "static"
    app.mount("/static", StaticFiles(directory=static), name="static")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        """The page: paint a mask, submit, watch the job, compare the result."""
        return FileResponse(static / "index.html", headers={"Cache-Control": "no-cache"})

    app.add_middleware(BodySizeLimit, limit=settings.max_upload_bytes)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        # The job body is parsed by hand (JSON or multipart, with our own error codes): publish its schema.
        _, defs = models_json_schema(
            [(JobCreate, "validation"), (ErrorBody, "serialization")], ref_template="#/components/schemas/{model}"
        )
        schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
