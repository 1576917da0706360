"""LoRA adapters: uploaded (`POST /v1/loras`) or fetched once from a job's URL, kept by their content.

The bytes are one S3 object per content (`loras/<sha256>.safetensors`) however many tenants hold it;
each tenant's adapter is a record in Redis (`lora_<24 hex of the sha256>`), and the set of tenants
holding the content (`keys.lora_owners`) says when the last one is gone and the object may go. The
object is written and deleted only under a lock per content, so an upload never races a delete.

At submit, `resolve_for_job` turns a job's `loras` into what the job keeps (ids, hashes, scales),
each checked against the job's model (`catalog.Model.lora_fit`); `adapters_key` is the part of the
micro-batch compatibility key that keeps jobs with other adapters or scales apart.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import redis
from redis.exceptions import LockError

from shared import keys
from shared.catalog import Model
from shared.config import Settings
from shared.errors import Code, Problem, unavailable
from shared.fetch import fetch_all, fetch_image
from shared.jobs.record import rfc3339
from shared.lora_format import Signature, misfit, read
from shared.lora_format import adapters_key as adapters_key  # the compatibility key's part, for callers here
from shared.schemas import MAX_LORAS, LoraRef
from shared.storage import Storage, StorageError

if TYPE_CHECKING:
    from shared.services import Services

_ID = re.compile(r"lora_[0-9a-f]{24}")
MAX_NAME_CHARS = 255
LOCK_S = 600  # an S3 put of the largest adapter fits well inside; a dead holder's lock lapses after it
LOCK_WAIT_S = 30


def object_key(sha256: str) -> str:
    """The S3 object that holds an adapter's bytes (shared by every tenant that holds them)."""
    return f"loras/{sha256}.safetensors"


def lora_id(sha256: str) -> str:
    return f"lora_{sha256[:24]}"


