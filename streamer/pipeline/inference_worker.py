"""The inference worker: batched embedder + attribute heads on the onnxruntime provider that really loaded.

It binds a ROUTER socket; any number of detect workers (DEALER) send requests of prepared chips and get
their results back by identity. One session per model, created once; one `session.run` per model per batch.
"""

from __future__ import annotations

import logging
import signal
import time
from typing import Any

import numpy as np
import zmq

from streamer.config import Settings
from streamer.errors import ConfigError
from streamer.pipeline.batching import DynamicBatcher, PendingRequest, concat
from streamer.pipeline.transport import SocketDefaults, decode, encode, make_socket

log = logging.getLogger(__name__)


class InferenceModels:
    """The embedder and the enabled attribute heads, loaded once, run on whole batches."""

    def __init__(self, settings: Settings) -> None:
        from streamer.engine import FaceEngine

        engine = FaceEngine(settings)
        self.embedder = engine.embedder
        self.heads = {name: engine.head(name) for name in settings.attributes.enabled}
        self.device = self.embedder.model.device
        self._warm_up()

    def _warm_up(self) -> None:
        """First runs allocate and plan; do them now, not on the first real faces (latency)."""
        from streamer.infer.attributes import prepare_function
        from streamer.types import Faces

        image = np.zeros((160, 160, 3), np.uint8)
        faces = Faces(
            boxes=[[40, 40, 120, 120]],
            scores=[1.0],
            landmarks=[[[60, 70], [100, 70], [80, 90], [65, 105], [95, 105]]],
        )
        self.embedder.embed(self.embedder.spec.prepare(image, faces))
        for name, head in self.heads.items():
            head.predict_arrays(prepare_function(name)(image, faces))

    def run(self, chips: np.ndarray | None, crops: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        if chips is not None:
            out["embedding"] = self.embedder.embed(chips).astype(np.float32, copy=False)
        for name, head in self.heads.items():
            if name in crops:
                out.update(head.predict_arrays(crops[name]))
        return out


def split_results(requests: list[PendingRequest], results: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    parts: list[dict[str, np.ndarray]] = []
    start = 0
    for request in requests:
        stop = start + request.faces
        parts.append({key: value[start:stop] for key, value in results.items()})
        start = stop
    return parts


class InferenceWorker:
    def __init__(self, settings: Settings, endpoint: str, models: Any | None = None) -> None:
        self.settings = settings
        self.endpoint = endpoint
        self.models = models or InferenceModels(settings)
        self.batcher = DynamicBatcher(settings.inference.max_batch, settings.inference.max_wait_ms / 1000)
        self.context = zmq.Context.instance()
        try:
            self.socket = make_socket(self.context, zmq.ROUTER, hwm=SocketDefaults.RESULT_HWM, bind=endpoint)
        except zmq.ZMQError as exc:
            raise ConfigError(f"inference.endpoint: cannot bind {endpoint!r}: {exc.strerror}") from None
        self.running = True
        self.batches = 0
        self.faces = 0

    def stop(self, *_: object) -> None:
        self.running = False

    def serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        try:
            while self.running:
                wait = self.batcher.seconds_until_due()
                timeout_ms = 100 if wait is None else max(0, int(wait * 1000))
                if poller.poll(timeout_ms):
                    self._receive_all()
                while self.batcher.due():
                    self._run_batch(self.batcher.take())
        finally:
            self.socket.close()

    def _receive_all(self) -> None:
        while True:
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            identity, body = frames[0].bytes, frames[1:]
            try:
                message = decode(body)
            except (ValueError, KeyError) as exc:
                log.warning("dropped a malformed inference request: %s", exc)
                continue
            self.batcher.add(PendingRequest(identity, message.header, dict(message.arrays)))

    def _run_batch(self, requests: list[PendingRequest]) -> None:
        started = time.monotonic()
        chips = concat(requests, "chips")
        crops = {name: array for name in ("age", "gender", "emotion") if (array := concat(requests, name)) is not None}
        results = self.models.run(chips, crops)
        elapsed_ms = (time.monotonic() - started) * 1000
        batch_faces = sum(r.faces for r in requests)
        self.batches += 1
        self.faces += batch_faces
        for request, part in zip(requests, split_results(requests, results)):
            header = {
                **request.header,
                "batch": batch_faces,
                "infer_ms": round(elapsed_ms, 2),
                "queued_ms": round((started - request.arrived) * 1000, 2),
                "device": self.models.device,
            }
            try:
                self.socket.send_multipart([request.reply_to, *encode(header, part)], zmq.NOBLOCK)
            except zmq.Again:
                log.warning("result for %s dropped: detect worker not reading", request.header.get("stream"))


def inference_main(settings_data: dict[str, Any], endpoint: str, log_level: int = logging.WARNING) -> None:
    """Process entry point (spawned by the supervisor)."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s inference: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when we stop
    settings = Settings(**settings_data)
    worker = InferenceWorker(settings, endpoint)
    signal.signal(signal.SIGTERM, worker.stop)
    log.info("inference worker on %s (device %s)", endpoint, worker.models.device)
    worker.serve()
