"""S3-compatible object storage: inputs, outputs and job manifests.

boto3, as the model card names: it speaks S3 to AWS and to any compatible server (SeaweedFS, MinIO),
takes credentials from the AWS chain when no static key is set (IRSA, EKS Pod Identity, instance
roles, SSO), retries throttling (standard or adaptive mode) and encrypts at rest on request (SSE-S3,
SSE-KMS). One client per process and role, made once: thread-safe, its connection pool sized to the
parallel puts and gets. Nothing outside this module knows which SDK it is.
"""

from __future__ import annotations

import contextvars
import json
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import boto3
import botocore.session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from shared.config import Settings

log = logging.getLogger(__name__)
_MISSING = ("NoSuchKey", "NoSuchBucket", "NotFound", "NoSuchObject", "404")
_POOL = 8  # parallel puts/gets of one Storage (put_many, get_many, delete_soon)
T = TypeVar("T")
_DELETE_BATCH = 1000  # keys per DeleteObjects request: S3's limit


class StorageError(Exception):
    """S3 could not be reached or refused an operation."""


class ObjectMissing(StorageError):
    """The object is not there (retrying will not bring it back)."""


def job_prefix(tenant: str, job_id: str) -> str:
    """Every object of a job lives under its tenant's prefix."""
    return f"tenants/{tenant}/jobs/{job_id}/"