@dataclass(frozen=True)
class LoraRecord:
    id: str
    tenant: str
    name: str
    size: int
    sha256: str
    signature: dict[str, Any]
    created_at: float

    def sig(self) -> Signature:
        return Signature.from_dict(self.signature)

    def to_api(self) -> dict[str, Any]:
        """The adapter object."""
        sig = self.sig()
        return {
            "id": self.id,
            "object": "lora",
            "name": self.name,
            "size": self.size,
            "sha256": self.sha256,
            "family": sig.family or None,
            "component": sig.component or None,
            "key_dim": sig.key_dim,
            "rank": sig.rank,
            "text_encoders": list(sig.text_encoders),
            "format": sig.format,
            "created_at": rfc3339(self.created_at),
        }

    def encode(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def decode(cls, raw: str | bytes) -> LoraRecord:
        return cls(**json.loads(raw))


def too_large(limit: int, field: str = "content") -> Problem:
    # 413 as for an image over its limit: the size, not the content, is at fault.
    return Problem(413, Code.lora_too_large, f"`{field}`: the adapter is larger than {limit} bytes", field)


def checked(data: bytes, settings: Settings, field: str = "content") -> Signature:
    """The adapter's signature when `data` is an adapter file within the size limit, else a Problem."""
    if len(data) > settings.lora_max_bytes:
        raise too_large(settings.lora_max_bytes, field)
    try:
        return read(data)
    except Problem as exc:
        exc.param = field
        raise


class Loras:
    """The tenants' adapters."""

    def __init__(self, r: redis.Redis, storage: Storage, settings: Settings):
        self.r, self.storage, self.settings = r, storage, settings

    def add(self, tenant: str, data: bytes, name: str = "", field: str = "content") -> tuple[LoraRecord, bool]:
        """Store an adapter as the tenant's (a Problem if it is not a fitting file); (record, True when
        it is new to the tenant). Content the tenant already holds answers its record as it was."""
        sig = checked(data, self.settings, field)
        sha = hashlib.sha256(data).hexdigest()
        found = self.get(tenant, lora_id(sha))
        if found is not None:
            return found, False
        cap = self.settings.max_loras_per_tenant
        if (
            self.r.zcard(keys.tenant_loras(tenant)) >= cap
        ):  # (racing uploads may pass it by a few: a bound, not a count)
            raise Problem(409, Code.too_many_loras, f"you hold {cap} adapters; delete one first", field)
        rec = LoraRecord(lora_id(sha), tenant, _clean_name(name), len(data), sha, sig.to_dict(), time.time())
        with self._bytes_lock(sha):
            self.r.sadd(keys.lora_owners(sha), tenant)  # before the put: a delete now keeps the object
            try:
                if not self.storage.exists(object_key(sha)):
                    self.storage.put(object_key(sha), data)
            except StorageError:
                if self.get(tenant, rec.id) is None:
                    self.r.srem(keys.lora_owners(sha), tenant)
                raise
        if not self.r.set(keys.lora(tenant, rec.id), rec.encode(), nx=True):
            return self.get(tenant, rec.id) or rec, False  # the same upload won a race: its record stands
        self.r.zadd(keys.tenant_loras(tenant), {rec.id: rec.created_at})
        return rec, True

    def get(self, tenant: str, lora_id: str) -> LoraRecord | None:
        """The tenant's adapter, or None (also for another tenant's id)."""
        if not _ID.fullmatch(lora_id):
            return None
        raw = self.r.get(keys.lora(tenant, lora_id))
        return None if raw is None else LoraRecord.decode(raw)  # type: ignore[arg-type]

    def list(self, tenant: str) -> list[LoraRecord]:
        """The tenant's adapters, newest first."""
        ids: list[str] = self.r.zrevrange(keys.tenant_loras(tenant), 0, -1)  # type: ignore[assignment]
        if not ids:
            return []
        raws: list[str | None] = self.r.mget([keys.lora(tenant, i) for i in ids])  # type: ignore[assignment]
        return [LoraRecord.decode(raw) for raw in raws if raw is not None]

    def delete(self, tenant: str, lora_id: str) -> bool:
        """Delete the tenant's adapter (its bytes too when no other tenant holds them); False when the
        tenant has no such adapter. Jobs already queued with it fail `lora_not_found` if its bytes go."""
        rec = self.get(tenant, lora_id)
        if rec is None:
            return False
        pipe = self.r.pipeline()
        pipe.delete(keys.lora(tenant, rec.id))
        pipe.zrem(keys.tenant_loras(tenant), rec.id)
        pipe.srem(keys.lora_owners(rec.sha256), tenant)
        pipe.execute()
        with self._bytes_lock(rec.sha256):
            if not self.r.scard(keys.lora_owners(rec.sha256)):
                self.storage.delete([object_key(rec.sha256)])
        return True

    def _bytes_lock(self, sha: str) -> Any:
        lock = self.r.lock(keys.lora_bytes_lock(sha), timeout=LOCK_S, blocking_timeout=LOCK_WAIT_S)
        try:
            if not lock.acquire():
                raise unavailable(Code.service_unavailable, "the adapter store (busy with this adapter)")
        except LockError:
            raise unavailable(Code.service_unavailable, "the adapter store") from None
        return _Held(lock)


class _Held:
    """A lock already acquired, released when the block ends (a lapsed lock is not an error then)."""

    def __init__(self, lock: Any):
        self.lock = lock

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        try:
            self.lock.release()
        except LockError:
            pass


def _clean_name(name: str) -> str:
    name = posixpath.basename(name.replace("\\", "/"))
    name = "".join(c for c in name if c.isprintable()).strip()
    return name[:MAX_NAME_CHARS] or "adapter.safetensors"


def _url_field(i: int) -> str:
    return f"loras[{i}].url"


def refs_in(fields: Mapping[str, Any]) -> list[LoraRef]:
    """The adapters a job's raw fields name (in Replicate's `input` wrapper too), for `fetch_urls` before
    the fields are validated; none when one entry is not valid (the job's validation refuses it then)."""
    for where in (fields, fields.get("input")):
        items = where.get("loras") if isinstance(where, Mapping) else None
        if isinstance(items, list) and items:
            if len(items) > MAX_LORAS:  # refused by the job's validation: nothing of it is fetched
                return []
            try:
                return [LoraRef.model_validate(item) for item in items]
            except ValueError:  # pydantic's ValidationError
                return []
    return []


async def fetch_urls(refs: Sequence[LoraRef], tenant: str, settings: Settings) -> dict[str, bytes]:
    """Fetch the adapters a job gives by URL, once each, on the API's fetch pool within the tenant's
    share (`shared.fetch.fetch_all`), up to INPAINT_LORA_MAX_BYTES: url → bytes, for `resolve_for_job`."""
    urls = [(ref.url, _url_field(i)) for i, ref in enumerate(refs) if ref.url]
    try:
        return await fetch_all(urls, tenant, settings, limit=settings.lora_max_bytes)
    except Problem as exc:
        raise _as_lora(exc, settings) from None


def _as_lora(exc: Problem, settings: Settings) -> Problem:
    """A fetch's `image_too_large` said as the adapter's own code."""
    if exc.code == Code.image_too_large:
        return too_large(settings.lora_max_bytes, exc.param or "loras")
    return exc


def resolve_for_job(
    svc: Services, tenant: str, refs: Sequence[LoraRef], model: Model, fetched: Mapping[str, bytes] | None = None
) -> list[dict[str, Any]]:
    """What a job keeps of its `loras`: [{"id", "sha256", "scale"}], each the tenant's adapter and
    fitting `model`; else a Problem naming the entry. A URL is taken from `fetched` (`fetch_urls`, in
    the API) or fetched here (blocking: run it in a thread), and stored as the tenant's adapter."""
    if not refs:
        return []
    if model.lora_fit is None:
        raise Problem(422, Code.lora_incompatible, f"model {model.name!r} takes no LoRA adapters", "loras")
    store = Loras(svc.r, svc.storage, svc.settings)
    out: list[dict[str, Any]] = []
    for i, ref in enumerate(refs):
        if ref.id is not None:
            rec = store.get(tenant, ref.id)
            if rec is None:
                raise Problem(
                    422, Code.lora_not_found, f"loras[{i}].id: you have no adapter {ref.id!r}", f"loras[{i}].id"
                )
        else:
            url, field = (ref.url or "").strip(), _url_field(i)
            try:
                data = fetched[url] if fetched and url in fetched else _fetch(url, field, svc.settings, tenant)
            except Problem as exc:
                raise _as_lora(exc, svc.settings) from None
            rec, _ = store.add(tenant, data, posixpath.basename(urlsplit(url).path), field)
        why = misfit(rec.sig(), model.lora_fit, model.name, model.family)
        if why:
            raise Problem(422, Code.lora_incompatible, f"loras[{i}] ({rec.id}): {why}", f"loras[{i}]")
        if any(a["sha256"] == rec.sha256 for a in out):
            msg = f"loras[{i}]: the same adapter twice; give it once with the scale you want"
            raise Problem(422, Code.validation_error, msg, f"loras[{i}]")
        out.append({"id": rec.id, "sha256": rec.sha256, "scale": float(ref.scale)})
    return out


def _fetch(url: str, field: str, settings: Settings, tenant: str) -> bytes:
    return fetch_image(url, field, settings, tenant, limit=settings.lora_max_bytes)
