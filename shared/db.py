"""The Redis connection a process's stores share."""

from __future__ import annotations

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

# A partitioned Redis answers nothing: every call must give up in time for the API to answer 503
# within 5 s (a command, then a reconnect tried twice: 1.5 + 2 × 1 s), and a worker cut off must not
# stall a GPU for long at each step.
SOCKET_TIMEOUT_S = 1.5
CONNECT_TIMEOUT_S = 1.0


def connect(url: str) -> redis.Redis:
    """Fail fast: one quick retry (a restart or a dropped connection), then an error. Callers that must
    not lose a write (ending a job) retry longer themselves (`shared.jobs.lifecycle.durably`)."""
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_keepalive=True,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 1),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )
