"""Typed dependencies: the services the routes share, and the tenant behind the request."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from celery import Celery
from fastapi import Depends, Header, Request
from prometheus_client import CollectorRegistry

from api.errors import ApiError
from shared.auth import Authenticator
from shared.config import Settings
from shared.jobstore import JobStore
from shared.notify import Notifier
from shared.storage import Storage


@dataclass
class Services:
    settings: Settings
    store: JobStore
    storage: Storage
    auth: Authenticator
    celery: Celery
    notify: Notifier
    metrics: CollectorRegistry


def get_services(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]


ServicesDep = Annotated[Services, Depends(get_services)]


def current_tenant(svc: ServicesDep, authorization: Annotated[str | None, Header()] = None) -> str:
    """The tenant of the bearer key; 401 when keys exist and this one is missing or unknown."""
    key = None
    if authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            key = token.strip()
    tenant = svc.auth.tenant_for(key)
    if tenant is None:
        raise ApiError(
            401,
            "unauthorized",
            "a valid API key is required: Authorization: Bearer <key>",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return tenant


TenantDep = Annotated[str, Depends(current_tenant)]
