"""`/v1/webhooks/default/secret`: the calling tenant's webhook signing secret, and its rotation."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from api.deps import ServicesDep, TenantDep

router = APIRouter(prefix="/v1/webhooks/default", tags=["webhooks"])


class WebhookSecret(BaseModel):
    key: str = Field(description="Standard Webhooks secret: whsec_ + base64; verify `webhook-signature` with it")


@router.get("/secret", response_model=WebhookSecret, summary="Your webhook signing secret")
def get_secret(svc: ServicesDep, tenant: TenantDep) -> WebhookSecret:
    """Made on first use; every delivery of your jobs is signed with it (and nobody else's are)."""
    return WebhookSecret(key=svc.webhook_secrets.current(tenant))


@router.post("/secret/rotate", response_model=WebhookSecret, summary="Rotate your webhook signing secret")
def rotate_secret(svc: ServicesDep, tenant: TenantDep) -> WebhookSecret:
    """A new secret; the previous one keeps signing beside it for `INPAINT_WEBHOOK_ROTATION_OVERLAP_S`."""
    return WebhookSecret(key=svc.webhook_secrets.rotate(tenant))
