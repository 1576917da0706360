"""The Redis connection a process's stores share: one Redis, or the primary that Sentinels name.

With Sentinels, every new connection asks them where the primary is, so a process follows a failover
by itself: a connection to a primary that was demoted (READONLY) or that lost its replicas (NOREPLICAS,
with `min-replicas-to-write`) is dropped and the command tried once more on a fresh one. Writes that a
client is told about (a submit's 202, a status change) are followed by `WAIT` (`acked`): a failover
promotes a replica, and the replica holds what was acknowledged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.commands.core import Script
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelManagedConnection

from shared import keys

if TYPE_CHECKING:
    from shared.config import Settings

# A partitioned Redis answers nothing: every call must give up in time for the API to answer 503
# within 5 s (a command, then a reconnect tried twice: 1.5 + 2 × 1 s), and a worker cut off must not
# stall a GPU for long at each step.
SOCKET_TIMEOUT_S = 1.5
CONNECT_TIMEOUT_S = 1.0


class NotReplicated(redis.ConnectionError):
    """The write ran on the primary, but fewer replicas than required confirmed it in time: whether it
    survives a failover is unknown. A connection error to every caller that retries (the step runs
    again, idempotent); a submit answers 503 with its inputs kept (`shared.jobs.submit`). `answer`: what
    the step answered (a step that changed nothing, a refusal, needs no replica)."""

    def __init__(self, message: str, answer: Any = None):
        super().__init__(message)
        self.answer = answer


class FollowingConnection(SentinelManagedConnection):
    """A connection to the Sentinels' primary that lets go of a primary that can no longer take writes:
    demoted (READONLY: redis-py's own handling) or cut off from its replicas (NOREPLICAS). Raised as a
    connection error, the client's retry opens a new connection, which asks the Sentinels again."""

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)
        except redis.ResponseError as exc:
            if str(exc).startswith("NOREPLICAS"):
                self.disconnect()
                raise redis.ConnectionError(f"the primary cannot reach its replicas: {exc}") from exc
            raise


def sentinel_addresses(spec: str) -> list[tuple[str, int]]:
    """`host:port,host:port` (port 26379 when left out)."""
    out = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        host, _, port = item.rpartition(":") if ":" in item else (item, "", "26379")
        out.append((host.strip("[]"), int(port)))
    return out


_SOCKETS = {"socket_timeout": SOCKET_TIMEOUT_S, "socket_connect_timeout": CONNECT_TIMEOUT_S, "socket_keepalive": True}


def sentinel_options(settings: Settings) -> dict[str, Any]:
    """How a process talks to the Sentinels themselves: the timeouts of every call, and their password."""
    own: dict[str, Any] = {"socket_timeout": SOCKET_TIMEOUT_S, "socket_connect_timeout": CONNECT_TIMEOUT_S}
    if settings.redis_sentinel_password:
        own["password"] = settings.redis_sentinel_password
    return own


def _retry() -> dict[str, Any]:
    return {
        "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), 1),
        "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
    }


def via_sentinels(settings: Settings, sentinel_class: Any, redis_class: Any, **options: Any) -> tuple[Any, Any]:
    """(a client of the primary the Sentinels name now, the Sentinels' own handle): the primary's user,
    password and database from the URL, the Sentinels' own options (`sentinel_options`). Sync or
    asyncio, by the classes given (redis.sentinel or redis.asyncio.sentinel)."""
    url = urlsplit(settings.redis_url)
    sockets = {"socket_timeout": SOCKET_TIMEOUT_S, "socket_connect_timeout": CONNECT_TIMEOUT_S}
    sentinels = sentinel_class(
        sentinel_addresses(settings.redis_sentinels), sentinel_kwargs=sentinel_options(settings), **sockets
    )
    primary = sentinels.master_for(
        settings.redis_master,
        redis_class=redis_class,
        decode_responses=True,
        username=unquote(url.username) if url.username else None,
        password=unquote(url.password) if url.password else None,
        db=int(url.path.strip("/") or 0),
        **options,
    )
    return primary, sentinels


def connect(target: Settings | str) -> redis.Redis:
    """Fail fast: one quick retry (a restart, a dropped connection, a failover), then an error. Callers
    that must not lose a write (ending a job) retry longer themselves (`shared.jobs.lifecycle.durably`).
    `target`: the settings (Sentinels when they name some), or a plain `redis://` URL."""
    if isinstance(target, str):
        return redis.Redis.from_url(target, decode_responses=True, **_SOCKETS, **_retry())
    if not target.redis_sentinels:
        r = redis.Redis.from_url(target.redis_url, decode_responses=True, **_SOCKETS, **_retry())
    else:
        r, _ = via_sentinels(target, Sentinel, redis.Redis, connection_class=FollowingConnection,
                             socket_keepalive=True, **_retry())  # fmt: skip
    r.wait_replicas = target.redis_wait_replicas  # type: ignore[attr-defined]
    r.wait_timeout_ms = target.redis_wait_timeout_ms  # type: ignore[attr-defined]
    return r


def acked(r: redis.Redis, script: Script, keys: Sequence[Any], args: Sequence[Any]) -> Any:
    """Run `script`, then, on the same connection, `WAIT` for the replicas the settings ask for: its
    answer only once that many replicas hold the write. Raises `NotReplicated` when they do not."""
    need = getattr(r, "wait_replicas", 0)
    if not need:
        return script(keys=keys, args=args)
    for _ in range(2):
        pipe = r.pipeline(transaction=False)
        pipe.evalsha(script.sha, len(keys), *keys, *args)
        pipe.execute_command("WAIT", need, getattr(r, "wait_timeout_ms", 500))
        try:
            answer, held = pipe.execute()
        except redis.exceptions.NoScriptError:
            r.script_load(script.script)  # a promoted replica or a restarted Redis: scripts are not kept
            continue
        if int(held) < need:
            raise NotReplicated(f"{held} of {need} replica(s) confirmed the write in time", answer)
        return answer
    raise redis.ConnectionError("the script could not be loaded")


def confirm(r: redis.Redis) -> bool:
    """Whether enough replicas hold everything this primary has taken so far (a record read back, a
    replayed submit): one write of our own and `WAIT` for it. Replication is one ordered stream, so a
    replica that holds it holds every write before it. True at once without the wait."""
    need = getattr(r, "wait_replicas", 0)
    if not need:
        return True
    pipe = r.pipeline(transaction=False)
    pipe.incr(keys.confirmations())
    pipe.execute_command("WAIT", need, getattr(r, "wait_timeout_ms", 500))
    return int(pipe.execute()[1]) >= need


def broker_url(settings: Settings) -> str:
    """Celery's broker URL: the Redis URL, or one `sentinel://` URL per Sentinel (kombu's form, with the
    password for the primary and the database)."""
    if not settings.redis_sentinels:
        return settings.redis_url
    url = urlsplit(settings.redis_url)
    auth = url.netloc.rpartition("@")[0]
    auth = f"{auth}@" if auth else ""
    db = url.path.strip("/") or "0"
    return ";".join(f"sentinel://{auth}{h}:{p}/{db}" for h, p in sentinel_addresses(settings.redis_sentinels))
