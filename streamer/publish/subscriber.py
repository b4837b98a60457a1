"""A small subscriber for streamer events, and the printer behind `streamer subscribe`."""

from __future__ import annotations

import logging
import math
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import NamedTuple, TextIO

import zmq

from streamer.logutil import RateLimitedLog
from streamer.publish.events import Event, parse_event
from streamer.sockets import ClientKeys, SocketDefaults, SocketKind, make_socket

log = logging.getLogger(__name__)

MAX_GAP_LOG = 1_000  # most recent gaps kept; the counters keep counting
# The largest forward jump in seq believed as lost messages: far more than a subscriber stalled for minutes
# behind its high-water mark loses, far less than a forged or foreign number (2**62) would claim.
MAX_SEQ_JUMP = 1_000_000
SEQ_WARNING_INTERVAL_S = 10.0


class Received(NamedTuple):
    topic: bytes
    event: Event
    payload: bytes  # the JSON exactly as received
    crop: bytes | None  # JPEG bytes, when the publisher sends crops


class EventSubscriber:
    """Connects a SUB socket to a publisher and yields validated events.

    `keys`: CURVE client keys, needed for a publisher beyond loopback (it only lets listed keys in; without
    them, or with an unlisted key, nothing ever arrives: receive() times out).

    Gap tracking: the publisher numbers every message it sends, whatever the topic, so only a subscriber
    that takes every topic (a "" prefix) can tell a lost message from a filtered one. With narrower
    prefixes `gaps` stays 0.

    seq is not authenticated, so one message cannot move the baseline by itself: a seq that goes back or
    jumps ahead by more than MAX_SEQ_JUMP is held until the next message says what it was. If that one
    continues the old numbering, the odd one was forged or replayed (`out_of_sequence`, nothing counted
    as lost); if it continues the new numbering, the publisher restarted (`restarts`, seq went back) or
    the numbering moved on (`resyncs`, a jump too large to believe as losses). Either way it is logged,
    rate limited.
    """

    def __init__(
        self,
        endpoint: str,
        topics: Iterable[str | bytes] = ("",),
        timeout_ms: int | None = SocketDefaults.RECEIVE_TIMEOUT_MS,
        *,
        rcvhwm: int = SocketDefaults.RCVHWM,
        context: zmq.Context | None = None,
        keys: ClientKeys | None = None,
    ) -> None:
        prefixes = [t.encode() if isinstance(t, str) else bytes(t) for t in topics]
        if not prefixes:
            raise ValueError("topics: expected at least one prefix ('' for everything), got none")
        self.endpoint = endpoint
        self.timeout_ms = timeout_ms
        self.tracks_gaps = b"" in prefixes
        self.received = 0
        self.invalid = 0  # messages that were not valid events (logged and skipped)
        self.gaps = 0  # times seq jumped forward
        self.missed = 0  # messages lost in those jumps
        self.restarts = 0  # times seq went backwards and stayed there (publisher restarted)
        self.resyncs = 0  # times seq jumped ahead by more than MAX_SEQ_JUMP and stayed there
        self.out_of_sequence = 0  # messages whose seq fit neither the numbering before nor after them
        self.gap_log: deque[tuple[int, int]] = deque(maxlen=MAX_GAP_LOG)  # (expected seq, received seq)
        self.last_seq: int | None = None  # the last seq of the numbering being followed
        self._held: int | None = None  # a seq that broke the numbering, until the next message explains it
        self._seq_log = RateLimitedLog(log, SEQ_WARNING_INTERVAL_S)
        self.encrypted = keys is not None
        self._socket = make_socket(
            context or zmq.Context.instance(),
            SocketKind.SUB,
            hwm=rcvhwm,
            linger_ms=SocketDefaults.SUB_LINGER_MS,
            max_message_bytes=SocketDefaults.MAX_MESSAGE_BYTES,
            client_keys=keys,
            connect=endpoint,
            setting="subscribe endpoint",
        )
        for prefix in prefixes:  # after connect is fine: libzmq sends them when the connection is up
            self._socket.setsockopt(zmq.SUBSCRIBE, prefix)

    def receive_message(self, timeout_ms: int | None = -1) -> Received | None:
        """The next valid message, or None when none arrives within `timeout_ms`
        (-1: the constructor's timeout; None: wait forever)."""
        if timeout_ms == -1:
            timeout_ms = self.timeout_ms
        deadline = None if timeout_ms is None else time.monotonic() + timeout_ms / 1000
        while True:
            wait_ms = SocketDefaults.POLL_SLICE_MS
            if deadline is not None:
                wait_ms = max(0, min(wait_ms, math.ceil((deadline - time.monotonic()) * 1000)))
            if self._socket.poll(wait_ms, zmq.POLLIN):
                message = self._parse(self._socket.recv_multipart(zmq.NOBLOCK))
                if message is not None:
                    return message
            elif deadline is not None and time.monotonic() >= deadline:
                return None

    def receive(self, timeout_ms: int | None = -1) -> Event | None:
        message = self.receive_message(timeout_ms)
        return None if message is None else message.event

    def __iter__(self) -> Iterator[Event]:
        """Events until the subscriber is closed (no timeout)."""
        while not self._socket.closed:
            message = self.receive_message(None)
            if message is not None:
                yield message.event

    def _parse(self, frames: list[bytes]) -> Received | None:
        if len(frames) not in (2, 3):
            return self._reject(frames[0] if frames else b"", f"expected 2 or 3 frames, got {len(frames)}")
        topic, payload = frames[0], frames[1]
        try:
            event = parse_event(topic, payload)
        except ValueError as exc:  # pydantic's ValidationError included
            return self._reject(topic, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        self.received += 1
        self._track_seq(event.seq)
        return Received(topic, event, payload, frames[2] if len(frames) == 3 else None)

    def _reject(self, topic: bytes, why: str) -> None:
        self.invalid += 1
        log.warning("skipping invalid message on topic %r: %s", topic[:80], why)
        return None

    def _track_seq(self, seq: int) -> None:
        last = self.last_seq
        if last is None or not self.tracks_gaps:
            self.last_seq = seq
            return
        held, self._held = self._held, None
        if _follows(last, seq):
            if held is not None:
                self._out_of_sequence(held, last, seq)
            self._advance(last, seq)
        elif held is not None and _follows(held, seq):
            # Two messages agree on a new numbering.
            if held < last:
                self.restarts += 1
                log.info("seq went back from %d to %d: the publisher restarted", last, held)
            else:
                self.resyncs += 1
                self._seq_log.warning("resync", "seq jumped from %d to %d, more than %d at once: not counted "
                                      "as lost (another publisher on this endpoint?)", last, held, MAX_SEQ_JUMP)
            self._advance(held, seq)
        else:
            if held is not None:
                self._out_of_sequence(held, last, seq)
            self._held = seq

    def _advance(self, last: int, seq: int) -> None:
        self.last_seq = seq
        expected = last + 1
        if seq > expected:
            self.gaps += 1
            self.missed += seq - expected
            self.gap_log.append((expected, seq))
            log.debug("seq gap: expected %d, got %d", expected, seq)

    def _out_of_sequence(self, seq: int, before: int, after: int) -> None:
        self.out_of_sequence += 1
        self._seq_log.warning("odd", "seq %d between %d and %d fits neither: not counted as lost or as a restart "
                              "(a replayed or forged message?)", seq, before, after)

    @property
    def closed(self) -> bool:
        return self._socket.closed

    def close(self) -> None:
        if not self._socket.closed:
            self._socket.close()

    def __enter__(self) -> EventSubscriber:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _follows(last: int, seq: int) -> bool:
    """Whether `seq` can come after `last` in one publisher's numbering (messages may have been lost)."""
    return last < seq <= last + 1 + MAX_SEQ_JUMP


def print_events(
    endpoint: str,
    topic_prefixes: Iterable[str] = ("",),
    out: TextIO | None = None,
    count: int | None = None,
    timeout: float | None = None,
    keys: ClientKeys | None = None,
) -> int:
    """Print events as `<topic> <json>` lines until `count` events were printed or none arrived for
    `timeout` seconds (None: forever). Returns the number printed. `keys`: CURVE client keys for a
    publisher beyond loopback."""
    if count is not None and count < 0:
        raise ValueError(f"count: expected >= 0 or None, got {count}")
    if timeout is not None and timeout < 0:
        raise ValueError(f"timeout: expected >= 0 seconds or None, got {timeout}")
    out = sys.stdout if out is None else out  # looked up now, so a redirected sys.stdout is honoured
    printed = 0
    with EventSubscriber(endpoint, tuple(topic_prefixes) or ("",), keys=keys) as subscriber:
        while count is None or printed < count:
            message = subscriber.receive_message(None if timeout is None else int(timeout * 1000))
            if message is None:
                break
            out.write(f"{message.topic.decode()} {message.payload.decode()}\n")
            out.flush()
            printed += 1
        if subscriber.gaps:
            log.warning("%d messages lost in %d gaps (subscriber too slow?)", subscriber.missed, subscriber.gaps)
        if subscriber.out_of_sequence:
            log.warning("%d messages out of sequence ignored (replayed or forged?)", subscriber.out_of_sequence)
    return printed
