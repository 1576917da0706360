"""Images given by URL: fetched once, at submit, behind the same SSRF guard as webhooks.

Only `https://`. Every address the host resolves to must be public (unless
`INPAINT_FETCH_ALLOW_PRIVATE`), the connection goes to the address just checked (no second DNS
answer), redirects are not followed, and the whole fetch ends within `INPAINT_FETCH_TIMEOUT_S` however
slowly the server sends (`shared.outbound`). The body may take up to `INPAINT_MAX_UPLOAD_BYTES` on the
wire and unpacked; what comes back is checked like any upload (by its content, not its headers). Each
failure is a stable code.

In the API, fetches run on a pool of their own (`fetch_all`), never on the threads that serve requests,
and one tenant's fetches hold at most `INPAINT_FETCH_TENANT_SHARE` of its slots at once: the rest wait
for their turn without holding a thread, while other tenants' fetches go through.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import httpx

from shared import outbound
from shared.config import Settings
from shared.errors import Code, Problem
from shared.netguard import DnsUnavailable, UrlForbidden, check_url, image_rules

_clients: dict[str, httpx.Client] = {}
_pool: ThreadPoolExecutor | None = None
_shares: dict[str, _Share] = {}  # touched only on the event loop that serves requests
_lock = threading.Lock()


class FetchFailed(Problem):
    """`400 image_fetch_failed`. `final` when it is the server's own answer (a 4xx but 429), which asking
    again would not change; not a deadline, a connection error or a 5xx, which it might."""

    def __init__(self, field: str, message: str, final: bool = False):
        super().__init__(400, Code.image_fetch_failed, f"`{field}`: {message}", field)
        self.final = final


def is_url(value: str) -> bool:
    return value[:8].lower() == "https://" or value[:7].lower() == "http://"


def _client(settings: Settings) -> httpx.Client:
    """One client per CA setting: building one loads the CA bundle, far dearer than a request."""
    key = settings.fetch_ca_file or ""
    with _lock:
        if key not in _clients:
            verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=key) if key else True
            _clients[key] = outbound.client(verify, settings.fetch_timeout_s)
        return _clients[key]


def fetch_image(url: str, field: str, settings: Settings, tenant: str | None = None, limit: int = 0) -> bytes:
    """The bytes at `url`, or a Problem that names `field` (blocking: the caller's thread waits); `limit`:
    the largest body (0: INPAINT_MAX_UPLOAD_BYTES)."""
    if url[:8].lower() != "https://":
        raise Problem(422, Code.image_url_forbidden, f"`{field}`: only https:// URLs are fetched", field)
    try:
        target = check_url(url, tenant=tenant, rules=image_rules(settings))
    except UrlForbidden as exc:
        raise Problem(422, Code.image_url_forbidden, f"`{field}`: {exc}", field) from None
    except DnsUnavailable as exc:
        raise exc.problem(field) from None
    limit = limit or settings.max_upload_bytes
    try:
        with outbound.call(
            _client(settings),
            "GET",
            url,
            target,
            deadline_s=settings.fetch_timeout_s,
            headers={"user-agent": "inpaint-fetch/1"},
        ) as resp:
            if resp.status_code != 200:
                code = resp.status_code
                raise FetchFailed(field, f"the URL answered {code}", final=400 <= code < 500 and code != 429)
            return outbound.read_capped(resp, limit)
    except outbound.TooLarge:
        raise Problem(413, Code.image_too_large, f"`{field}`: the URL's body is over {limit} bytes", field) from None
    except outbound.DeadlineExceeded:
        raise FetchFailed(field, f"the URL took longer than {settings.fetch_timeout_s:g}s") from None
    except outbound.UnsupportedEncoding as exc:
        raise FetchFailed(field, str(exc)) from None
    except httpx.HTTPError as exc:
        raise FetchFailed(field, f"could not be fetched ({type(exc).__name__})") from None


def _executor(settings: Settings) -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(settings.fetch_concurrency, thread_name_prefix="fetch")
        return _pool


class _Share:
    """One tenant's slots of this process' fetch pool, kept while any of its fetches runs or waits."""

    def __init__(self, size: int):
        self.slots, self.users = asyncio.Semaphore(size), 0


def share_size(settings: Settings) -> int:
    return max(1, min(settings.fetch_tenant_share, settings.fetch_concurrency))


async def fetch_all(
    urls: Iterable[tuple[str, str]], tenant: str, settings: Settings, limit: int = 0
) -> dict[str, bytes]:
    """Fetch each distinct (url, field) once on the fetch pool, within the tenant's share: url → bytes.

    Waiting for a slot holds no thread; a tenant whose fetches wait longer than a fetch may take gets
    429 `too_many_fetches` with Retry-After."""
    wanted = dict((url.strip(), field) for url, field in urls if is_url(url.strip()))
    if not wanted:
        return {}
    share = _shares.get(tenant) or _shares.setdefault(tenant, _Share(share_size(settings)))
    loop = asyncio.get_running_loop()

    def leave() -> None:
        share.users -= 1
        if share.users == 0 and _shares.get(tenant) is share:
            del _shares[tenant]

    def done() -> None:  # on the event loop, once a fetch's thread has ended (not when its caller left)
        share.slots.release()
        leave()

    async def one(url: str, field: str) -> bytes:
        share.users += 1
        try:
            await asyncio.wait_for(share.slots.acquire(), settings.fetch_timeout_s)
        except TimeoutError:
            leave()
            msg = f"`{field}`: too many image URLs of yours are being fetched at once; retry shortly"
            retry = str(max(1, round(settings.fetch_timeout_s)))
            raise Problem(429, Code.too_many_fetches, msg, field, headers={"Retry-After": retry}) from None
        except BaseException:  # the request went away while it waited: no slot taken
            leave()
            raise
        # The slot is given back when the thread ends: a request cancelled meanwhile frees nothing early.
        future = _executor(settings).submit(fetch_image, url, field, settings, tenant, limit)
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(done))
        return await asyncio.wrap_future(future)

    got = await asyncio.gather(*(one(url, field) for url, field in wanted.items()), return_exceptions=True)
    for result in got:
        if isinstance(result, BaseException):
            raise result
    return dict(zip(wanted, got, strict=True))  # type: ignore[arg-type]
