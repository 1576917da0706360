"""A batch's image URLs: each distinct URL fetched once for the whole batch, its bytes kept in the bucket.

One `parameters.image` applies to every row: fetched per row, 100,000 rows would be 100,000 GETs to one
third-party server, and a row that waits for queue room would fetch again at each try. So the URLs in
`parameters` are fetched once, when the batch is created (a URL that fails is the creator's 4xx, not
every row's), and a row's own URL is fetched the first time a row names it. The bytes are kept under the
batch's prefix, keyed by a hash of the URL (`fetched/<sha256>`), and every later row, try or step reads
them there; a URL that answered with a client error keeps that answer (`<key>.error`), so it is not
asked again either. A step that cannot reach the bucket waits (`StorageError`), and fetches nothing.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any

from shared.batches.results import batch_prefix
from shared.errors import Code, Problem
from shared.fetch import FetchFailed, fetch_image
from shared.jobs.submit import image_urls
from shared.services import Services
from shared.storage import ObjectMissing

# Recently read images, so that the rows of one step (and the next steps, in this process) do not each
# read the same object again: bounded in bytes, oldest out first.
_RECENT_BYTES = 64 * 1024 * 1024
_recent: OrderedDict[str, bytes] = OrderedDict()
_recent_size = 0
_lock = threading.Lock()


def url_key(tenant: str, batch_id: str, url: str) -> str:
    """Where the batch keeps the bytes of `url`."""
    return batch_prefix(tenant, batch_id) + "fetched/" + hashlib.sha256(url.strip().encode()).hexdigest()


def parameter_urls(parameters: dict[str, Any]) -> list[tuple[str, str]]:
    """(URL, field) of each image URL in a batch's `parameters`, the field named as the client wrote it."""
    return [(url, f"parameters.{field}") for url, field in image_urls(parameters)]


def keep(svc: Services, tenant: str, batch_id: str, fetched: dict[str, bytes]) -> None:
    """Store what the API fetched at creation, where the batch's rows look for it (blocking)."""
    svc.storage.put_many(
        [(url_key(tenant, batch_id, url), data, "application/octet-stream") for url, data in fetched.items()]
    )


def _remember(key: str, data: bytes) -> None:
    global _recent_size
    if len(data) > _RECENT_BYTES // 4:
        return
    with _lock:
        if key in _recent:
            return
        _recent[key] = data
        _recent_size += len(data)
        while _recent_size > _RECENT_BYTES:
            _recent_size -= len(_recent.popitem(last=False)[1])


def _recalled(key: str) -> bytes | None:
    with _lock:
        return _recent.get(key)


def _stored_problem(doc: dict[str, Any]) -> Problem:
    return Problem(int(doc["status"]), Code(doc["code"]), str(doc["message"]), doc.get("param") or None)


def image(svc: Services, tenant: str, batch_id: str, url: str, field: str) -> bytes:
    """The bytes of `url` for a row of the batch: kept ones, or fetched now and kept (blocking)."""
    key = url_key(tenant, batch_id, url)
    if (data := _recalled(key)) is not None:
        return data
    try:
        data = svc.storage.get(key)
    except ObjectMissing:
        failed = svc.storage.get_json(key + ".error")
        if failed is not None:
            raise _stored_problem(failed) from None
        try:
            data = fetch_image(url.strip(), field, svc.settings, tenant)
        except Problem as exc:
            # The URL's own answer (a 4xx, too large, not allowed, not an image) stays; a transient failure
            # (a deadline, a connection error, a 5xx or 429 upstream, DNS) does not: a later row tries again.
            if _final(exc):
                doc = {"status": exc.status, "code": str(exc.code), "message": exc.message, "param": exc.param}
                svc.storage.put_json(key + ".error", doc)
            raise
        svc.storage.put(key, data)
    _remember(key, data)
    return data


def _final(exc: Problem) -> bool:
    if isinstance(exc, FetchFailed):
        return exc.final
    return 400 <= exc.status < 500 and exc.status != 429


def row_images(svc: Services, tenant: str, batch_id: str, fields: dict[str, Any]) -> dict[str, bytes]:
    """URL → bytes for each image URL among a row's job fields (`validate_fields`' `fetched`)."""
    return {url.strip(): image(svc, tenant, batch_id, url, field) for url, field in image_urls(fields)}
