"""The ZeroMQ publish socket that puts events on the wire.

The pipeline must never wait for a subscriber: sends are non-blocking and a slow subscriber loses messages
at its high-water mark instead of slowing anyone down (libzmq drops per subscriber, so one slow reader does
not cost the others anything). Subscribers see every lost message as a jump in `seq`.

The publisher counts what it can see of those losses in `dropped` (the heartbeat's `publish_dropped`). A PUB
socket drops at the high-water mark without a word, so the socket is an XPUB with XPUB_NODROP: a send that
would overflow any subscriber's queue raises zmq.Again instead. That message is counted and sent again
lossy, so the subscribers with room still get it. libzmq then stops offering the full subscriber messages,
silently, until it has read half its queue, so `dropped` counts overflows (each the first message of a
loss; about the number of gaps that subscriber sees), a lower bound of the messages lost: a subscriber that
stopped reading costs one. XPUB also hands us the subscriptions; they are read and discarded, or they
would pile up.

Privacy is enforced here and nowhere else: crops and embeddings leave the process only when the user turned
them on, whatever the caller passes in. The socket itself comes from `streamer.sockets`: beyond loopback it
is a CURVE server (encrypted, only listed subscriber keys get in), and without keys it binds loopback only.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Final

import numpy as np
import zmq

from streamer.imaging import encode_jpeg
from streamer.logutil import RateLimitedLog
from streamer.publish.events import Event, FaceEvent, Identity, WireMessage
from streamer.sockets import ServerKeys, SocketDefaults, SocketKind, bound_endpoint, make_socket

log = logging.getLogger(__name__)

_MORE: Final = int(zmq.NOBLOCK | zmq.SNDMORE)
_LAST: Final = int(zmq.NOBLOCK)
DROP_WARNING_INTERVAL_S = 30.0
# Checking for queued subscriptions costs more than a send (~7 us): do it this often, not per message.
SUBSCRIPTIONS_READ_EVERY_S = 0.1

# The old name, kept so existing imports keep working: every socket default now lives in streamer.sockets.
ZmqDefaults = SocketDefaults

__all__ = ["EventPublisher", "SocketKind", "ZmqDefaults"]


class EventPublisher:
    """Binds a PUB socket and publishes events; thread-safe (one lock around seq + send)."""

    def __init__(
        self,
        endpoint: str,
        sndhwm: int = SocketDefaults.SNDHWM,
        include_crops: bool = False,
        include_embeddings: bool = False,
        *,
        linger_ms: int = SocketDefaults.PUB_LINGER_MS,
        context: zmq.Context | None = None,
        keys: ServerKeys | Path | str | None = None,
    ) -> None:
        """`keys`: CURVE server keys (or the `publish.keys` folder to load them from); required to bind
        beyond loopback, and then only subscribers whose key is in the folder's clients/ get events."""
        if sndhwm < 1:
            raise ValueError(f"sndhwm: expected >= 1, got {sndhwm}")
        if keys is not None and not isinstance(keys, ServerKeys):
            keys = ServerKeys.load(keys, setting="publish.keys")
        self.include_crops = include_crops
        self.include_embeddings = include_embeddings
        self.encrypted = keys is not None
        self._hwm = sndhwm
        self.sent = 0  # messages every subscriber that wanted them got (queued for it)
        # Messages a subscriber's full queue refused: one per overflow, each the start of a loss (see the
        # module docstring); sent + dropped == seq.
        self.dropped = 0
        self._seq = 0
        self._lock = threading.Lock()
        self._drop_log = RateLimitedLog(log, DROP_WARNING_INTERVAL_S)
        self._subscriptions_read_at = 0.0
        # The shared instance context lets inproc:// subscribers in this process reach us. XPUB, not
        # SocketKind.PUB: see the module docstring.
        self._socket = make_socket(
            context or zmq.Context.instance(),
            zmq.XPUB,
            hwm=sndhwm,
            bind=endpoint,
            linger_ms=linger_ms,
            max_message_bytes=SocketDefaults.SUBSCRIPTION_MAX_BYTES,
            server_keys=keys,
            setting="publish.endpoint",
        )
        self._socket.setsockopt(zmq.XPUB_NODROP, 1)
        self.endpoint: str = bound_endpoint(self._socket)
        log.info("publishing events on %s (sndhwm=%d, crops=%s, embeddings=%s, curve=%s)",
                 self.endpoint, sndhwm, include_crops, include_embeddings, self.encrypted)

    @property
    def seq(self) -> int:
        """The seq of the last message published (0 before the first)."""
        return self._seq

    @property
    def closed(self) -> bool:
        return self._socket.closed

    def publish(self, event: Event, crop: np.ndarray | bytes | None = None) -> Event:
        """Stamp `event` with the next seq and send it without blocking; returns the event as sent.

        `crop` (BGR face image or JPEG bytes) goes out as a third frame only when crops are enabled; the
        event's `embedding` only when embeddings are enabled. A message that cannot be sent still uses up
        its seq, so subscribers see the loss as a gap.
        """
        if crop is not None and not isinstance(event, FaceEvent):
            raise ValueError(f"crop: only face events carry crops, got one with a {event.kind!r} event")
        update: dict[str, object] = {}
        jpeg = None
        if self.include_crops and crop is not None:
            jpeg = self._jpeg(crop)
            update["crop"] = True
        elif isinstance(event, FaceEvent) and event.crop is not None:
            update["crop"] = None
        if isinstance(event, Identity) and event.embedding is not None and not self.include_embeddings:
            update["embedding"] = None
        with self._lock:
            if self._socket.closed:
                raise RuntimeError("EventPublisher.publish after close()")
            self._seq += 1
            update["seq"] = self._seq
            stamped = event.model_copy(update=update)
            message = WireMessage(stamped.topic, stamped.payload(), jpeg)
            try:
                self._send(message)
                self.sent += 1
            except zmq.Again:  # a subscriber's queue is full: it loses this one, the others must not
                self.dropped += 1
                self._socket.setsockopt(zmq.XPUB_NODROP, 0)
                try:
                    self._send(message)
                finally:
                    self._socket.setsockopt(zmq.XPUB_NODROP, 1)
                self._drop_log.warning(
                    "drop", "a subscriber is too slow and loses events: its queue of %d was full (%d times so "
                    "far; the subscriber's seq gaps count each lost event)", self._hwm, self.dropped,
                )
            if time.monotonic() - self._subscriptions_read_at >= SUBSCRIPTIONS_READ_EVERY_S:
                self._discard_subscriptions()
        return stamped

    def _send(self, message: WireMessage) -> None:
        # Frame by frame with plain int flags: measurably cheaper than send_multipart per message.
        # libzmq accepts or refuses a multipart message at its first frame, never half of it.
        self._socket.send(message.topic, _MORE)
        if message.crop is None:
            self._socket.send(message.payload, _LAST)
        else:
            self._socket.send(message.payload, _MORE)
            self._socket.send(message.crop, _LAST)

    def _discard_subscriptions(self) -> None:
        self._subscriptions_read_at = time.monotonic()
        while self._socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self._socket.recv(zmq.NOBLOCK)

    @staticmethod
    def _jpeg(crop: np.ndarray | bytes) -> bytes:
        if isinstance(crop, (bytes, bytearray, memoryview)):
            return bytes(crop)
        try:
            return encode_jpeg(crop)
        except ValueError as exc:
            raise ValueError(f"crop: {exc}") from None

    def close(self) -> None:
        with self._lock:
            if not self._socket.closed:
                self._socket.close()
                log.info("event publisher closed: %d sent, %d dropped", self.sent, self.dropped)

    def __enter__(self) -> EventPublisher:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
