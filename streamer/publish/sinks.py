"""Sinks beside the ZeroMQ publisher (MQTT, webhooks): each fed the same stamped events, each optional.

The supervisor calls `Sinks.publish(sent, crop)` with the event exactly as the publisher put it on the wire
(seq stamped, crop and embedding already stripped unless the user turned them on). A sink never makes the
pipeline wait: `publish` only appends to a bounded queue that one worker thread per sink drains. When the
far end is slow or gone the queue fills, the oldest entries are dropped and counted (the newest state is
what a home-automation user wants after an outage), and the worker catches up when it is back.

Every sink answers `stats()` with counters (sent, dropped, failed, queued) for metrics and heartbeats.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterable
from typing import Any, Protocol

from streamer.logutil import RateLimitedLog

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 2.0  # the most a stopping streamer waits for its sinks, all of them together
BATCH = 64  # events delivered between two looks at the clock and the sink's periodic work


class Sink(Protocol):
    """Takes stamped events; never blocks the caller."""

    name: str

    def publish(self, event: Any, crop: bytes | None = None) -> None: ...

    def stats(self) -> dict[str, int]: ...

    def begin_close(self, deadline: float) -> None:
        """Stop taking events; deliver what is queued until `deadline` (time.monotonic())."""

    def wait_closed(self, deadline: float) -> None:
        """Return by `deadline`, closed or not (a stuck far end must not hold up the stop)."""


class QueuedSink:
    """A bounded drop-oldest queue and the one worker thread that delivers from it.

    Subclasses implement `_deliver(event, crop)`: True when delivered, False when it failed for good (counted
    as failed), None when it could not be tried now (the subclass put it back with `_push_front`). They may
    override `_accepts` (a cheap filter, run on the caller's thread), `_ready` (False holds the queue, e.g.
    while disconnected), `_tick` (periodic work on the worker thread, every `tick_s` at least) and `_finish`
    (last words on the worker thread, before it ends).
    """

    def __init__(self, name: str, maxsize: int, *, tick_s: float = 0.5) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize: expected >= 1, got {maxsize}")
        self.name = name
        self.maxsize = maxsize
        self.tick_s = tick_s
        self.sent = 0
        self.dropped = 0  # pushed out of a full queue, or still queued when the sink closed
        self.failed = 0  # tried and given up on
        self._items: deque[tuple[Any, bytes | None]] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._deadline = float("inf")
        self._log = RateLimitedLog(log)
        self._thread = threading.Thread(target=self._run, name=f"streamer-sink-{name}", daemon=True)

    # -- caller side (the supervisor thread) ----------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def publish(self, event: Any, crop: bytes | None = None) -> None:
        if not self._accepts(event):
            return
        with self._cond:
            if self._stopping:
                self.dropped += 1
                return
            if len(self._items) >= self.maxsize:
                self._items.popleft()
                self.dropped += 1
            self._items.append((event, crop))
            self._cond.notify()

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"sent": self.sent, "dropped": self.dropped, "failed": self.failed, "queued": len(self._items)}

    def begin_close(self, deadline: float) -> None:
        with self._cond:
            self._stopping = True
            self._deadline = deadline
            self._cond.notify_all()

    def wait_closed(self, deadline: float) -> None:
        if self._thread.is_alive():
            self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            log.warning("%s: still busy at stop; %d queued events not delivered", self.name, len(self._items))

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        self.begin_close(deadline)
        self.wait_closed(deadline)

    # -- worker side ------------------------------------------------------------------------------------------
    def _accepts(self, event: Any) -> bool:
        return True

    def _ready(self) -> bool:
        return True

    def _tick(self) -> None:
        pass

    def _finish(self) -> None:
        pass

    def _deliver(self, event: Any, crop: bytes | None) -> bool | None:
        raise NotImplementedError

    def _wake(self) -> None:
        """Another thread changed what `_ready` answers (e.g. a connection came up)."""
        with self._cond:
            self._cond.notify_all()

    def _push_front(self, event: Any, crop: bytes | None) -> None:
        with self._cond:
            if len(self._items) >= self.maxsize:
                self.dropped += 1  # it is the oldest of all
            else:
                self._items.appendleft((event, crop))

    def _stop_now(self) -> bool:
        # Under the lock. A stopping sink delivers what is queued while it can, and no longer than the deadline.
        return self._stopping and (not self._items or not self._ready() or time.monotonic() >= self._deadline)

    def _sleep(self, seconds: float) -> bool:
        """Wait (between retries); False when the sink is stopping and the deadline comes first."""
        with self._cond:
            end = time.monotonic() + seconds
            while (remaining := end - time.monotonic()) > 0:
                if self._stopping and time.monotonic() + remaining >= self._deadline:
                    return False
                self._cond.wait(remaining)
            return True

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    if not self._stop_now() and not (self._items and self._ready()):
                        self._cond.wait(self.tick_s)
                    if self._stop_now():
                        self.dropped += len(self._items)
                        self._items.clear()
                        break
                    ready = self._items and self._ready()
                for _ in range(BATCH if ready else 0):  # the lock and the tick once per batch, not per event
                    with self._cond:
                        if not self._items or (self._stopping and time.monotonic() >= self._deadline):
                            break
                        item = self._items.popleft()
                    try:
                        result = self._deliver(*item)
                    except Exception as exc:  # a bug or an unexpected library error: count it, keep going
                        self._log.warning("deliver", "%s: delivering an event failed: %s", self.name, exc)
                        result = False
                    if result is True:
                        self.sent += 1  # only this thread writes the counters of what it tried
                    elif result is False:
                        self.failed += 1
                    else:
                        break  # not now (e.g. the connection went): back to waiting
                try:
                    self._tick()
                except Exception as exc:
                    self._log.warning("tick", "%s: %s", self.name, exc)
        finally:
            try:
                self._finish()
            except Exception as exc:
                log.warning("%s: closing failed: %s", self.name, exc)


class Sinks:
    """Every configured sink behind one call; empty (and free) when none is configured."""

    def __init__(self, sinks: Iterable[Sink] = ()) -> None:
        self.sinks: list[Sink] = list(sinks)
        self._log = RateLimitedLog(log)

    @classmethod
    def from_settings(cls, settings: Any) -> Sinks:
        """The sinks `settings.publish` asks for, started. Their client libraries load only when configured."""
        sinks: list[Sink] = []
        publish = settings.publish
        try:
            if publish.mqtt is not None:
                from streamer.publish.mqtt import MqttSink

                streams = [source.id or f"cam{i}" for i, source in enumerate(settings.sources)]
                sinks.append(MqttSink(publish.mqtt, streams=streams, gallery=settings.gallery))  # file or URL
            if publish.webhooks:
                from streamer.publish.webhooks import WebhookSink

                for index, hook in enumerate(publish.webhooks):
                    sinks.append(WebhookSink(hook, name=f"webhook{index}"))
            if publish.nats is not None:
                from streamer.publish.nats import NatsSink

                sinks.append(NatsSink(publish.nats))  # a new publisher id per run: seq restarts with it
        except BaseException:
            cls(sinks).close(0.5)
            raise
        return cls(sinks)

    def __bool__(self) -> bool:
        return bool(self.sinks)

    def publish(self, event: Any, crop: bytes | None = None) -> None:
        for sink in self.sinks:
            try:
                sink.publish(event, crop)
            except Exception as exc:  # one broken sink must not stop the pipeline or the other sinks
                self._log.warning(sink.name, "%s: dropping an event: %s", sink.name, exc)

    def stats(self) -> dict[str, dict[str, int]]:
        return {sink.name: sink.stats() for sink in self.sinks}

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Close all sinks side by side, within `timeout_s` in all."""
        deadline = time.monotonic() + timeout_s
        for sink in self.sinks:
            sink.begin_close(deadline)
        for sink in self.sinks:
            sink.wait_closed(deadline)
        for sink in self.sinks:
            stats = sink.stats()
            log.info("%s closed: %s", sink.name, ", ".join(f"{k} {v}" for k, v in stats.items()))
