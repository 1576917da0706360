"""Typed dependencies: the services the routes share, and the tenant behind the request."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from shared.errors import Code, Problem
from shared.services import Services


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
        raise Problem(
            401,
            Code.unauthorized,
            "a valid API key is required: Authorization: Bearer <key>",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return tenant


TenantDep = Annotated[str, Depends(current_tenant)]
