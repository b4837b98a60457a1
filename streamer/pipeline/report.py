"""What `streamer run` says when it ends: frames, tracks, who was recognised on which tracks, the unknown
tracks and the files written, from the events it published (so it is true of what subscribers saw)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any


class RunReport:
    def __init__(self) -> None:
        self.tracks: list[tuple[str, int]] = []
        self._names: dict[tuple[str, int], str | None] = {}  # the last announced identity of each track

    def observe(self, event: Any) -> None:
        if event.kind == "track.started":
            self.tracks.append((event.stream, event.track))
        elif event.kind == "identity":
            self._names[(event.stream, event.track)] = event.name

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
        for name, keys in sorted(people.items()):
            out.append(f"recognised {name} on track{'s' if len(keys) > 1 else ''} {', '.join(map(label, keys))}")
        if unknown:
            shown = ", ".join(map(label, unknown[:20])) + (f" and {len(unknown) - 20} more" if len(unknown) > 20 else "")
            out.append(f"{len(unknown)} unknown track{'s' if len(unknown) != 1 else ''}: {shown}")
        for path in outputs:
            if path.is_file():
                out.append(f"wrote {path}")
        return out
