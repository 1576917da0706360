"""S3-compatible object storage: inputs, outputs and job manifests."""

from __future__ import annotations

import json
from typing import Any

import boto3
from botocore.client import Config
from botocore.exceptions import ClientError

from shared.config import Settings


class StorageError(Exception):
    """S3 could not be reached or refused an operation."""


def job_prefix(tenant: str, job_id: str) -> str:
    """Every object of a job lives under its tenant's prefix."""
    return f"tenants/{tenant}/jobs/{job_id}/"


class Storage:
    """A bucket on an S3-compatible server (SeaweedFS, MinIO, AWS)."""

    def __init__(self, settings: Settings):
        self.bucket = settings.s3_bucket
        self.presign_expires_s = settings.presign_expires_s
        cfg = Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            retries={"mode": "standard", "max_attempts": 3},
            connect_timeout=3,
            read_timeout=30,
            max_pool_connections=64,
        )
        common: dict[str, Any] = dict(
            aws_access_key_id=settings.s3_access_key_id,
            aws_secret_access_key=settings.s3_secret_access_key,
            region_name=settings.s3_region,
            config=cfg,
        )
        endpoint = settings.s3_endpoint_url or None
        self.client = boto3.client("s3", endpoint_url=endpoint, **common)
        # Presigned URLs are signed for the host that clients use, which can differ inside compose/k8s.
        public = settings.s3_public_endpoint_url or endpoint
        self._presigner = self.client if public == endpoint else boto3.client("s3", endpoint_url=public, **common)

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
                raise StorageError(f"bucket {self.bucket}: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - connection errors
            raise StorageError(str(exc)) from exc
        try:
            self.client.create_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise StorageError(f"create bucket {self.bucket}: {exc}") from exc

    def ping(self) -> bool:
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return True
        except Exception:  # noqa: BLE001
            return False

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type)
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"put {key}: {exc}") from exc

    def get(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()  # type: ignore[no-any-return]
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"get {key}: {exc}") from exc

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise StorageError(f"head {key}: {exc}") from exc

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            try:
                self.client.delete_object(Bucket=self.bucket, Key=key)
            except Exception as exc:  # noqa: BLE001
                raise StorageError(f"delete {key}: {exc}") from exc

    def list_keys(self, prefix: str) -> list[str]:
        keys: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            keys.extend(obj["Key"] for obj in page.get("Contents", []))
        return keys

    def put_json(self, key: str, doc: dict[str, Any]) -> None:
        self.put(key, json.dumps(doc, separators=(",", ":")).encode(), "application/json")

    def get_json(self, key: str) -> dict[str, Any] | None:
        """The document at `key`, or None when there is none."""
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise StorageError(f"get {key}: {exc}") from exc
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"get {key}: {exc}") from exc
        return json.loads(body)  # type: ignore[no-any-return]

    def presign(self, key: str) -> str:
        """A GET URL for `key` that expires after the configured time."""
        return self._presigner.generate_presigned_url(  # type: ignore[no-any-return]
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=self.presign_expires_s
        )
