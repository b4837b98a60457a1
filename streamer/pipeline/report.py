"""What `streamer run` says when it ends: frames, tracks, who was recognised on which tracks, the unknown
tracks, how long inference was down and the files written, from the events it published (so it is true of
what subscribers saw)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


class RunReport:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.tracks: list[tuple[str, int]] = []
        self._names: dict[tuple[str, int], str | None] = {}  # the last announced identity of each track
        self.clock = clock  # wall clock, as events' `ts`
        self.outages = 0  # times inference went down
        self._down_s = 0.0
        self._down_since: float | None = None

    def observe(self, event: Any) -> None:
        if event.kind == "track.started":
            self.tracks.append((event.stream, event.track))
        elif event.kind == "identity":
            self._names[(event.stream, event.track)] = event.name
        elif event.kind == "pipeline.status":
            if event.inference == "down" and self._down_since is None:
                self.outages += 1
                self._down_since = event.ts
            elif event.inference == "up" and self._down_since is not None:
                self._down_s += max(0.0, event.ts - self._down_since)
                self._down_since = None

    @property
    def inference_down_s(self) -> float:
        """Seconds inference was down, counting an outage still going on."""
        ongoing = 0.0 if self._down_since is None else max(0.0, self.clock() - self._down_since)
        return self._down_s + ongoing

    def lines(self, frames: int, seconds: float, outputs: Iterable[Path] = ()) -> list[str]:
        several = len({stream for stream, _ in self.tracks}) > 1

        def label(key: tuple[str, int]) -> str:
            return f"{key[0]}#{key[1]}" if several else f"#{key[1]}"

        people: dict[str, list[tuple[str, int]]] = {}
        unknown = []
        for key in self.tracks:
            name = self._names.get(key)
            if name is None:
                unknown.append(key)
            else:
                people.setdefault(name, []).append(key)
        count = len(self.tracks)
        out = [f"{frames} frames in {seconds:.1f} s, {count} track{'s' if count != 1 else ''}"]
        if self.outages:
            times = "once" if self.outages == 1 else f"{self.outages} times"
            out.append(f"inference was down {times}, {self.inference_down_s:.1f} s in all: faces seen meanwhile "
                       "were not recognised")
        for name, keys in sorted(people.items()):
            out.append(f"recognised {name} on track{'s' if len(keys) > 1 else ''} {', '.join(map(label, keys))}")
        if unknown:
            shown = ", ".join(map(label, unknown[:20])) + (f" and {len(unknown) - 20} more" if len(unknown) > 20 else "")
            out.append(f"{len(unknown)} unknown track{'s' if len(unknown) != 1 else ''}: {shown}")
        for path in outputs:
            if path.is_file():
                out.append(f"wrote {path}")
        return out
