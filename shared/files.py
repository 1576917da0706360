"""Uploaded files (`/v1/files`, Replicate's file API): the bytes in S3 under the tenant's prefix, the
record in Redis for as long as the file lives, and a sweep that deletes the bytes of expired files.

A file is written in three steps: its expiry is noted for the sweep, its bytes are put, then its record
is made visible under the tenant's cap. A process that dies between them leaves bytes that the sweep
deletes at the file's expiry, never a record without its bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import posixpath
import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

import redis

from shared import keys
from shared.config import Settings
from shared.errors import Code, Problem
from shared.jobs.record import rfc3339
from shared.storage import ObjectMissing, Storage, StorageError

log = logging.getLogger(__name__)

MAX_METADATA_BYTES = 4096  # a file's metadata, as compact JSON
MAX_NAME_CHARS = 255
_ID = re.compile(r"[0-9a-f]{32}")
_CONTENT_TYPE = re.compile(r"[\w!#$&^.+-]+/[\w!#$&^.+-]+( *;[ -~]*)?", re.ASCII)  # sent back as a header
_DOWNLOAD = re.compile(r"/v1/files/([\w-]+)/download\Z", re.ASCII)

# KEYS: the file's record, the tenant's files. ARGV: id, record, now, expires at, record TTL (ms), cap.
# Answers '' once the record is made, else the earliest expiry among the tenant's files (the cap is
# reached). The tenant's set lives as long as its newest file, whatever the TTL was when older ones came.
_CREATE = """
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[3])
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[6]) then
  return redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')[2]
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[5])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
local left = redis.call('PTTL', KEYS[2])
if left < tonumber(ARGV[5]) then redis.call('PEXPIRE', KEYS[2], ARGV[5]) end
return ''
"""


def file_key(tenant: str, file_id: str) -> str:
    """The object that holds a file's bytes, under its tenant's prefix."""
    return f"tenants/{tenant}/files/{file_id}"


def file_id_in_url(url: str) -> str | None:
    """The file id when the URL's path ends in `/v1/files/<id>/download` (any host: the caller decides
    whether to trust it), else None."""
    try:
        found = _DOWNLOAD.search(urlsplit(url).path)
    except ValueError:
        return None
    return found.group(1) if found else None


@dataclass(frozen=True)
class FileRecord:
    id: str
    tenant: str
    name: str
    content_type: str
    size: int
    sha256: str
    md5: str
    created_at: float
    expires_at: float
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return file_key(self.tenant, self.id)

    def to_api(self, base: str) -> dict[str, Any]:
        """The file object as Replicate answers it; `base`: the API's external base URL."""
        return {
            "id": self.id,
            "name": self.name,
            "content_type": self.content_type,
            "size": self.size,
            "etag": self.md5,
            "checksums": {"sha256": self.sha256, "md5": self.md5},
            "metadata": self.metadata,
            "created_at": rfc3339(self.created_at),
            "expires_at": rfc3339(self.expires_at),
            "urls": {"get": f"{base}/v1/files/{self.id}/download"},
        }

    def encode(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def decode(cls, raw: str) -> FileRecord:
        return cls(**json.loads(raw))


def _member(tenant: str, file_id: str) -> str:
    """A file in the expiry set: ids hold no '/', so the last one splits it back (`rpartition`)."""
    return f"{tenant}/{file_id}"


class Files:
    """The tenants' uploaded files: at most `max_files_per_tenant` each, each for `file_ttl_s`."""

    def __init__(self, r: redis.Redis, storage: Storage, settings: Settings):
        self.r, self.storage, self.settings = r, storage, settings
        self._create = r.register_script(_CREATE)

    def create(
        self,
        tenant: str,
        data: bytes,
        filename: str = "",
        content_type: str = "",
        metadata: dict[str, Any] | None = None,
    ) -> FileRecord:
        """Store a file: 413 `payload_too_large` over `max_upload_bytes`, 422 for a bad content type or
        metadata, 429 `too_many_files` at the tenant's cap (with Retry-After: when its oldest expires)."""
        if len(data) > self.settings.max_upload_bytes:
            msg = f"the file is larger than {self.settings.max_upload_bytes} bytes"
            raise Problem(413, Code.payload_too_large, msg, "content")
        metadata = _checked_metadata(metadata)
        content_type = content_type.strip() or "application/octet-stream"
        if len(content_type) > MAX_NAME_CHARS or not _CONTENT_TYPE.fullmatch(content_type):
            raise Problem(422, Code.validation_error, "content_type: not a media type (type/subtype)", "content_type")
        now = time.time()
        rec = FileRecord(
            id=secrets.token_hex(16),
            tenant=tenant,
            name=_clean_name(filename),
            content_type=content_type,
            size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            md5=hashlib.md5(data, usedforsecurity=False).hexdigest(),
            created_at=now,
            expires_at=now + self.settings.file_ttl_s,
            metadata=metadata,
        )
        # Refused before the upload when the cap is already reached; checked again, atomically, after it.
        if self.r.zcount(keys.tenant_files(tenant), f"({now!r}", "+inf") >= self.settings.max_files_per_tenant:
            raise self._full(self._earliest(tenant, now))
        self.r.zadd(keys.files_expiring(), {_member(tenant, rec.id): rec.expires_at})
        try:
            self.storage.put(rec.key, data, rec.content_type)
        except StorageError:
            self.r.zrem(keys.files_expiring(), _member(tenant, rec.id))
            raise
        now = time.time()
        ttl_ms = max(1, math.ceil((rec.expires_at - now) * 1000))
        cap = self.settings.max_files_per_tenant
        args: list[str | int] = [rec.id, rec.encode(), repr(now), repr(rec.expires_at), ttl_ms, cap]
        full = self._create(keys=[keys.file(rec.id), keys.tenant_files(tenant)], args=args)
        if full:
            self._forget(rec)
            raise self._full(float(full))
        return rec

    def _earliest(self, tenant: str, now: float) -> float:
        """When the tenant's oldest live file expires."""
        first = self.r.zrangebyscore(keys.tenant_files(tenant), f"({now!r}", "+inf", 0, 1, withscores=True)
        return float(first[0][1]) if first else now + 1  # type: ignore[index]

    def _full(self, earliest: float) -> Problem:
        cap = self.settings.max_files_per_tenant
        retry = max(1, math.ceil(earliest - time.time()))
        return Problem(
            429, Code.too_many_files, f"you hold {cap} files; delete one, or retry when the oldest expires in {retry}s",
            headers={"Retry-After": str(retry)},
        )  # fmt: skip

    def _forget(self, rec: FileRecord) -> None:
        """Delete the bytes of a file that was not recorded (best effort: else the sweep does, at expiry)."""
        try:
            self.storage.delete([rec.key])
        except StorageError:
            log.warning("file %s: its bytes stay until the sweep past its expiry", rec.id)
            return
        self.r.zrem(keys.files_expiring(), _member(rec.tenant, rec.id))

    def get(self, tenant: str, file_id: str) -> FileRecord | None:
        """The tenant's file, or None (also for another tenant's id, or once it has expired)."""
        if not _ID.fullmatch(file_id):
            return None
        raw = self.r.get(keys.file(file_id))
        if raw is None:
            return None
        rec = FileRecord.decode(str(raw))
        return rec if rec.tenant == tenant and rec.expires_at > time.time() else None

    def list(self, tenant: str) -> list[FileRecord]:
        """The tenant's files, newest first (at most its cap)."""
        now = time.time()
        ids: list[str] = self.r.zrangebyscore(keys.tenant_files(tenant), f"({now!r}", "+inf")  # type: ignore[assignment]
        if not ids:
            return []
        raws: list[str | None] = self.r.mget([keys.file(i) for i in ids])  # type: ignore[assignment]
        found = [FileRecord.decode(raw) for raw in raws if raw is not None]
        mine = [rec for rec in found if rec.tenant == tenant and rec.expires_at > now]
        return sorted(mine, key=lambda rec: (rec.created_at, rec.id), reverse=True)

    def delete(self, tenant: str, file_id: str) -> bool:
        """Delete the tenant's file, bytes first (S3 away: StorageError, and the file stays whole); False
        when there is no such file of the tenant's."""
        rec = self.get(tenant, file_id)
        if rec is None:
            return False
        self.storage.delete([rec.key])
        pipe = self.r.pipeline()
        pipe.delete(keys.file(rec.id))
        pipe.zrem(keys.tenant_files(tenant), rec.id)
        pipe.zrem(keys.files_expiring(), _member(tenant, rec.id))
        pipe.execute()
        return True

    def fetch(self, tenant: str, file_id: str) -> tuple[FileRecord, bytes]:
        """The tenant's file and its bytes; 404 `not_found` when it is missing or has expired."""
        rec = self.get(tenant, file_id)
        try:
            if rec is not None:
                return rec, self.storage.get(rec.key)
        except ObjectMissing:
            pass  # expired or deleted since the record was read
        raise Problem(404, Code.not_found, f"no file {file_id!r}")

    def read(self, tenant: str, file_id: str) -> bytes:
        """The bytes of the tenant's file; 404 `not_found` when it is missing or has expired."""
        return self.fetch(tenant, file_id)[1]

    def expire_due(self, limit: int = 1000) -> int:
        """Delete the bytes and records of files past their expiry; how many."""
        due: list[str] = self.r.zrangebyscore(keys.files_expiring(), "-inf", repr(time.time()), 0, limit)  # type: ignore[assignment]
        if not due:
            return 0
        parts = [member.rpartition("/") for member in due]
        self.storage.delete([file_key(tenant, file_id) for tenant, _, file_id in parts])
        pipe = self.r.pipeline()
        for tenant, _, file_id in parts:
            pipe.delete(keys.file(file_id))
            pipe.zrem(keys.tenant_files(tenant), file_id)
        pipe.zrem(keys.files_expiring(), *due)
        pipe.execute()
        return len(due)


def _clean_name(filename: str) -> str:
    """The file's own name, without the folders a client sent or control characters."""
    name = posixpath.basename(filename.replace("\\", "/"))
    name = "".join(c for c in name if c.isprintable()).strip()
    return name[:MAX_NAME_CHARS] or "file"


def _checked_metadata(metadata: dict[str, Any] | None) -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise Problem(422, Code.validation_error, "metadata: a JSON object", "metadata")
    if len(json.dumps(metadata, separators=(",", ":")).encode()) > MAX_METADATA_BYTES:
        raise Problem(422, Code.validation_error, f"metadata: at most {MAX_METADATA_BYTES} bytes of JSON", "metadata")
    return metadata
