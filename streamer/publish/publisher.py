"""The ZeroMQ PUB socket that puts events on the wire.

The pipeline must never wait for a subscriber: sends are non-blocking and a slow subscriber loses messages
at its high-water mark instead of slowing anyone down (libzmq drops per subscriber, so one slow reader does
not cost the others anything). Subscribers see such losses as jumps in `seq`.

Privacy is enforced here and nowhere else: crops and embeddings leave the process only when the user turned
them on, whatever the caller passes in.
"""

from __future__ import annotations

import errno
import logging
import threading
from enum import IntEnum
from types import TracebackType
from typing import Final

import cv2
import numpy as np
import zmq

from streamer.errors import ConfigError
from streamer.publish.events import Event, FaceEvent, Identity, WireMessage

log = logging.getLogger(__name__)

_MORE: Final = int(zmq.NOBLOCK | zmq.SNDMORE)
_LAST: Final = int(zmq.NOBLOCK)


class SocketKind(IntEnum):
    PUB = zmq.PUB
    SUB = zmq.SUB


class ZmqDefaults:
    """Socket settings in one place, so publisher and subscriber agree and tests can shrink them."""

    SNDHWM: Final = 10_000  # messages queued per subscriber before that subscriber starts losing them
    RCVHWM: Final = 10_000
    # Long enough for the last events (stream ended) to reach a live subscriber at shutdown, short enough
    # that a dead one cannot hang the exit.
    PUB_LINGER_MS: Final = 500
    SUB_LINGER_MS: Final = 0
    RECEIVE_TIMEOUT_MS: Final = 1_000
    # Waits are cut into slices this long so Ctrl-C is honoured promptly.
    POLL_SLICE_MS: Final = 200
    JPEG_QUALITY: Final = 90


class EventPublisher:
    """Binds a PUB socket and publishes events; thread-safe (one lock around seq + send)."""

    def __init__(
        self,
        endpoint: str,
        sndhwm: int = ZmqDefaults.SNDHWM,
        include_crops: bool = False,
        include_embeddings: bool = False,
        *,
        linger_ms: int = ZmqDefaults.PUB_LINGER_MS,
        context: zmq.Context | None = None,
    ) -> None:
        if sndhwm < 1:
            raise ValueError(f"sndhwm: expected >= 1, got {sndhwm}")
        self.include_crops = include_crops
        self.include_embeddings = include_embeddings
        self.sent = 0  # messages handed to libzmq
        self.dropped = 0  # messages libzmq refused without blocking (none can be sent right now)
        self._seq = 0
        self._lock = threading.Lock()
        # The shared instance context lets inproc:// subscribers in this process reach us.
        self._socket = (context or zmq.Context.instance()).socket(SocketKind.PUB)
        self._socket.setsockopt(zmq.LINGER, linger_ms)
        self._socket.setsockopt(zmq.SNDHWM, sndhwm)
        try:
            self._socket.bind(endpoint)
        except zmq.ZMQError as exc:
            self._socket.close(linger=0)
            hint = " (another process is using it; pick another port)" if exc.errno == errno.EADDRINUSE else ""
            raise ConfigError(f"publish.endpoint: cannot bind {endpoint!r}: {exc.strerror}{hint}") from None
        self.endpoint: str = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        log.info("publishing events on %s (sndhwm=%d, crops=%s, embeddings=%s)",
                 self.endpoint, sndhwm, include_crops, include_embeddings)

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
                # Frame by frame with plain int flags: measurably cheaper than send_multipart per message.
                # libzmq accepts or refuses a multipart message at its first frame, never half of it.
                self._socket.send(message.topic, _MORE)
                if jpeg is None:
                    self._socket.send(message.payload, _LAST)
                else:
                    self._socket.send(message.payload, _MORE)
                    self._socket.send(jpeg, _LAST)
                self.sent += 1
            except zmq.Again:
                self.dropped += 1
        return stamped

    @staticmethod
    def _jpeg(crop: np.ndarray | bytes) -> bytes:
        if isinstance(crop, (bytes, bytearray, memoryview)):
            return bytes(crop)
        if crop.dtype != np.uint8 or crop.ndim not in (2, 3) or crop.size == 0:
            raise ValueError(f"crop: expected a non-empty uint8 BGR image, got {crop.dtype} {crop.shape}")
        ok, buffer = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, ZmqDefaults.JPEG_QUALITY])
        if not ok:
            raise ValueError(f"crop: JPEG encoding failed for shape {crop.shape}")
        return buffer.tobytes()

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
