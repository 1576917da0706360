"""API keys: random, shown once, stored and compared only as SHA-256 hashes."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

import redis

from shared import keys

OPEN_TENANT = "default"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> str:
    return "ink_" + secrets.token_urlsafe(32)


class KeyStore:
    """Keys made with `inpaint keys create`: hash → tenant in Redis."""

    def __init__(self, r: redis.Redis):
        self.r = r

    def add(self, key_hash: str, tenant: str) -> None:
        self.r.hset(keys.api_keys(), key_hash, tenant)

    def revoke(self, key_hash: str) -> bool:
        return bool(self.r.hdel(keys.api_keys(), key_hash))

    def tenant_for(self, key_hash: str) -> str | None:
        return self.r.hget(keys.api_keys(), key_hash)  # type: ignore[return-value]

    def count(self) -> int:
        return int(self.r.hlen(keys.api_keys()))  # type: ignore[arg-type]


class Authenticator:
    """Resolves a bearer key to its tenant: keys from the environment, then keys created with `inpaint keys`."""

    def __init__(self, env_keys: dict[str, str], store: KeyStore, cache_s: float = 2.0):
        # Only hashes stay in memory; comparison is constant-time over every configured key.
        self._env = [(bytes.fromhex(hash_key(k)), t) for k, t in env_keys.items()]
        self._store = store
        self._cache_s = cache_s
        self._stored_count = (0, -1e9)

    def _has_stored_keys(self) -> bool:
        count, at = self._stored_count
        if time.monotonic() - at > self._cache_s:
            count = self._store.count()
            self._stored_count = (count, time.monotonic())
        return count > 0

    def is_open(self) -> bool:
        """No key configured anywhere: every request is the default tenant."""
        return not self._env and not self._has_stored_keys()

    def tenant_for(self, key: str | None) -> str | None:
        """The tenant of `key`, OPEN_TENANT when the API runs open, None when refused."""
        if self.is_open():
            return OPEN_TENANT
        if not key:
            return None
        digest = hash_key(key)
        raw = bytes.fromhex(digest)
        found = None
        for h, tenant in self._env:
            if hmac.compare_digest(h, raw):
                found = tenant
        if found:
            return found
        return self._store.tenant_for(digest)
