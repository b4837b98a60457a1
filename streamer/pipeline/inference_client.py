"""The detect worker's side of the inference link: request ids, what is in flight, expiry, crops.

A request carries pixels only; what it is about (stream, frame, tracks, boxes) stays here, keyed by
its id, so a reply can only ever be matched to faces this client sent. Live sources never wait for
inference: when the link is full their faces are dropped and counted (the gate picks the track again
at its next refresh). Files wait, up to the request timeout, so no face of a file is skipped silently.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import zmq

from streamer.errors import StreamerError
from streamer.imaging import encode_jpeg, face_crop
from streamer.logutil import RateLimitedLog
from streamer.pipeline.protocol import (
    ErrorReply,
    Hello,
    InferenceRequest,
    InferenceResult,
    Limits,
    ProtocolError,
    Welcome,
    from_frames,
)
from streamer.sockets import SocketDefaults, SocketKind, make_socket
from streamer.track.processor import ChipBatch

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 10.0  # a request unanswered this long is given up (inference worker restarting)


class InferenceMismatch(StreamerError):
    """The inference worker runs other models than this host: its vectors would not be comparable."""


@dataclass(frozen=True, eq=False)
class Answered:
    batch: ChipBatch
    result: InferenceResult
    crops: list[bytes] | None  # JPEG per face, only when crops are published


@dataclass
class _Pending:
    batch: ChipBatch
    sent_at: float
    crops: list[bytes] | None


class InferenceClient:
    def __init__(
        self,
        endpoint: str,
        *,
        embedder: str,
        sha256: str,
        heads: Sequence[str],
        chip_size: int,
        embedding_dim: int | None = None,
        include_crops: bool = False,
        timeout_s: float = REQUEST_TIMEOUT_S,
        keys=None,  # noqa: ANN001 - streamer.sockets.ClientKeys
        context: zmq.Context | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.embedder = embedder
        self.sha256 = sha256
        self.heads = tuple(heads)
        self.chip_size = chip_size
        self.include_crops = include_crops
        self.timeout_s = timeout_s
        self.clock = clock
        self.limits = Limits(embedding_dim=embedding_dim, accept=frozenset({"welcome", "result", "error"}))
        self.socket = make_socket(
            context or zmq.Context.instance(), SocketKind.DEALER, hwm=SocketDefaults.REQUEST_HWM,
            connect=endpoint, max_message_bytes=SocketDefaults.MAX_MESSAGE_BYTES, client_keys=keys,
            setting="inference.endpoint",
        )
        self.endpoint = endpoint
        self.welcome: Welcome | None = None
        self._pending: dict[int, _Pending] = {}
        self._next_id = 1
        self._log = RateLimitedLog(log)
        # counters (faces, except where named)
        self.faces_sent = 0
        self.faces_embedded = 0
        self.dropped = 0  # requests not sent: the link was full (live) or stayed full (file)
        self.expired = 0  # requests given up on: no answer within timeout_s
        self.rejected = 0  # requests the worker answered with an error
        self.invalid = 0  # replies that broke the protocol
        self.last_answer_at: float | None = None
        self.socket.send_multipart(Hello(embedder, sha256, self.heads).to_frames(), zmq.NOBLOCK)

    @classmethod
    def from_settings(cls, settings, models, endpoint: str, *, context: zmq.Context | None = None) -> InferenceClient:  # noqa: ANN001
        """For `settings` (keys, crops) and the embedder of `models` (a ModelFactory)."""
        spec = models.embedder_spec
        keys = None
        if settings.inference.server_key is not None:
            from streamer.sockets import ClientKeys

            keys = ClientKeys.load(settings.inference.client_key, settings.inference.server_key)
        return cls(endpoint, embedder=spec.id, sha256=models.embedder_sha256, heads=settings.attributes.enabled,
                   chip_size=spec.chip_size, embedding_dim=spec.dim, include_crops=settings.publish.include_crops,
                   keys=keys, context=context)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def submit(self, batch: ChipBatch, image: np.ndarray | None = None, *, live: bool) -> bool:
        """Send one batch; False when it was dropped. `image` (the frame) is needed only for crops."""
        request_id = self._next_id
        self._next_id += 1
        frames = InferenceRequest(request_id, self.embedder, batch.arrays).to_frames()
        if not self._send(frames, wait_s=0.0 if live else self.timeout_s):
            self.dropped += 1
            return False
        crops = None
        if self.include_crops and image is not None:
            crops = [encode_jpeg(face_crop(image, box)) for box in batch.boxes]
        self._pending[request_id] = _Pending(batch, self.clock(), crops)
        self.faces_sent += len(batch)
        return True

    def _send(self, frames: list, wait_s: float) -> bool:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self.socket.send_multipart(frames, zmq.NOBLOCK, copy=False)
                return True
            except zmq.Again:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.socket.poll(min(100, int(left * 1000) + 1), zmq.POLLOUT)

    def receive(self, timeout_ms: int = 0) -> list[Answered]:
        """Results that arrived (waiting up to `timeout_ms` for the first); raises InferenceMismatch when
        the worker turns out to run other models."""
        answered: list[Answered] = []
        if not self.socket.poll(timeout_ms, zmq.POLLIN):
            return answered
        while True:
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return answered
            try:
                message = from_frames(frames, self.limits)
            except ProtocolError as exc:
                self.invalid += 1
                self._log.warning("invalid", "inference worker %s sent an invalid reply: %s", self.endpoint, exc)
                continue
            self.last_answer_at = self.clock()
            if isinstance(message, Welcome):
                self._welcomed(message)
            elif isinstance(message, ErrorReply):
                self._rejected(message)
            elif isinstance(message, InferenceResult):
                done = self._answered(message)
                if done is not None:
                    answered.append(done)

    def expire(self) -> list[ChipBatch]:
        """Give up on requests older than the timeout (their tracks are picked again by the gate)."""
        now = self.clock()
        gone = [rid for rid, p in self._pending.items() if now - p.sent_at > self.timeout_s]
        batches = [self._pending.pop(rid).batch for rid in gone]
        if batches:
            self.expired += len(batches)
            self._log.warning("expired", "%d inference request(s) unanswered for %.0f s (is the inference worker "
                              "at %s running?)", len(batches), self.timeout_s, self.endpoint)
        return batches

    def wait_idle(self, timeout_s: float) -> list[Answered]:
        """Results of everything in flight, waiting at most `timeout_s` (a graceful stop)."""
        deadline = time.monotonic() + timeout_s
        answered: list[Answered] = []
        while self._pending and time.monotonic() < deadline:
            answered.extend(self.receive(timeout_ms=50))
        return answered

    def close(self) -> None:
        self.socket.close(linger=0)

    # -- replies ----------------------------------------------------------------------------------
    def _welcomed(self, welcome: Welcome) -> None:
        problem = welcome.mismatch(self.embedder, self.sha256, self.chip_size, self.heads)
        if problem is not None:
            raise InferenceMismatch(f"inference.endpoint {self.endpoint}: {problem}")
        self.welcome = welcome
        log.info("inference worker %s: %s on %s, batches up to %d", self.endpoint, welcome.embedder,
                 welcome.device, welcome.max_batch)

    def _rejected(self, error: ErrorReply) -> None:
        pending = self._pending.pop(error.id, None) if error.id is not None else None
        if pending is not None:
            self.rejected += 1
        self._log.warning("rejected", "inference worker %s refused a request: %s", self.endpoint, error.error)

    def _answered(self, result: InferenceResult) -> Answered | None:
        if result.embedder != self.embedder or result.sha256 != self.sha256:
            # Vectors from another embedding space must never be matched against our gallery.
            self._pending.pop(result.id, None)
            raise InferenceMismatch(
                f"inference.endpoint {self.endpoint}: results come from embedder {result.embedder} "
                f"(sha256 {result.sha256[:12]}), this host uses {self.embedder} (sha256 {self.sha256[:12]})"
            )
        pending = self._pending.get(result.id)
        if pending is None:
            return None  # given up on already (expired), or never ours
        if result.n != len(pending.batch):
            self._pending.pop(result.id)
            self.invalid += 1
            self._log.warning("count", "inference worker %s answered request %d with %d faces, it had %d",
                              self.endpoint, result.id, result.n, len(pending.batch))
            return None
        missing = [h for h in pending.batch.arrays if h != "chips" and h not in result.arrays]
        if missing:
            self._log.warning("heads", "inference worker %s sent no %s results", self.endpoint, ", ".join(missing))
        del self._pending[result.id]
        self.faces_embedded += result.n
        return Answered(pending.batch, result, pending.crops)
