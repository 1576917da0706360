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
from redis.exceptions import RedisError

from shared import keys

log = logging.getLogger(__name__)
QUEUE_SIZE = 256  # a stream that falls this far behind loses its oldest messages (progress, mostly)


class EventHub:
    def __init__(self, redis_url: str):
        self.redis_url = redis_url
        self._listeners: dict[str, set[asyncio.Queue[str]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    @contextlib.asynccontextmanager
    async def listen(self, job_id: str) -> AsyncIterator[asyncio.Queue[str]]:
        """The job's event messages (raw JSON), from now until the block ends."""
        self._start()
        queue: asyncio.Queue[str] = asyncio.Queue(QUEUE_SIZE)
        self._listeners.setdefault(job_id, set()).add(queue)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), 2.0)  # subscribed: nothing falls in between
            yield queue
        finally:
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
            client = aioredis.Redis.from_url(self.redis_url, decode_responses=True)
            pubsub = client.pubsub()
            try:
                await pubsub.psubscribe(keys.events("*"))
                self._ready.set()
                async for msg in pubsub.listen():
                    if msg["type"] == "pmessage":
                        self._dispatch(str(msg["channel"]).rsplit(":", 1)[1], str(msg["data"]))
            except (RedisError, OSError) as exc:
                log.warning("event subscription lost (%s); reconnecting", exc)
                self._ready.clear()
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()
                    await client.aclose()

    def _dispatch(self, job_id: str, data: str) -> None:
        for queue in self._listeners.get(job_id, ()):
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(data)
