"""One Redis subscription per API process for every event stream it serves.

A connection per SSE stream would let one tenant's open streams use up Redis' connections; here
one pattern subscription (`inpaint:events:*`) feeds every stream of the process, each through a
small queue of its own. A message for a job nobody here watches is dropped at once. Pub/sub is
fire-and-forget either way: streams re-read the job now and then, so a message missed while the
subscription reconnects costs a few seconds, never a wrong answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import RedisError

from shared import keys
from shared.config import Settings
from shared.db import via_sentinels

log = logging.getLogger(__name__)
QUIET_S = 5.0  # a subscription silent this long is asked for a PONG, and given up this long after
QUEUE_SIZE = 256  # a stream that falls this far behind loses its oldest messages (progress, mostly)


class EventHub:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._listeners: dict[str, set[asyncio.Queue[str]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    @contextlib.asynccontextmanager
    async def listen(self, *job_ids: str) -> AsyncIterator[asyncio.Queue[str]]:
        """The jobs' event messages (raw JSON), in one queue, from now until the block ends."""
        self._start()
        queue: asyncio.Queue[str] = asyncio.Queue(QUEUE_SIZE)
        for job_id in job_ids:
            self._listeners.setdefault(job_id, set()).add(queue)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), 2.0)  # subscribed: nothing falls in between
            yield queue
        finally:
            for job_id in job_ids:
                watchers = self._listeners.get(job_id, set())
                watchers.discard(queue)
                if not watchers:
                    self._listeners.pop(job_id, None)

    def _start(self) -> None:
        if self._task is None or self._task.done():
            self._ready = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="event-hub")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            client, sentinels = self._client()
            pubsub = client.pubsub()
            try:
                await pubsub.psubscribe(keys.events("*"))
                self._ready.set()
                await self._listen(pubsub)
            except (RedisError, OSError) as exc:
                log.warning("event subscription lost (%s); reconnecting", exc)
                self._ready.clear()
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()
                    await client.aclose()
                    for sentinel in sentinels:  # their connections too: one set per reconnect, else a leak
                        await sentinel.aclose()

    async def _listen(self, pubsub: aioredis.client.PubSub) -> None:
        """Dispatch until the subscription fails. One that stays quiet is asked for a PONG every few
        seconds: a Redis whose host vanished sends no reset, and would otherwise hold it for ever."""
        loop = asyncio.get_running_loop()
        heard, asked = loop.time(), 0.0
        while True:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            now = loop.time()
            if msg is not None:
                heard, asked = now, 0.0
                if msg["type"] == "pmessage":
                    self._dispatch(str(msg["channel"]).rsplit(":", 1)[1], str(msg["data"]))
            elif asked and now - asked > QUIET_S:
                raise ConnectionError(f"no answer to a PING in {QUIET_S:.0f} s")
            elif not asked and now - heard > QUIET_S:
                await pubsub.ping()
                asked = now

    def _client(self) -> tuple[aioredis.Redis, list[aioredis.Redis]]:
        """The one Redis, or the Sentinels' primary now (and the clients of the Sentinels, to close)."""
        s = self.settings
        if not s.redis_sentinels:
            return aioredis.Redis.from_url(s.redis_url, decode_responses=True), []
        primary, sentinels = via_sentinels(s, Sentinel, aioredis.Redis)
        return primary, list(sentinels.sentinels)

    def _dispatch(self, job_id: str, data: str) -> None:
        for queue in self._listeners.get(job_id, ()):
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(data)
