"""The source interface and the reader-thread machinery every backend shares.

A backend (PyAV, OpenCV webcam) only knows how to open its input and yield decoded frames; `ThreadedSource`
owns the thread, the frame buffer, status events, the frame-age watchdog and reconnection:

- live sources keep one slot, newest frame wins, every overwritten unread frame is counted as dropped;
- files go through a small bounded queue: the reader blocks (backpressure) and `stop()` unblocks it;
- a live source that hits end of stream, an error, a failed open or a frame-age timeout reports "lost",
  retries forever with capped exponential backoff, and reports "reconnected" when frames can flow again
  (a live file too: its reopen is a fresh open attempt, untouched by the connection the watchdog killed);
  retries that keep failing say so at WARNING, at most every RETRY_LOG_INTERVAL_S;
- `max_frames` ends any source (file or live, "ended", no reconnect) once it has produced that many frames.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

import numpy as np

from streamer.config import ReconnectSettings
from streamer.errors import SourceError
from streamer.logutil import RateLimitedLog
from streamer.types import Frame

log = logging.getLogger(__name__)

# A source that keeps failing to come back says so this often (each retry is still logged at debug level).
RETRY_LOG_INTERVAL_S = 30.0

Status = Literal["connected", "lost", "reconnected", "ended"]
H = TypeVar("H")  # a backend's open handle (a PyAV container, a cv2.VideoCapture)


@dataclass(frozen=True)
class StatusChange:
    stream: str
    status: Status
    detail: str
    ts: float  # time.time() (wall clock, for events on the wire)


@dataclass(frozen=True)
class SourceStats:
    frames: int  # frames produced by the reader (after fps sampling), read or not
    dropped: int  # live only: frames overwritten before the consumer read them
    fps: float  # recent production rate; 0 when no frame arrived lately
    reconnects: int  # successful reconnections after a loss
    status: str  # "idle", "connecting", "connected", "lost", "ended" or "stopped"
    corrupt_packets: int = 0  # undecodable packets skipped so far (see Source.corrupt_packets)


@dataclass(frozen=True)
class RawFrame:
    """What a backend yields: the image and its timestamp; the base assigns index and stream."""

    image: np.ndarray
    pts: float
    decoded_at: float


class Source(ABC):
    """One video input read by its own thread. Use: start(), then read() until finished, then stop()."""

    id: str
    url: str
    live: bool
    # Known once the source is open, when the input says: frames per second of the frames delivered
    # (for the annotated output) and how many a file will deliver (for the progress bar).
    frame_rate: float | None = None
    total_frames: int | None = None
    # Set when an input ended early for a reason the user should hear, e.g. "file truncated at 2.4 s of
    # 4.8 s" (the "ended" status detail says it too); None after a clean end.
    end_note: str | None = None
    # Packets the decoder could not decode and skipped (decoding goes on at the next one); a file's
    # end_note says how many.
    corrupt_packets: int = 0

    @abstractmethod
    def start(self) -> None:
        """Open (files: synchronously, raising SourceError) and start the reader thread."""

    @abstractmethod
    def read(self, timeout: float | None = None) -> Frame | None:
        """The next frame (live: the newest one); None on timeout or when finished."""

    @abstractmethod
    def poll_status(self) -> list[StatusChange]:
        """Status changes since the last call, oldest first."""

    @property
    @abstractmethod
    def stats(self) -> SourceStats: ...

    @property
    @abstractmethod
    def finished(self) -> bool:
        """True once the reader has ended (end of file, or stopped) and every buffered frame was read."""

    @abstractmethod
    def stop(self) -> None:
        """Stop the reader and join it; idempotent; never blocks forever."""

    def __enter__(self) -> Source:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class _FrameBuffer:
    """Frames between the reader thread and the consumer.

    overwrite=True (live): `capacity` slots, the oldest unread frame is replaced and counted as dropped.
    overwrite=False (file): the producer waits for room; `abort()` releases it.
    """

    def __init__(self, capacity: int, overwrite: bool) -> None:
        if capacity < 1:
            raise ValueError(f"frame buffer capacity: expected >= 1, got {capacity}")
        self._frames: deque[Frame] = deque()
        self._capacity = capacity
        self._overwrite = overwrite
        self._cond = threading.Condition()
        self._closed = False  # producer finished: consumers drain what is left
        self._aborted = False  # stop(): everything is dropped and nobody waits
        self.dropped = 0

    def put(self, frame: Frame) -> bool:
        """Queue a frame; False when the buffer was aborted (the reader should quit)."""
        with self._cond:
            if self._overwrite:
                while len(self._frames) >= self._capacity:
                    self._frames.popleft()
                    self.dropped += 1
            else:
                self._cond.wait_for(lambda: self._aborted or len(self._frames) < self._capacity)
            if self._aborted:
                return False
            self._frames.append(frame)
            self._cond.notify_all()
            return True

    def get(self, timeout: float | None) -> Frame | None:
        with self._cond:
            self._cond.wait_for(lambda: self._frames or self._closed or self._aborted, timeout)
            if not self._frames or self._aborted:
                return None
            frame = self._frames.popleft()
            self._cond.notify_all()
            return frame

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def abort(self) -> None:
        with self._cond:
            self._aborted = self._closed = True
            self._frames.clear()
            self._cond.notify_all()

    @property
    def drained(self) -> bool:
        with self._cond:
            return self._closed and not self._frames


class _Lost(Exception):
    """Raised inside the reader when the watchdog has declared the current connection dead."""


def backoff_delays(settings: ReconnectSettings, rng: random.Random | None = None) -> Iterator[float]:
    """initial, 2x, 4x, ... capped at max_delay_s, each with up to +-10 % jitter (so many cameras that
    dropped together do not all knock at once)."""
    rng = rng or random.Random()
    delay = settings.initial_delay_s
    while True:
        yield min(settings.max_delay_s, delay * rng.uniform(0.9, 1.1))
        delay = min(settings.max_delay_s, delay * 2)


class ThreadedSource(Source, Generic[H]):
    """Reader thread, buffering, status, watchdog and reconnection around a backend's open/iterate/close.

    Subclasses implement `_open()` (raise on failure), `_iterate(handle)` (yield RawFrame; return at end of
    stream; raise on errors) and `_close(handle)`. `_open_in_start` makes `start()` open synchronously so
    bad files fail fast with SourceError.
    """

    _open_in_start: bool = False
    queue_size: int = 4  # files: frames decoded ahead of the consumer

    def __init__(
        self,
        stream_id: str,
        url: str,
        *,
        live: bool,
        reconnect: ReconnectSettings | None = None,
        loop: bool = False,
        max_frames: int | None = None,
    ) -> None:
        if not stream_id:
            raise ValueError("source id: expected a non-empty string, got ''")
        if max_frames is not None and max_frames < 1:
            raise ValueError(f"source max_frames: expected >= 1 or None, got {max_frames}")
        self.id = stream_id
        self.url = url
        self.live = live
        self.loop = loop
        self.max_frames = max_frames
        self.reconnect = reconnect or ReconnectSettings()
        self._buffer = _FrameBuffer(1 if live else self.queue_size, overwrite=live)
        self._stop = threading.Event()
        self._lock = threading.RLock()  # reentrant: status changes are emitted while holding it
        self._events: list[StatusChange] = []
        self._state = "idle"
        self._ever_connected = False
        self._lost_reported = False
        # One per open attempt, so a connection the watchdog killed never taints the next open (a file's
        # open decodes its first frame, and checks `_abandoned()` while it does).
        self._generation = 0
        self._dead_generation = -1
        self._last_frame_at = 0.0
        self._frames = 0
        self._reconnects = 0
        self._recent: deque[float] = deque(maxlen=60)
        self._thread: threading.Thread | None = None
        self._watchdog: threading.Thread | None = None
        self._first_handle: H | None = None
        self._stopped = False
        self._retry_log = RateLimitedLog(log, RETRY_LOG_INTERVAL_S)

    # ------------------------------------------------------------------ backend hooks

    @abstractmethod
    def _open(self) -> H: ...

    @abstractmethod
    def _iterate(self, handle: H) -> Iterator[RawFrame]: ...

    @abstractmethod
    def _close(self, handle: H) -> None: ...

    def _describe_error(self, exc: BaseException) -> str:
        return f"{type(exc).__name__}: {exc}"

    def _end_of_input(self, handle: H) -> str:
        """The detail of a file's "ended" status once its frames ran out (a backend can say more, e.g. that
        the file is truncated, and sets `end_note`)."""
        return "end of file"

    def _abandoned(self) -> bool:
        """For backends, between reads: True when the reader should drop the current connection now."""
        if self._stop.is_set():
            return True
        with self._lock:
            return self._dead_generation == self._generation

    def _join_timeout(self) -> float:
        """How long a blocked open/read can take to notice stop() (the backend's own timeouts)."""
        return self.reconnect.open_timeout_s + self.reconnect.frame_timeout_s + 2.0

    # ------------------------------------------------------------------ public API

    def start(self) -> None:
        if self._thread is not None:
            return
        if self._stopped:
            raise RuntimeError(f"source {self.id}: cannot start again after stop()")
        self._set_state("connecting")
        if self._open_in_start:
            try:
                self._first_handle = self._open_attempt()
            except SourceError:
                raise
            except Exception as exc:  # the backend's own errors become one user-facing line
                raise SourceError(f"source {self.id}: cannot open {self.url}: {self._describe_error(exc)}") from None
        self._thread = threading.Thread(target=self._run, name=f"source-{self.id}", daemon=True)
        self._thread.start()
        if self.live:
            self._watchdog = threading.Thread(target=self._watch, name=f"watchdog-{self.id}", daemon=True)
            self._watchdog.start()

    def read(self, timeout: float | None = None) -> Frame | None:
        if self._thread is None:  # never started: nothing will ever arrive, do not wait for it
            return None
        return self._buffer.get(timeout)

    def poll_status(self) -> list[StatusChange]:
        with self._lock:
            events, self._events = self._events, []
        return events

    @property
    def stats(self) -> SourceStats:
        now = time.monotonic()
        with self._lock:
            recent = [t for t in self._recent if now - t < 5.0]
            if len(recent) >= 2 and now - recent[-1] < 2.0:
                fps = (len(recent) - 1) / max(recent[-1] - recent[0], 1e-6)
            else:
                fps = 0.0
            return SourceStats(
                self._frames, self._buffer.dropped, fps, self._reconnects, self._state, self.corrupt_packets
            )

    @property
    def finished(self) -> bool:
        return self._buffer.drained

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        self._buffer.abort()
        for thread in (self._thread, self._watchdog):
            if thread is None or thread is threading.current_thread():
                continue
            thread.join(self._join_timeout())
            if thread.is_alive():  # a backend call that ignores its timeout; the daemon thread dies with us
                log.warning("source %s: %s still blocked after stop(); leaving it behind", self.id, thread.name)
        if self._first_handle is not None:  # started but the thread never took it over
            self._close_quietly(self._first_handle)
            self._first_handle = None
        with self._lock:
            ended = self._state != "ended"
        if ended:
            self._emit("ended", "stopped")
        self._set_state("stopped")

    # ------------------------------------------------------------------ reader thread

    def _run(self) -> None:
        try:
            if self.live:
                self._run_live()
            else:
                self._run_file()
        except Exception as exc:  # a bug must end the stream visibly, not kill the thread silently
            log.exception("source %s: reader crashed", self.id)
            self._emit("ended", f"reader crashed: {self._describe_error(exc)}")
            self._set_state("ended")
        finally:
            self._buffer.close()

    def _run_file(self) -> None:
        handle, self._first_handle = self._first_handle, None
        if handle is None:  # backends that do not open in start()
            try:
                handle = self._open_attempt()
            except Exception as exc:  # not live: no retry, the stream ends visibly
                self._emit("ended", f"open failed: {self._describe_error(exc)}")
                self._set_state("ended")
                return
        self._connected()
        detail = "end of file"
        try:
            self._pump(handle, generation=self._generation)
            if self._reached_max_frames:
                detail = f"reached max_frames ({self.max_frames})"
            elif not self._stop.is_set():
                detail = self._end_of_input(handle)
        except _Lost:
            pass
        except Exception as exc:  # a damaged file ends early but visibly
            detail = f"read error: {self._describe_error(exc)}"
            log.warning("source %s: %s", self.id, detail)
        finally:
            self._close_quietly(handle)
        if not self._stop.is_set():
            self._emit("ended", detail)
            self._set_state("ended")

    def _run_live(self) -> None:
        delays = backoff_delays(self.reconnect)
        while not self._stop.is_set():
            handle = self._first_handle
            self._first_handle = None
            if handle is None:
                try:
                    handle = self._open_attempt()
                except Exception as exc:  # any failure to open a live source is retried, forever
                    self._lost(f"open failed: {self._describe_error(exc)}")
                    if self._stop.wait(next(delays)):
                        return
                    continue
            generation = self._connected()
            produced = self._frames
            try:
                self._pump(handle, generation)
                detail = "end of stream"
            except _Lost:
                detail = "watchdog gave up on the connection"
            except Exception as exc:  # live streams fail in many ways; each one means reconnect
                detail = self._describe_error(exc)
            finally:
                self._close_quietly(handle)
            if self._stop.is_set():
                return
            if self._reached_max_frames:  # done by design: not a loss, nothing to reconnect to
                self._emit("ended", f"reached max_frames ({self.max_frames})")
                self._set_state("ended")
                return
            with self._lock:
                reported = self._dead_generation == generation  # by the watchdog: the same outage
            if not reported:
                self._lost(detail)
            if self._frames > produced:  # a connection that opens but never delivers keeps backing off
                delays = backoff_delays(self.reconnect)
            if self._stop.wait(next(delays)):
                return

    @property
    def _reached_max_frames(self) -> bool:
        with self._lock:
            return self.max_frames is not None and self._frames >= self.max_frames

    def _pump(self, handle: H, generation: int) -> None:
        """Move frames from the backend into the buffer until end of stream, an error, stop or max_frames."""
        if self._reached_max_frames:
            return
        raws = self._iterate(handle)
        try:
            for raw in raws:
                if self._stop.is_set():
                    return
                with self._lock:
                    if generation == self._dead_generation:
                        raise _Lost
                    index = self._frames
                    self._frames += 1
                    self._last_frame_at = raw.decoded_at
                    self._recent.append(raw.decoded_at)
                frame = Frame(self.id, index, raw.pts, raw.decoded_at, raw.image)
                if not self._buffer.put(frame) or self._reached_max_frames:
                    return
        finally:
            raws.close()  # a generator left at max_frames lets go of the backend before its handle closes

    def _open_attempt(self) -> H:
        with self._lock:
            self._generation += 1
        return self._open()

    def _connected(self) -> int:
        with self._lock:
            self._last_frame_at = time.monotonic()  # the watchdog counts from the open
            self._lost_reported = False
            again = self._ever_connected
            self._ever_connected = True
            if again:
                self._reconnects += 1
            self._state = "connected"
            self._emit("reconnected" if again else "connected", self.url)
            return self._generation

    def _lost(self, detail: str) -> None:
        """Report a loss once per outage (the watchdog may have reported it already)."""
        with self._lock:
            if self._lost_reported:
                # An operator must see a source that does not come back; one that never connected is the
                # consumer's to report (see _emit).
                if not (self._ever_connected and self._retry_log.warning(
                        "retry", "source %s: still lost, retrying: %s", self.id, detail)):
                    log.debug("source %s: still lost (%s)", self.id, detail)
                return
            self._lost_reported = True
            self._state = "lost"
            self._emit("lost", detail)

    # ------------------------------------------------------------------ watchdog thread

    def _watch(self) -> None:
        """Declare a live connection lost when no frame arrived for frame_timeout_s, even while the reader is
        stuck inside a blocking read; the reader drops that connection as soon as it gets control back."""
        limit = self.reconnect.frame_timeout_s
        period = min(0.25, limit / 4)
        while not self._stop.wait(period):
            with self._lock:  # one critical section, so a reconnect cannot slip in between
                connected = self._state == "connected" and self._dead_generation != self._generation
                age = time.monotonic() - self._last_frame_at
                if connected and age > limit:
                    self._dead_generation = self._generation
                    self._lost(f"no frame for {age:.1f} s")

    # ------------------------------------------------------------------ helpers

    def _emit(self, status: Status, detail: str) -> None:
        change = StatusChange(self.id, status, detail, time.time())
        # Losing a source that worked is news; a first connection that fails is the consumer's to report
        # (the pipeline exits on it, or warns once while other sources work).
        level = logging.WARNING if status == "lost" and self._ever_connected else logging.INFO
        log.log(level, "source %s %s: %s", self.id, status, detail)
        with self._lock:
            self._events.append(change)

    def _set_state(self, state: str) -> None:
        with self._lock:
            self._state = state

    def _close_quietly(self, handle: Any) -> None:
        try:
            self._close(handle)
        except Exception:  # closing a broken connection may fail again; nothing left to save
            log.debug("source %s: error while closing", self.id, exc_info=True)