def _in(parent: contextvars.Context, fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """`fn` run in a copy of the caller's context (its trace, its log ids) on a pool thread."""
    return lambda arg: parent.copy().run(fn, arg)


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _client(endpoint_url: str, settings: Settings, config: Config) -> Any:
    """A boto3 S3 client; static keys when both are set, else the default credential chain."""
    keys = (
        {"aws_access_key_id": settings.s3_access_key_id, "aws_secret_access_key": settings.s3_secret_access_key}
        if settings.s3_access_key_id and settings.s3_secret_access_key
        else {}
    )
    session = boto3.session.Session(botocore_session=botocore.session.Session())  # not the shared default
    return session.client(
        "s3",
        endpoint_url=endpoint_url or None,  # empty: AWS
        region_name=settings.s3_region,  # known region: presigning needs no round trip
        config=config,
        **keys,
    )


class Puts:
    """Puts under way (`Storage.start_puts`)."""

    def __init__(self, futures: list[Future[None]]):
        self.futures = futures

    def wait(self) -> None:
        """Until every put has landed; the first failure raises (StorageError)."""
        for f in self.futures:
            f.result()

    def then(self, fn: Callable[[], None]) -> None:
        """Call `fn` once every put has landed or failed (on the thread that ends the last one, or now)."""
        left = [len(self.futures)]
        lock = threading.Lock()

        def one_done(_: Future[None]) -> None:
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                fn()

        if not self.futures:
            fn()
        for f in self.futures:
            f.add_done_callback(one_done)


class Storage:
    """A bucket on an S3-compatible server (SeaweedFS, MinIO, AWS)."""

    def __init__(self, settings: Settings, interactive: bool = False):
        """`interactive`: someone waits on the answer (the API), so a server that does not answer is an
        error within seconds (the client gets a 503 to retry); else (workers) patience, and retries."""
        self.bucket = settings.s3_bucket
        self.expires = settings.presign_expires_s
        if interactive:
            timeouts: dict[str, Any] = {"connect_timeout": 1.5, "read_timeout": 3}
            retries: dict[str, Any] = {"total_max_attempts": 1, "mode": settings.s3_retry_mode}
        else:
            timeouts = {"connect_timeout": 3, "read_timeout": 30}
            retries = {"total_max_attempts": 3, "mode": settings.s3_retry_mode}
        config = Config(
            **timeouts,
            retries=retries,  # type: ignore[arg-type]
            max_pool_connections=64,  # the parallel puts/gets and, in the API, concurrent requests
            s3={"addressing_style": settings.s3_addressing_style},
            signature_version="s3v4",
            # Checksums only where S3 requires them: every S3-compatible server takes these requests
            # (boto3's default CRC trailers are refused by some), and no CPU goes on hashing images twice.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            tcp_keepalive=True,
        )
        self.client = _client(settings.s3_endpoint_url, settings, config)
        # Presigned URLs are signed for the host that clients use, which can differ inside compose/k8s.
        public = settings.s3_public_endpoint_url
        self._presigner = (
            _client(public, settings, config) if public and public != settings.s3_endpoint_url else self.client
        )
        self._put_extra: dict[str, str] = {}
        if settings.s3_sse != "none":
            self._put_extra["ServerSideEncryption"] = settings.s3_sse
            if settings.s3_sse == "aws:kms" and settings.s3_sse_kms_key_id:
                self._put_extra["SSEKMSKeyId"] = settings.s3_sse_kms_key_id
        self._executor: ThreadPoolExecutor | None = None

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if _code(exc) not in _MISSING:
                raise StorageError(f"bucket {self.bucket}: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"bucket {self.bucket}: {exc}") from exc
        try:
            self.client.create_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if _code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise StorageError(f"bucket {self.bucket}: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"bucket {self.bucket}: {exc}") from exc

    def ping(self) -> bool:
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return True
        except (ClientError, BotoCoreError):
            return False

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type, **self._put_extra)
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(f"put {key}: {exc}") from exc

    def get(self, key: str) -> bytes:
        data = self._get(key)
        if data is None:
            raise ObjectMissing(f"get {key}: no such object")
        return data

    def _get(self, key: str) -> bytes | None:
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=key)
            with resp["Body"] as body:
                return bytes(body.read())
        except ClientError as exc:
            if _code(exc) in _MISSING:
                return None
            raise StorageError(f"get {key}: {exc}") from exc
        except (BotoCoreError, OSError) as exc:
            raise StorageError(f"get {key}: {exc}") from exc

    def lines(self, key: str, offset: int = 0, chunk: int = 256 * 1024) -> Iterator[bytes]:
        """The object's lines from byte `offset` on, streamed, each with its newline (the last may lack one)."""
        try:
            ranged = {"Range": f"bytes={offset}-"} if offset else {}
            resp = self.client.get_object(Bucket=self.bucket, Key=key, **ranged)
        except ClientError as exc:
            if _code(exc) == "InvalidRange":  # the offset is the object's end: nothing left to read
                return
            if _code(exc) in _MISSING:
                raise ObjectMissing(f"get {key}: no such object") from exc
            raise StorageError(f"get {key}: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"get {key}: {exc}") from exc
        body = resp["Body"]
        try:
            rest = b""
            for part in body.iter_chunks(chunk):
                rest += part
                *done, rest = rest.split(b"\n")
                for line in done:
                    yield line + b"\n"
            if rest:
                yield rest
        except (BotoCoreError, OSError) as exc:
            raise StorageError(f"get {key}: {exc}") from exc
        finally:
            body.close()

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
            return True
        except ClientError as exc:
            if _code(exc) in _MISSING:
                return False
            raise StorageError(f"stat {key}: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"stat {key}: {exc}") from exc

    def delete(self, keys: list[str]) -> None:
        """Delete `keys` (absent ones too), one request per 1,000 (S3's DeleteObjects)."""
        for start in range(0, len(keys), _DELETE_BATCH):
            chunk = keys[start : start + _DELETE_BATCH]
            try:
                resp = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in chunk], "Quiet": True}
                )
            except (ClientError, BotoCoreError) as exc:
                raise StorageError(f"delete {chunk[0]}…: {exc}") from exc
            failed = [e for e in resp.get("Errors", []) if e.get("Code") not in _MISSING]
            if failed:
                raise StorageError(f"delete {failed[0].get('Key')}: {failed[0].get('Code')} {failed[0].get('Message')}")

    def delete_soon(self, keys: list[str], after: Puts | None = None) -> None:
        """Delete in the background (best effort, logged): a caller that must answer now does not wait
        for a store that may be unreachable. `after`: puts of those keys that may still be in flight,
        awaited first (without holding a pool thread), so that a put landing late does not outlive
        its delete."""
        if after is not None:
            after.then(lambda: self.delete_soon(keys))
            return

        def run() -> None:
            try:
                self.delete(keys)
            except StorageError:
                log.warning("could not delete %s; they stay until removed by hand or a lifecycle rule", keys)

        self._pool().submit(run)

    def _objects(self, prefix: str) -> Iterator[dict[str, Any]]:
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                yield from page.get("Contents", [])
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(f"list {prefix}: {exc}") from exc

    def list_keys(self, prefix: str) -> list[str]:
        return [str(o["Key"]) for o in self._objects(prefix)]

    def modified(self, prefix: str) -> dict[str, float]:
        """Each object under `prefix` and when it was last written (epoch seconds)."""
        return {str(o["Key"]): o["LastModified"].timestamp() for o in self._objects(prefix)}

    def put_many(self, items: list[tuple[str, bytes, str]]) -> None:
        """Several objects at once (in parallel: each put is a round trip)."""
        if len(items) == 1:
            self.put(*items[0])
            return
        self.start_puts(items).wait()

    def start_puts(self, items: list[tuple[str, bytes, str]]) -> Puts:
        """Several objects put in the background while the caller goes on; `wait()` on what it returns."""
        put = _in(contextvars.copy_context(), lambda it: self.put(*it))
        return Puts([self._pool().submit(put, it) for it in items])

    def get_many(self, keys: list[str]) -> list[bytes]:
        """Several objects at once, in parallel."""
        return self.get_each([(key, bytes) for key in keys])

    def get_each(self, reads: list[tuple[str, Callable[[bytes], T]]]) -> list[T]:
        """Several objects at once, each handed to its own function (a decoder) on the thread that
        fetched it, so one object's decoding overlaps the other's round trip. The first error raises."""
        return list(self._pool().map(_in(contextvars.copy_context(), lambda r: r[1](self.get(r[0]))), reads))

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=_POOL, thread_name_prefix="s3")
        return self._executor

    def put_json(self, key: str, doc: dict[str, Any]) -> None:
        self.put(key, json.dumps(doc, separators=(",", ":")).encode(), "application/json")

    def get_json(self, key: str) -> dict[str, Any] | None:
        """The document at `key`, or None when there is none."""
        body = self._get(key)
        return None if body is None else json.loads(body)  # type: ignore[no-any-return]

    def presign(self, key: str, download_as: str | None = None) -> str:
        """A GET URL for `key` that expires after the configured time; with `download_as`, one that a
        browser saves under that name instead of showing (a cross-origin link ignores `download`)."""
        params = {"Bucket": self.bucket, "Key": key}
        if download_as:
            params["ResponseContentDisposition"] = f'attachment; filename="{download_as}"'
        return str(self._presigner.generate_presigned_url("get_object", Params=params, ExpiresIn=self.expires))
