"""API keys and the tenant behind a request.

Keys are random, shown once, and stored only as SHA-256 hashes with an id (for listing and revoking)
and a tenant. Auth fails closed: with `INPAINT_AUTH=keys` (the default) a request needs a valid key,
and no key configured anywhere means nobody gets in. The open single-user mode is only ever an
explicit `INPAINT_AUTH=none`, never inferred from what Redis holds (a flushed Redis must not open an
API). Each request looks its key up in Redis, so a revoked key is refused at once on every replica;
connections held open (event streams, waits) re-check theirs every second (`api.holds`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass

import redis

from shared import keys

OPEN_TENANT = "default"
LEGACY, LEGACY_DIGITS = "legacy_", 12  # an earlier release's key is listed by the start of its digest


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> str:
    return "ink_" + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class KeyInfo:
    id: str
    tenant: str
    created_at: float


class KeyStore:
    """Keys made with `inpaint keys create`: SHA-256 → id, tenant, creation time."""

    def __init__(self, r: redis.Redis):
        self.r = r

    def create(self, tenant: str) -> tuple[KeyInfo, str]:
        """A new key for `tenant`: its info, and the key itself (shown once, never stored)."""
        key = generate_key()
        info = KeyInfo("key_" + secrets.token_hex(8), tenant, time.time())
        digest = hash_key(key)
        pipe = self.r.pipeline()
        pipe.hset(keys.api_keys(), digest, json.dumps({"id": info.id, "tenant": tenant, "created_at": info.created_at}))
        pipe.hset(keys.api_key_ids(), info.id, digest)
        pipe.execute()
        return info, key

    def revoke(self, key_id: str) -> bool:
        """Revoke the key `keys list` shows as `key_id`; False if there is none."""
        if key_id.startswith(LEGACY):
            return self._revoke_legacy(key_id.removeprefix(LEGACY))
        digest = self.r.hget(keys.api_key_ids(), key_id)
        if digest is None:
            return False
        pipe = self.r.pipeline()
        pipe.hdel(keys.api_keys(), str(digest))
        pipe.hdel(keys.api_key_ids(), key_id)
        pipe.execute()
        return True

    def _revoke_legacy(self, prefix: str) -> bool:
        """An earlier release's key has no id entry: its id is the start of its digest, found by a scan
        (revoking is rare; the hash holds one entry per key)."""
        if len(prefix) != LEGACY_DIGITS or any(c not in "0123456789abcdef" for c in prefix):
            return False
        found = [
            digest
            for digest, value in self.r.hscan_iter(keys.api_keys(), match=prefix + "*")
            if not str(value).startswith("{")  # a newer key sharing the prefix keeps its own id
        ]
        return bool(found) and self.r.hdel(keys.api_keys(), *found) > 0

    def list(self, tenant: str | None = None) -> list[KeyInfo]:
        found: dict[str, str] = self.r.hgetall(keys.api_keys())  # type: ignore[assignment]
        infos = [_info(digest, value) for digest, value in found.items()]
        return sorted((i for i in infos if tenant is None or i.tenant == tenant), key=lambda i: i.created_at)

    def tenant_for(self, digest: str) -> str | None:
        value = self.r.hget(keys.api_keys(), digest)
        return None if value is None else _info(digest, str(value)).tenant

    def revoked(self, digests: Sequence[str]) -> set[str]:
        """Which of these key digests are no longer stored (one round trip)."""
        if not digests:
            return set()
        values: Sequence[str | None] = self.r.hmget(keys.api_keys(), digests)  # type: ignore[assignment]
        return {d for d, v in zip(digests, values, strict=True) if v is None}


def _info(digest: str, value: str) -> KeyInfo:
    if not value.startswith("{"):  # a key made by an earlier release: the bare tenant, no id
        return KeyInfo(LEGACY + digest[:LEGACY_DIGITS], value, 0.0)
    doc = json.loads(value)
    return KeyInfo(doc["id"], doc["tenant"], float(doc["created_at"]))


class Authenticator:
    """Resolves a bearer key to its tenant: keys from the environment, then keys made with `inpaint keys`."""

    def __init__(self, mode: str, env_keys: dict[str, str], store: KeyStore):
        self.mode = mode
        # Only hashes stay in memory; comparison is constant-time over every configured key.
        self._env = [(bytes.fromhex(hash_key(k)), t) for k, t in env_keys.items()]
        self._store = store

    @property
    def is_open(self) -> bool:
        return self.mode == "none"

    def env_tenant(self, key: str) -> str | None:
        """The tenant of an environment key (no I/O)."""
        raw = bytes.fromhex(hash_key(key))
        found = None
        for h, tenant in self._env:
            if hmac.compare_digest(h, raw):
                found = tenant
        return found

    def tenant_for(self, key: str | None) -> str | None:
        """The tenant of `key`, OPEN_TENANT in open mode, None when refused."""
        if self.is_open:
            return OPEN_TENANT
        if not key:
            return None
        return self.env_tenant(key) or self._store.tenant_for(hash_key(key))

    def revocable(self, key: str | None) -> str | None:
        """The digest to re-check while a connection `key` opened stays held: a stored key's (it can be
        revoked), None for an environment key or the open mode (neither can)."""
        if self.is_open or not key or self.env_tenant(key) is not None:
            return None
        return hash_key(key)
