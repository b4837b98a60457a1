"""The detect worker's side of the inference link: request ids, what is in flight, expiry, crops.

A request carries pixels only; what it is about (stream, frame, tracks, boxes) stays here, keyed by
its id, so a reply can only ever be matched to faces this client sent. Live sources never wait for
inference: when the link is full their faces are dropped and counted (the gate picks the track again
at its next refresh). Files wait, up to the request timeout, so no face of a file is skipped silently.

It also knows whether the worker is there (`poll_health`): the socket's connection events (refused, lost,
handshake refused) and silence (nothing heard for `timeout_s` while something is asked) make it "down"; any
valid reply makes it "up" again. ZeroMQ reconnects by itself, so a worker that comes back on the same
endpoint is used again without a restart. While down nothing is sent (faces are dropped and counted, files
do not wait) and a hello goes out every PROBE_INTERVAL_S on a live connection, so the first answer of a
worker that is back is seen at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import zmq

from streamer.errors import ConfigError, StreamerError
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
PROBE_INTERVAL_S = 1.0  # a hello when nothing was heard this long: the cheapest "are you there?"
# A remote worker runs already: it answers a new client within this. A local one first loads its models.
REMOTE_CONNECT_GRACE_S = 3.0
LOCAL_CONNECT_GRACE_S = 60.0

InferenceState = Literal["starting", "up", "down"]

_MONITORED = (zmq.EVENT_CONNECT_DELAYED | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_DISCONNECTED
              | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
              | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


class InferenceMismatch(StreamerError):
    """The inference worker runs other models than this host: its vectors would not be comparable."""


@dataclass(frozen=True, eq=False)
class Answered:
    batch: ChipBatch
    result: InferenceResult
    crops: list[bytes] | None  # JPEG per face, only when crops are published or a tap wants them
    waited_s: float = 0.0  # from send to answer: batching wait, model time and the link both ways


@dataclass(frozen=True)
class HealthChange:
    """The inference link went up or down; `detail` says why it is down, or how long it was."""

    status: Literal["up", "down"]
    detail: str


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
        connect_grace_s: float = REMOTE_CONNECT_GRACE_S,
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
        self.connect_grace_s = connect_grace_s
        self.socket = make_socket(
            context or zmq.Context.instance(), SocketKind.DEALER, hwm=SocketDefaults.REQUEST_HWM,
            max_message_bytes=SocketDefaults.MAX_MESSAGE_BYTES, client_keys=keys, setting="inference.endpoint",
        )
        # Watched before connecting, so not even the first connection event is missed.
        self._monitor = self.socket.get_monitor_socket(_MONITORED)
        self._monitor.setsockopt(zmq.LINGER, 0)
        try:
            self.socket.connect(endpoint)
        except zmq.ZMQError as exc:
            self.close()
            raise ConfigError(f"inference.endpoint: cannot connect to {endpoint!r}: {exc.strerror}") from None
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
        self.faces_dropped = 0  # faces of the requests not sent
        self.last_answer_at: float | None = None
        # health (see poll_health)
        self.health: InferenceState = "starting"
        self.health_detail = ""
        self.ever_up = False
        self._created = self._last_probe = clock()
        self._down_since: float | None = None
        self._unanswered_since: float | None = None  # first thing sent since the worker was last heard
        self._connected = False  # a finished handshake, per the socket's events
        self._connections = 0
        self._lost = False  # the connection dropped since the worker was last heard
        self._connection_trouble: str | None = None  # the latest connection event that was not a success
        self._changes: list[HealthChange] = []
        self._hello = Hello(embedder, sha256, self.heads).to_frames()
        self.socket.send_multipart(self._hello, zmq.NOBLOCK)

    @classmethod
    def from_settings(cls, settings, models, endpoint: str, *, context: zmq.Context | None = None,  # noqa: ANN001
                      crops: bool = False) -> InferenceClient:
        """For `settings` (keys, crops) and the embedder of `models` (a ModelFactory). `crops`: make face
        crops even when they are not published (a tap in the supervisor wants them; `include_crops` may be
        switched later too)."""
        spec = models.embedder_spec
        keys = None
        if settings.inference.server_key is not None:
            from streamer.sockets import ClientKeys

            keys = ClientKeys.load(settings.inference.client_key, settings.inference.server_key)
        grace = LOCAL_CONNECT_GRACE_S if settings.inference.endpoint is None else REMOTE_CONNECT_GRACE_S
        return cls(endpoint, embedder=spec.id, sha256=models.embedder_sha256, heads=settings.attributes.enabled,
                   chip_size=spec.chip_size, embedding_dim=spec.dim, include_crops=settings.publish.include_crops or crops,
                   connect_grace_s=grace, keys=keys, context=context)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def submit(self, batch: ChipBatch, image: np.ndarray | None = None, *, live: bool) -> bool:
        """Send one batch; False when it was dropped. `image` (the frame) is needed only for crops."""
        request_id = self._next_id
        self._next_id += 1
        if self.health == "down":  # nobody to send to: a queue of stale requests would only delay the comeback
            self.dropped += 1
            self.faces_dropped += len(batch)
            return False
        frames = InferenceRequest(request_id, self.embedder, batch.arrays).to_frames()
        if not self._send(frames, wait_s=0.0 if live else self.timeout_s):
            self.dropped += 1
            self.faces_dropped += len(batch)
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
                if self._unanswered_since is None:
                    self._unanswered_since = self.clock()
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
        self._read_monitor()  # connection events first: a reply on a new connection outranks the old one's loss
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
            self._heard(self.last_answer_at)
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
        if self._monitor is not None:
            self.socket.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None
        self.socket.close(linger=0)

    # -- replies ----------------------------------------------------------------------------------
    def _welcomed(self, welcome: Welcome) -> None:
        problem = welcome.mismatch(self.embedder, self.sha256, self.chip_size, self.heads)
        if problem is not None:
            raise InferenceMismatch(f"inference.endpoint {self.endpoint}: {problem}")
        if welcome != self.welcome:  # probes are answered by a Welcome too: say it only when it is news
            log.info("inference worker %s: %s on %s, batches up to %d", self.endpoint, welcome.embedder,
                     welcome.device, welcome.max_batch)
        self.welcome = welcome

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
        return Answered(pending.batch, result, pending.crops, max(0.0, self.clock() - pending.sent_at))

    # -- health -----------------------------------------------------------------------------------
    def poll_health(self) -> list[HealthChange]:
        """Read the connection events, decide whether the worker is there, probe it when it is silent;
        the changes since the last call (the first answer ever is an "up" too)."""
        now = self.clock()
        self._read_monitor()
        silent = self._unanswered_since is not None and now - self._unanswered_since > self.timeout_s
        if self.health == "up":
            if self._lost:
                self._go_down(now, f"lost the connection to {self.endpoint}")
            elif silent:
                self._go_down(now, f"{self.endpoint} has not answered for {now - self._unanswered_since:.0f} s")
        elif self.health == "starting":
            if (self._connected and silent) or (not self._connected and now - self._created > self.connect_grace_s):
                self._go_down(now, self._why_not_up(now))
        if self._connected and now - self._last_probe >= PROBE_INTERVAL_S and (
                self.health != "up" or self.last_answer_at is None or now - self.last_answer_at >= PROBE_INTERVAL_S):
            self._probe(now)
        changes, self._changes = self._changes, []
        return changes

    def give_up(self) -> list[HealthChange]:
        """At the end of the input: a worker that never answered is down now (with why), not "starting"."""
        if self.health == "starting":
            self._read_monitor()
            now = self.clock()
            self._go_down(now, self._why_not_up(now))
        changes, self._changes = self._changes, []
        return changes

    def _probe(self, now: float) -> None:
        self._last_probe = now
        try:
            self.socket.send_multipart(self._hello, zmq.NOBLOCK)
        except zmq.Again:
            return  # the link is full: what is queued will be answered, or not
        if self._unanswered_since is None:
            self._unanswered_since = now

    def _heard(self, now: float) -> None:
        self._unanswered_since = None
        self._lost = False
        if self.health == "up":
            return
        detail = "" if self._down_since is None else f"back after {now - self._down_since:.1f} s"
        self.health, self.health_detail, self.ever_up, self._down_since = "up", "", True, None
        self._changes.append(HealthChange("up", detail))
        log.info("inference worker %s is up%s", self.endpoint, f" ({detail})" if detail else "")

    def _go_down(self, now: float, why: str) -> None:
        self.health, self.health_detail, self._down_since = "down", why, now
        # What was in flight went with the worker: its tracks are picked again once it is back.
        self.expired += len(self._pending)
        self._pending.clear()
        self._unanswered_since = None
        self._lost = False
        self._changes.append(HealthChange("down", why))

    def _read_monitor(self) -> None:
        from zmq.utils.monitor import parse_monitor_message

        while self._monitor is not None:
            try:
                event = parse_monitor_message(self._monitor.recv_multipart(zmq.NOBLOCK))["event"]
            except zmq.Again:
                return
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                if self._connections:  # a reconnection: ask at once (the first one carries the first hello)
                    self._last_probe = float("-inf")
                self._connections += 1
                self._connected, self._connection_trouble = True, None
            elif event == zmq.EVENT_DISCONNECTED:
                self._lost = self._lost or self._connected
                self._connected = False
            elif event == zmq.EVENT_CONNECT_RETRIED:
                self._connection_trouble = self._connection_trouble or "retried"
            elif event == zmq.EVENT_CONNECT_DELAYED:
                pass  # a connection attempt is under way
            else:  # a handshake failed
                self._lost = self._lost or self._connected
                self._connected = False
                self._connection_trouble = "auth" if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH else "handshake"

    def _why_not_up(self, now: float) -> str:
        where = self.endpoint
        if self._connected:
            return f"{where} accepted the connection but has not answered in {now - self._created:.0f} s"
        trouble = self._connection_trouble
        if trouble == "auth":
            return f"{where} refused this host's CURVE key (the worker's clients/ folder must hold its public key)"
        if trouble == "handshake":
            return f"the handshake with {where} failed (inference.server_key must be that worker's server.key)"
        if trouble == "retried":
            return f"cannot connect to {where} (nothing listens there, or it is unreachable)"
        return f"no connection to {where} after {now - self._created:.0f} s (is the host reachable?)"
