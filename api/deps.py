"""Typed dependencies: the services the routes share, and the tenant behind the request."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from shared.config import Settings
from shared.errors import Code, Problem
from shared.services import Services


# Both are `async def` though they never wait: FastAPI runs a plain `def` dependency on its thread
# pool, a thread hop (and a GIL hand-off) per dependency per request.
async def get_services(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]


ServicesDep = Annotated[Services, Depends(get_services)]


async def current_tenant(request: Request) -> str:
    """The tenant whose key `api.gate.AuthGate` checked before the route ran."""
    tenant = getattr(request.state, "tenant", None)
    if tenant is None:  # a route outside the gate asked for a tenant: refuse, never guess
        raise Problem(401, Code.unauthorized, "a valid API key is required", headers={"WWW-Authenticate": "Bearer"})
    return str(tenant)


TenantDep = Annotated[str, Depends(current_tenant)]


def base_url(request: Request, settings: Settings) -> str:
    """The API's external base URL, for links in answers: INPAINT_PUBLIC_URL when set, else the URL the
    request came to."""
    return (settings.public_url or str(request.base_url)).rstrip("/")
