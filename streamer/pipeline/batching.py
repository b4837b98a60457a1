"""Dynamic batching: gather face chips from every stream, flush at `max_batch` faces or after `max_wait`.

A request is never split (its results go back in one message), so a batch may exceed `max_batch` only
when a single request is larger by itself; the runtime splits that further if it must.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Protocol


class Batchable(Protocol):
    """A queued request: how many faces it holds and when it arrived (the batcher's clock)."""

    @property
    def faces(self) -> int: ...

    arrived: float


class DynamicBatcher:
    def __init__(self, max_batch: int, max_wait_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.clock = clock
        self._queue: deque[Batchable] = deque()
        self._faces = 0

    def __len__(self) -> int:
        return self._faces

    @property
    def requests(self) -> int:
        return len(self._queue)

    def add(self, request: Batchable) -> None:
        self._queue.append(request)
        self._faces += request.faces

    def seconds_until_due(self) -> float | None:
        """None when empty; 0 when a batch should be flushed now."""
        if not self._queue:
            return None
        if self._faces >= self.max_batch:
            return 0.0
        return max(0.0, self._queue[0].arrived + self.max_wait_s - self.clock())

    def due(self) -> bool:
        wait = self.seconds_until_due()
        return wait is not None and wait <= 0.0

    def take(self) -> list[Batchable]:
        """Oldest requests whose faces fit in one batch (at least one request)."""
        batch: list[Batchable] = []
        faces = 0
        while self._queue and (not batch or faces + self._queue[0].faces <= self.max_batch):
            request = self._queue.popleft()
            faces += request.faces
            batch.append(request)
        self._faces -= faces
        return batch

