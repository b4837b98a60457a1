"""Recent unknowns: the last tracks nobody in the gallery matched, each with its best face crop.

Memory only, never written anywhere: an entry goes serve.unknown_ttl_s after its track was last seen
unknown (checked on every event, heartbeats included, and on every read), the oldest goes first beyond
serve.max_unknowns, a track that is later recognised leaves the list, and a dismissed or enrolled track is not
listed again. "Best" is the face of the highest `quality` the pipeline measured (size x frontalness x
sharpness), else the largest box.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any

DISMISSED_KEPT = 10_000  # tracks dismissed or enrolled, remembered so their later events don't list them again


@dataclass(frozen=True)
class Unknown:
    id: str  # "<stream>.<track>": stream ids never contain dots
    stream: str
    track: int
    stranger: str | None
    first_seen: float  # unix seconds (event ts)
    last_seen: float
    score: float
    crop: bytes  # JPEG of the best face; never leaves memory except as an authenticated thumbnail
    area: tuple[float, float]  # (quality, box area): the larger is the better face
    seen_at: float  # time.monotonic() of the last sighting, for the TTL

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "stream": self.stream, "track": self.track, "stranger": self.stranger,
                "first_seen": self.first_seen, "last_seen": self.last_seen, "score": self.score}


class UnknownStore:
    def __init__(self, max_items: int, ttl_s: float, clock: Any = time.monotonic) -> None:
        self.max_items = max_items
        self.ttl_s = ttl_s
        self.clock = clock
        self._lock = threading.Lock()
        self._items: OrderedDict[str, Unknown] = OrderedDict()
        self._done: OrderedDict[str, None] = OrderedDict()

    def observe(self, event: Any, crop: bytes | None) -> None:
        """Called on the supervisor thread for every published event: cheap dictionary work only."""
        now = self.clock()
        with self._lock:
            self._expire(now)
            if getattr(event, "kind", None) != "identity":
                return
            key = f"{event.stream}.{event.track}"
            if event.name is not None:
                self._items.pop(key, None)  # recognised after all
                return
            if key in self._done:
                return
            x1, y1, x2, y2 = event.box
            quality = getattr(event, "quality", None)
            area = (float(quality) if quality is not None else 0.0, max(0.0, x2 - x1) * max(0.0, y2 - y1))
            old = self._items.get(key)
            stranger = getattr(event, "stranger", None)
            if old is None:
                if crop is None:
                    return  # nothing to show or enrol from
                self._items[key] = Unknown(key, event.stream, int(event.track), stranger, event.ts, event.ts,
                                           float(event.score), bytes(crop), area, now)
            else:
                better = crop is not None and area > old.area
                self._items[key] = replace(
                    old, last_seen=max(old.last_seen, event.ts), score=float(event.score), seen_at=now,
                    stranger=stranger if stranger is not None else old.stranger,
                    crop=bytes(crop) if better and crop is not None else old.crop,
                    area=area if better else old.area,
                )
                self._items.move_to_end(key)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)

    def _expire(self, now: float) -> None:
        while self._items:
            key, first = next(iter(self._items.items()))
            if now - first.seen_at <= self.ttl_s:
                break
            del self._items[key]

    def list(self) -> list[Unknown]:
        with self._lock:
            self._expire(self.clock())
            return sorted(self._items.values(), key=lambda u: u.last_seen, reverse=True)

    def get(self, key: str) -> Unknown | None:
        with self._lock:
            self._expire(self.clock())
            return self._items.get(key)

    def discard(self, key: str) -> bool:
        """Dismiss (or, after enrolling, retire) an unknown; its track is not listed again."""
        with self._lock:
            found = self._items.pop(key, None) is not None
            if found:
                self._done[key] = None
                while len(self._done) > DISMISSED_KEPT:
                    self._done.popitem(last=False)
            return found

    def discard_stranger(self, stranger: str) -> int:
        """Retire every unknown of one stranger id (the stranger was promoted to a person)."""
        with self._lock:
            keys = [key for key, item in self._items.items() if item.stranger == stranger]
        return sum(self.discard(key) for key in keys)
