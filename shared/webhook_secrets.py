"""Webhook signing secrets, one per tenant, made on first use and rotated with an overlap.

Each tenant verifies its deliveries with its own secret, so no tenant can sign a body that another
tenant's receiver accepts. After a rotation the previous secret keeps signing beside the new one
(two `v1,` signatures, as Standard Webhooks allows) for `INPAINT_WEBHOOK_ROTATION_OVERLAP_S`, so
receivers can switch without losing a delivery. Secrets are stored encrypted (Fernet, with
`INPAINT_SECRETS_KEY`): a dump of Redis alone reveals none. In the open single-user mode
(`INPAINT_AUTH=none`) the one tenant signs with `INPAINT_WEBHOOK_SECRET`, which only the operator
changes.
"""

from __future__ import annotations

import base64
import secrets
import time

import redis
from cryptography.fernet import Fernet, MultiFernet

from shared import keys
from shared.auth import OPEN_TENANT
from shared.config import Settings
from shared.errors import Code, Problem

# KEYS: the tenant's secrets. ARGV: encrypted new secret, now, overlap seconds. The current secret
# becomes the previous one (signing until now + overlap) and the new one current, in one step.
_ROTATE = """
local cur = redis.call('HGET', KEYS[1], 'current')
if cur then
  redis.call('HSET', KEYS[1], 'previous', cur, 'previous_until', tonumber(ARGV[2]) + tonumber(ARGV[3]))
end
redis.call('HSET', KEYS[1], 'current', ARGV[1])
return 1
"""


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


class WebhookSecrets:
    def __init__(self, r: redis.Redis, settings: Settings):
        self.r, self.settings = r, settings
        self._fernet = MultiFernet([Fernet(k.encode()) for k in settings.resolved_secrets_key().split()])
        self._rotate = r.register_script(_ROTATE)

    def _fixed(self, tenant: str) -> bool:
        return self.settings.auth == "none" and tenant == OPEN_TENANT

    def current(self, tenant: str) -> str:
        """The tenant's secret, made on first use."""
        if self._fixed(tenant):
            return self.settings.resolved_webhook_secret()
        key = keys.webhook_secrets(tenant)
        self.r.hsetnx(key, "current", self._seal(new_secret()))
        return self._open(str(self.r.hget(key, "current")))

    def rotate(self, tenant: str) -> str:
        """A new secret; the previous one keeps signing for the overlap."""
        if self._fixed(tenant):
            raise Problem(
                409, Code.webhook_secret_fixed, "in open mode the secret is INPAINT_WEBHOOK_SECRET; change that setting"
            )
        fresh = new_secret()
        self._rotate(
            keys=[keys.webhook_secrets(tenant)],
            args=[self._seal(fresh), repr(time.time()), self.settings.webhook_rotation_overlap_s],
        )
        return fresh

    def signing(self, tenant: str) -> list[str]:
        """Every secret that signs the tenant's deliveries now: the current one, then the previous
        one while its overlap lasts."""
        if self._fixed(tenant):
            return [self.settings.resolved_webhook_secret()]
        current = self.current(tenant)
        previous, until = self.r.hmget(keys.webhook_secrets(tenant), ["previous", "previous_until"])
        if previous and until and float(until) > time.time():
            return [current, self._open(str(previous))]
        return [current]

    def _seal(self, secret: str) -> str:
        return self._fernet.encrypt(secret.encode()).decode()

    def _open(self, token: str) -> str:
        return self._fernet.decrypt(token.encode()).decode()
