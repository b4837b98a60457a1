"""The inference worker: batched embedder + attribute heads on the onnxruntime provider that really loaded.

It binds a ROUTER socket; any number of detect workers (DEALER) send requests of prepared chips and get
their results back by identity. Every message is checked (`protocol.from_frames`) before it is queued:
a malformed or hostile one is logged (rate limited) and answered with an error, and never reaches a
batch, so other callers are unaffected. Beyond loopback the socket is CURVE-encrypted and only listed
client keys get in (`streamer keys generate`).
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from streamer.config import Settings
from streamer.errors import StreamerError
from streamer.infer.batch import InferenceModels
from streamer.logutil import RateLimitedLog
from streamer.pipeline.batching import DynamicBatcher
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

log = logging.getLogger(__name__)


@dataclass
class PendingRequest:
    reply_to: bytes  # ZeroMQ ROUTER identity of the detect worker that asked
    request: InferenceRequest
    arrived: float = field(default_factory=time.monotonic)

    @property
    def faces(self) -> int:
        return self.request.n


def concat(requests: list[PendingRequest], key: str) -> np.ndarray | None:
    parts = [r.request.arrays[key] for r in requests if key in r.request.arrays]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


class InferenceWorker:
    def __init__(
        self,
        settings: Settings,
        endpoint: str,
        models: InferenceModels | None = None,
        *,
        keys=None,  # noqa: ANN001 - streamer.sockets.ServerKeys, required beyond loopback
        sha256: str | None = None,
        setting: str = "inference.endpoint",
    ) -> None:
        from streamer.models.factory import ModelFactory

        self.settings = settings
        factory = ModelFactory(settings)
        self.models = models or InferenceModels.load(factory)
        self.sha256 = sha256 or factory.embedder_sha256
        self.embedder_id = self.models.embedder.spec.id
        self.max_batch = settings.inference.max_batch
        self.limits = Limits(
            chip_size=self.models.chip_size,
            heads=frozenset(self.models.heads),
            max_faces=self.max_batch,
            accept=frozenset({"hello", "request"}),
        )
        self.batcher = DynamicBatcher(self.max_batch, settings.inference.max_wait_ms / 1000)
        self.socket = make_socket(
            zmq.Context.instance(), SocketKind.ROUTER, hwm=SocketDefaults.RESULT_HWM, bind=endpoint,
            max_message_bytes=SocketDefaults.MAX_MESSAGE_BYTES, server_keys=keys, setting=setting,
        )
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.running = True
        self.batches = 0
        self.faces = 0
        self.refused = 0  # messages refused (malformed, wrong embedder, too many faces)
        self._log = RateLimitedLog(log)

    @property
    def welcome(self) -> Welcome:
        return Welcome(self.embedder_id, self.sha256, tuple(self.models.heads), self.models.chip_size,
                       self.max_batch, self.models.device)

    def stop(self, *_: object) -> None:
        self.running = False

    def serve(self) -> None:
        try:
            while self.running:
                self.step()
        finally:
            self.socket.close(linger=0)

    def step(self, max_wait_ms: int = 100) -> None:
        """Receive what is there (waiting until the next batch is due), run every due batch."""
        wait = self.batcher.seconds_until_due()
        timeout_ms = max_wait_ms if wait is None else max(0, min(max_wait_ms, int(wait * 1000)))
        if self.socket.poll(timeout_ms, zmq.POLLIN):
            self._receive_all()
        while self.batcher.due():
            self._run_batch(self.batcher.take())

    def _receive_all(self) -> None:
        # Until a batch is due: a peer sending faster than we can refuse must not starve everyone's batches.
        while not self.batcher.due():
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if len(frames) < 2:
                continue  # no body: nothing to answer
            identity = frames[0].bytes
            try:
                message = from_frames(frames[1:], self.limits)
            except ProtocolError as exc:
                self._refuse(identity, None, str(exc))
                continue
            if isinstance(message, Hello):
                self._reply(identity, self.welcome.to_frames())
            elif message.embedder != self.embedder_id:
                self._refuse(identity, message.id, f"this worker runs embedder {self.embedder_id}, the request is "
                             f"for {message.embedder}")
            else:
                self.batcher.add(PendingRequest(identity, message))

    def _refuse(self, identity: bytes, request_id: int | None, why: str) -> None:
        self.refused += 1
        self._log.warning(f"refused:{identity.hex()[:16]}", "refused a message from peer %s: %s", identity.hex()[:16], why)
        self._reply(identity, ErrorReply(why, request_id).to_frames())

    def _reply(self, identity: bytes, frames: list[Any]) -> None:
        try:
            self.socket.send_multipart([identity, *frames], zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self._log.warning(f"slow:{identity.hex()[:16]}", "reply to peer %s dropped: it is not reading",
                              identity.hex()[:16])
        except zmq.ZMQError as exc:  # the peer went away (ROUTER_MANDATORY is off, but be safe)
            self._log.warning("send", "reply dropped: %s", exc.strerror)

    def _run_batch(self, requests: list[PendingRequest]) -> None:
        started = time.monotonic()
        arrays = {key: a for key in ("chips", *self.models.heads) if (a := concat(requests, key)) is not None}
        results = self.models.run(arrays)
        elapsed_ms = (time.monotonic() - started) * 1000
        batch_faces = sum(r.faces for r in requests)
        self.batches += 1
        self.faces += batch_faces
        # A head's rows belong only to the requests that sent crops for it (a client may send fewer heads
        # than the worker runs), so each output keeps its own offset; one shared offset would hand a request
        # the values of other clients' faces.
        offsets = dict.fromkeys(results, 0)
        for pending in requests:
            part = {}
            for key, value in results.items():
                if ("chips" if key == "embedding" else key) in pending.request.arrays:
                    part[key] = value[offsets[key]:offsets[key] + pending.faces]
                    offsets[key] += pending.faces
            result = InferenceResult(
                id=pending.request.id, embedder=self.embedder_id, sha256=self.sha256, arrays=part,
                batch=batch_faces, infer_ms=elapsed_ms, queued_ms=(started - pending.arrived) * 1000,
                device=self.models.device,
            )
            self._reply(pending.reply_to, result.to_frames())


def inference_main(settings_data: dict[str, Any], endpoint: str, control_endpoint: str | None = None,
                   log_level: int = logging.WARNING, temp_folder: str | None = None) -> None:
    """Process entry point (spawned by the supervisor). A user error (missing model, bad bind address)
    goes to the supervisor as one line, never as a traceback and a restart loop. A supervisor that dies
    without stopping us (SIGKILL) is noticed within a moment; we then close our socket (its ipc file and
    port go with it) and remove the supervisor's `temp_folder`."""
    from streamer.pipeline.worker_base import OrphanGuard, report_fatal

    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s inference: %(message)s", stream=sys.stderr)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when we stop
    guard = OrphanGuard(temp_folder).start()
    try:
        try:
            worker = InferenceWorker(Settings(**settings_data), endpoint)
        except StreamerError as exc:
            report_fatal(control_endpoint, "inference", str(exc))
            sys.exit(2)
        guard.attach(worker.stop)
        signal.signal(signal.SIGTERM, worker.stop)
        log.info("inference worker on %s (device %s)", endpoint, worker.models.device)
        worker.serve()
    finally:
        guard.finish()
