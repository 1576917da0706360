"""What each tenant holds of something a process has few of (the I/O worker's threads, resolver
lookups): counted per tenant, each within its share and all within an overall bound. Thread-safe."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Shares:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, int] = {}
        self._total = 0

    def take(self, tenant: str, share: int, total: int | None = None) -> bool:
        """One more for `tenant`, if it holds fewer than `share` and all hold fewer than `total`."""
        with self._lock:
            if self._held.get(tenant, 0) >= share or (total is not None and self._total >= total):
                return False
            self._held[tenant] = self._held.get(tenant, 0) + 1
            self._total += 1
            return True

    def give_back(self, tenant: str) -> None:
        with self._lock:
            self._total -= 1
            left = self._held[tenant] - 1
            if left:
                self._held[tenant] = left
            else:
                del self._held[tenant]

    @contextmanager
    def slot(self, tenant: str, share: int) -> Iterator[bool]:
        """Whether the tenant had one left; held until the block ends if so."""
        took = self.take(tenant, share)
        try:
            yield took
        finally:
            if took:
                self.give_back(tenant)
