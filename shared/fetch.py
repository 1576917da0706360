"""Images given by URL: fetched once, at submit, behind the same SSRF guard as webhooks.

Only `https://`. Every address the host resolves to must be public (unless
`INPAINT_FETCH_ALLOW_PRIVATE`), the connection goes to the address just checked (no second DNS
answer), redirects are not followed, the body is read up to `INPAINT_MAX_UPLOAD_BYTES` and within
`INPAINT_FETCH_TIMEOUT_S`; what comes back is checked like any upload (by its content, not its
headers). Each failure is a stable code.
"""

from __future__ import annotations

import ssl
import time

import httpx

from shared.config import Settings
from shared.errors import Code, Problem
from shared.netguard import UrlForbidden, check_url

_clients: dict[str, httpx.Client] = {}


def is_url(value: str) -> bool:
    return value[:8].lower() == "https://" or value[:7].lower() == "http://"


def _client(settings: Settings) -> httpx.Client:
    """One client per CA setting: building one loads the CA bundle, far dearer than a request."""
    key = settings.fetch_ca_file or ""
    if key not in _clients:
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=key) if key else True
        _clients[key] = httpx.Client(
            verify=verify, follow_redirects=False, trust_env=False,
            timeout=httpx.Timeout(settings.fetch_timeout_s, connect=min(5.0, settings.fetch_timeout_s)),
        )  # fmt: skip
    return _clients[key]


def fetch_image(url: str, field: str, settings: Settings) -> bytes:
    """The bytes at `url`, or a Problem that names `field`."""
    if url[:8].lower() != "https://":
        raise Problem(422, Code.image_url_forbidden, f"`{field}`: only https:// URLs are fetched", field)
    try:
        target = check_url(url, settings.fetch_allow_private, settings.dns_timeout_s)
    except UrlForbidden as exc:
        raise Problem(422, Code.image_url_forbidden, f"`{field}`: {exc}", field) from None
    pinned = httpx.URL(url).copy_with(host=target.addresses[0], port=target.port)
    host = target.host if target.port == 443 else f"{target.host}:{target.port}"
    limit, deadline = settings.max_upload_bytes, time.monotonic() + settings.fetch_timeout_s
    try:
        with _client(settings).stream(
            "GET",
            pinned,
            headers={"host": host, "user-agent": "inpaint-fetch/1"},
            extensions={"sni_hostname": target.host},
        ) as resp:
            if resp.status_code != 200:
                raise Problem(400, Code.image_fetch_failed, f"`{field}`: the URL answered {resp.status_code}", field)
            body = bytearray()
            for chunk in resp.iter_bytes():
                body += chunk
                if len(body) > limit:
                    raise Problem(413, Code.image_too_large, f"`{field}`: the URL's body is over {limit} bytes", field)
                if time.monotonic() > deadline:
                    raise Problem(400, Code.image_fetch_failed, f"`{field}`: the URL took too long", field)
            return bytes(body)
    except httpx.HTTPError as exc:
        raise Problem(
            400, Code.image_fetch_failed, f"`{field}`: could not be fetched ({type(exc).__name__})", field
        ) from None
