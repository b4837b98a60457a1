"""One stream inside the detect worker: its source, processor and recogniser, and the bookkeeping the
supervisor needs about it (fps, connection history, status events)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from streamer.errors import SourceError
from streamer.match.recogniser import TrackRecogniser
from streamer.pipeline.messages import StreamStats
from streamer.publish.events import Event, StreamStatus
from streamer.sources.base import Source
from streamer.track.processor import Step, StreamProcessor

log = logging.getLogger(__name__)

_HEALTH = {"idle": "connecting", "stopped": "ended"}  # reader states -> heartbeat statuses


@dataclass
class FpsMeter:
    """Frames per second over windows of about a second."""

    window_s: float = 1.0
    fps: float = 0.0
    _start: float = field(default_factory=time.monotonic)
    _frames: int = 0

    def tick(self, now: float) -> None:
        self._frames += 1
        if now - self._start >= self.window_s:
            self.fps = self._frames / (now - self._start)
            self._start, self._frames = now, 0

    def current(self, now: float) -> float:
        window = now - self._start
        if not self.fps and self._frames and window > 0.2:  # before the first full window
            return self._frames / window
        return self.fps


class StreamSlot:
    def __init__(self, source: Source, processor: StreamProcessor, recogniser: TrackRecogniser) -> None:
        self.id = processor.stream
        self.source = source
        self.processor = processor
        self.recogniser = recogniser
        self.fps = FpsMeter()
        self.ended = False
        self.connected_once = False
        self.first_failure: str | None = None  # why the very first connection attempt failed
        self.warned_unreachable = False
        self.live_frames = 0  # tiles sent while someone watched
        # Faces of a track still at inference, and ended tracks waiting for them: a track that ends (scene
        # cut, gone) while its chips are at inference keeps its recogniser state, and its track.ended waits,
        # until those results are in (or the hold times out), so the name they carry is not lost and
        # track.ended stays the track's last event. A file read faster than inference answers needs it most.
        self.in_flight: dict[int, int] = {}
        self._held: dict[int, tuple[float, list[Event]]] = {}
        # The input is over and its tracks have ended, but some of their ends are held: the stream's
        # "ended" status follows the last of them (its detail waits here).
        self._ending: str | None = None

    def apply(self, step: Step, now: float | None = None) -> list[Event]:
        """Keep the recogniser's live tracks in step with the processor's; the step's events to send now."""
        for event in step.events:
            if event.kind == "track.started":
                self.recogniser.started(event.track)
        waiting = {int(t) for t in step.ended if self.in_flight.get(int(t))}
        for track in step.ended:
            if int(track) not in waiting:
                self.recogniser.ended(track)
        if not waiting:
            return step.events
        at = time.monotonic() if now is None else now
        out = []
        for event in step.events:
            if event.kind == "track.ended" and event.track in waiting:
                self._held.setdefault(event.track, (at, []))[1].append(event)
            else:
                out.append(event)
        return out

    def submitted(self, tracks: tuple[int, ...]) -> None:
        """These tracks' faces went to inference."""
        for track in tracks:
            self.in_flight[int(track)] = self.in_flight.get(int(track), 0) + 1

    def answered(self, tracks: tuple[int, ...]) -> list[Event]:
        """Results for these tracks' faces came back: the held track.ended events now due."""
        out: list[Event] = []
        counts: dict[int, int] = {}
        for track in tracks:
            counts[int(track)] = counts.get(int(track), 0) + 1
        for track, n in counts.items():
            left = self.in_flight.get(track, 0) - n
            if left > 0:
                self.in_flight[track] = left
                continue
            self.in_flight.pop(track, None)
            out.extend(self._release(track))
        return out + self._close_if_done()

    def release_overdue(self, now: float, hold_s: float) -> list[Event]:
        """Held ends whose results did not come within `hold_s` (worker down, request expired or dropped)."""
        if not self._held:  # the common case, every turn
            return self._close_if_done()
        out: list[Event] = []
        for track in [t for t, (since, _) in self._held.items() if now - since >= hold_s]:
            self.in_flight.pop(track, None)
            out.extend(self._release(track))
        return out + self._close_if_done()

    @property
    def ending(self) -> bool:
        """The input is over; the stream ends once its held track ends are out."""
        return self._ending is not None and not self.ended

    def _close_if_done(self) -> list[Event]:
        if self._ending is None or self.ended or self._held:
            return []
        self.ended = True
        return [StreamStatus(stream=self.id, status="ended", detail=self._ending)]

    def _release(self, track: int) -> list[Event]:
        held = self._held.pop(track, None)
        if held is None:
            return []
        self.recogniser.ended(track)
        return held[1]

    def status_events(self) -> list[Event]:
        """Connection changes of the source as events; a lost source ends its tracks (a reconnect
        restarts the stream clock, so coasting tracks would never match again)."""
        events: list[Event] = []
        for change in self.source.poll_status():
            if change.status == "ended":
                continue  # sent by end() after the last tracks have ended
            events.append(StreamStatus(stream=self.id, status=change.status, detail=change.detail))
            if change.status in ("connected", "reconnected"):
                self.connected_once = True
            elif change.status == "lost":
                if not self.connected_once and self.first_failure is None:
                    self.first_failure = change.detail
                events.extend(self.apply(self.processor.end_all("source_lost")))
        return events

    def end(self, stopped: bool, detail: str | None = None, *, hold: bool = False) -> list[Event]:
        """Every remaining track ends, then the stream (once). `detail` overrides the status's (e.g.
        "removed" for a source taken away at run time). `hold` (the input ran out, the run goes on): ends
        of tracks whose faces are still at inference wait for those results (`answered`, at most until
        `release_overdue`), and the stream's "ended" follows the last of them; else nothing waits."""
        if self.ended:
            return []
        events: list[Event] = []
        if self._ending is None:
            events = self.status_events()
            events.extend(self.apply(self.processor.end_all("stopped" if stopped else "end_of_input")))
            note = getattr(self.source, "end_note", None)  # e.g. "file truncated at 1.6 s of 4.8 s"
            self._ending = detail or ("stopped" if stopped else "end of input" + (f": {note}" if note else ""))
            if hold:
                return events + self._close_if_done()
        return events + self.release_overdue(float("inf"), 0.0)

    def stats(self, now: float) -> StreamStats:
        stats = self.source.stats
        return StreamStats(
            fps=round(self.fps.current(now), 2),
            frames=self.processor.frames,
            dropped=int(stats.dropped),
            status="ended" if self.ended else _HEALTH.get(stats.status, stats.status),
            reconnects=int(stats.reconnects),
            total_frames=self.source.total_frames,
            next_track_id=self.processor.next_track_id,
            live_frames=self.live_frames,
        )


def check_reachable(slots: list[StreamSlot], *, exit_if_none_connect: bool) -> None:
    """At start-up, not one source connecting most likely means a wrong address: SourceError naming each
    (unless told to keep retrying). Otherwise warn once per source that has not connected yet."""
    unreachable = [s for s in slots if s.first_failure is not None and not s.connected_once]
    if exit_if_none_connect and slots and len(unreachable) == len(slots):
        reasons = "; ".join(f"{s.id} ({s.source.url}): {s.first_failure}" for s in unreachable)
        raise SourceError(f"cannot connect to any source: {reasons} "
                          "(set reconnect.exit_if_none_connect=false to keep retrying)")
    for slot in unreachable:
        if not slot.warned_unreachable:
            slot.warned_unreachable = True
            log.warning("source %s: cannot connect to %s (%s); retrying", slot.id, slot.source.url, slot.first_failure)
