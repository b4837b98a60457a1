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

from streamer.publish.events import Event, parse_event
from streamer.sockets import ClientKeys, SocketDefaults, SocketKind, make_socket

log = logging.getLogger(__name__)

MAX_GAP_LOG = 1_000  # most recent gaps kept; the counters keep counting


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
        self.restarts = 0  # times seq went backwards (publisher restarted)
        self.gap_log: deque[tuple[int, int]] = deque(maxlen=MAX_GAP_LOG)  # (expected seq, received seq)
        self.last_seq: int | None = None
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
        expected = None if self.last_seq is None else self.last_seq + 1
        self.last_seq = seq
        if expected is None or seq == expected or not self.tracks_gaps:
            return
        if seq > expected:
            self.gaps += 1
            self.missed += seq - expected
            self.gap_log.append((expected, seq))
            log.debug("seq gap: expected %d, got %d", expected, seq)
        else:
            self.restarts += 1
            log.info("seq went back from %d to %d: the publisher restarted", expected - 1, seq)

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
    return printed
