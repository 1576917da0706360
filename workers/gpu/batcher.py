"""Gathering a micro-batch: the first job plus compatible waiting ones, up to a row budget.

`gather` collects from any `take` function: the job store's waiting jobs in a worker
(`Leases.take_compatible`), an in-memory queue in the benchmark.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from workers.inpaint.request import InpaintRequest

T = TypeVar("T")


@dataclass
class Item(Generic[T]):
    """A job waiting for a micro-batch: its request and whatever the caller needs to finish it."""

    request: InpaintRequest
    ref: T

    @property
    def rows(self) -> int:
        return self.request.num_outputs

    @property
    def key(self) -> str:
        return self.request.compat_key


# take(compatibility key, max_rows) -> items of that key, together at most max_rows rows, possibly none
Take = Callable[[str, int], list[Item[T]]]


def gather(first: Item[T], take: Take[T], max_rows: int, window_s: float) -> list[Item[T]]:
    """`first` plus compatible items, until `max_rows` rows or `window_s` seconds have passed."""
    batch, rows = [first], first.rows
    deadline = time.monotonic() + window_s
    while rows < max_rows:
        got = take(first.key, max_rows - rows)
        batch += got
        rows += sum(i.rows for i in got)
        left = deadline - time.monotonic()
        if rows >= max_rows or left <= 0:
            break
        if not got:
            time.sleep(min(0.005, left))
    return batch


class MemoryQueue(Generic[T]):
    """An in-process queue with the job store's `take` semantics (oldest first, one key at a time)."""

    def __init__(self) -> None:
        self.items: deque[Item[T]] = deque()

    def put(self, item: Item[T]) -> None:
        self.items.append(item)

    def pop(self) -> Item[T] | None:
        return self.items.popleft() if self.items else None

    def take(self, key: str, max_rows: int) -> list[Item[T]]:
        out: list[Item[T]] = []
        rows = 0
        for it in list(self.items):
            if it.key == key and rows + it.rows <= max_rows:
                out.append(it)
                rows += it.rows
                self.items.remove(it)
            if rows >= max_rows:
                break
        return out
