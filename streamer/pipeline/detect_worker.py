"""The detect worker: the loop that wires sources, per-stream processors, the inference client and the
track recognisers together, and hands their events to the supervisor.

One process. One reader thread per source (PyAV releases the GIL while decoding); everything stateful
lives on this process's main thread. The supervisor owns the public socket and `seq`, so a restarted
worker never resets it; it passes `first_track_ids` so track ids are never reused within a run.

The inference client's health changes become `pipeline.status` events (inference down/up, with why), and
its state rides on every stats message for the heartbeat. A supervisor that is gone (SIGKILL) stops
the worker at once, without a drain: there is nobody left to publish to (`worker_base.OrphanGuard`).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import zmq

from streamer.config import Settings
from streamer.errors import StreamerError
from streamer.pipeline.inference_client import InferenceClient
from streamer.pipeline.messages import WorkerStats, control_frames, event_frames
from streamer.pipeline.metrics import BATCH_FACES, DETECT_SECONDS, INFERENCE_SECONDS, Buckets
from streamer.match.matcher import open_matcher
from streamer.pipeline.slot import StreamSlot
from streamer.publish.events import Event, PipelineStatus
from streamer.publish.output import AnnotatedOutput, face_labels
from streamer.sockets import SocketDefaults, SocketKind, make_socket

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 10.0


class DetectWorker:
    def __init__(self, settings: Settings, inference_endpoint: str, events_endpoint: str, control_endpoint: str,
                 *, first_track_ids: Mapping[str, int] | None = None, context: zmq.Context | None = None) -> None:
        from streamer.infer.chips import ChipPreparer
        from streamer.models.factory import ModelFactory

        self.settings = settings
        self.running = True
        self.orphaned = False
        models = ModelFactory(settings)
        self.histograms = {
            "detect_seconds": Buckets(DETECT_SECONDS),
            "inference_seconds": Buckets(INFERENCE_SECONDS),
            "batch_faces": Buckets(BATCH_FACES),
            "batch_seconds": Buckets(INFERENCE_SECONDS),
        }
        detector = models.detector(for_tracking=True)
        detector.detect(np.zeros((720, 1280, 3), np.uint8))  # first-run setup now, not on frame 1 (nor timed)
        self.detector = _TimedDetector(detector, self.histograms["detect_seconds"])
        spec = models.embedder_spec
        self.chips = ChipPreparer(spec, settings.attributes.enabled)
        self.gallery, self.matcher = open_matcher(settings.gallery.path, spec)
        context = context or zmq.Context.instance()
        self.client = InferenceClient.from_settings(settings, models, inference_endpoint, context=context)
        self.events = make_socket(context, SocketKind.PUSH, hwm=SocketDefaults.EVENT_HWM, connect=events_endpoint)
        self.control = make_socket(context, SocketKind.PUSH, hwm=SocketDefaults.EVENT_HWM, connect=control_endpoint)
        sources = {source.id or f"cam{i}": source.url for i, source in enumerate(settings.sources)}
        self.output = AnnotatedOutput(settings.output, len(settings.sources), sources)  # sources: audio to copy
        self.first_track_ids = dict(first_track_ids or {})
        self.slots: list[StreamSlot] = []
        self.first_frame_at: float | None = None
        self.last_frame_at: float | None = None
        self.last_stats = 0.0
        self.gallery_stale = False

    def stop(self, *_: object) -> None:
        self.running = False

    def orphan(self) -> None:
        """The supervisor is gone: stop decoding now; nothing more is sent."""
        self.orphaned = True
        self.running = False

    def run(self) -> None:
        try:
            self._open_streams()
            while self.running and not all(slot.ended for slot in self.slots):
                self._turn()
            if not self.orphaned:
                self._drain()
        finally:
            self._close()

    def _open_streams(self) -> None:
        from streamer.match.recogniser import TrackRecogniser
        from streamer.sources import open_source
        from streamer.track.processor import StreamProcessor

        for index, source_settings in enumerate(self.settings.sources):
            stream = source_settings.id or f"cam{index}"
            processor = StreamProcessor.from_settings(stream, self.settings, self.detector, self.chips.prepare,
                                                      first_track_id=self.first_track_ids.get(stream, 1))
            recogniser = TrackRecogniser.from_settings(stream, self.settings, self.matcher)
            self.slots.append(StreamSlot(open_source(source_settings, stream, self.settings.reconnect), processor,
                                         recogniser))
        for slot in self.slots:
            slot.source.start()

    def _turn(self) -> None:
        worked = False
        for slot in self.slots:
            self._send(slot.status_events())
            if slot.ended:
                continue
            frame = slot.source.read(timeout=0)
            if frame is not None:
                self._process(slot, frame)
                worked = True
            elif slot.source.finished:
                self._send(slot.end(stopped=False))
        self._results(timeout_ms=0 if worked else 5)
        self.client.expire()
        self._check_inference()
        self._check_gallery()
        if time.monotonic() - self.last_stats >= min(1.0, self.settings.publish.heartbeat_s):
            self._send_stats()
        self._check_reachable()

    def _process(self, slot: StreamSlot, frame: Any) -> None:
        self.first_frame_at = self.first_frame_at or time.monotonic()  # the bench's window starts at the read
        step = slot.processor.process(frame)
        self._send(slot.apply(step), frame.decoded_at)
        if step.chips is not None:
            self.client.submit(step.chips, frame.image, live=slot.source.live)
        if self.output.active and slot.processor.last_detections is not None:
            tracked = slot.processor.last_tracked
            if not self.output.render(slot.id, frame, slot.processor.last_detections, tracked,
                                      face_labels(slot.recogniser.tracks), slot.source.frame_rate):
                self.running = False  # the viewer closed the preview
        self.last_frame_at = now = time.monotonic()
        slot.fps.tick(now)

    def _results(self, timeout_ms: int) -> None:
        for answered in self.client.receive(timeout_ms):
            # Seen from this client, so a remote inference worker is measured too (it has no control channel
            # to our supervisor); a batch shared by several requests is observed once per request.
            self.histograms["inference_seconds"].observe(answered.waited_s)
            self.histograms["batch_faces"].observe(answered.result.batch)
            self.histograms["batch_seconds"].observe(answered.result.infer_ms / 1000)
            slot = next((s for s in self.slots if s.id == answered.batch.stream), None)
            if slot is None:
                continue
            for event, crop in slot.recogniser.on_results(answered.batch, answered.result.arrays, answered.crops):
                self._send([event], answered.batch.decoded_at, crop)

    def _check_inference(self) -> None:
        for change in self.client.poll_health():
            self._send([PipelineStatus(inference=change.status, detail=change.detail)])

    def _check_gallery(self) -> None:
        """A gallery that became unreadable (locked, swapped for something else) or readable again: the
        matcher goes on with its last good copy; subscribers are told both ways."""
        if self.matcher is None:
            return
        status = self.matcher.status
        if status.stale == self.gallery_stale:
            return
        self.gallery_stale = status.stale
        if status.stale:
            detail = f"{status.error}; matching with the copy of {status.people} people loaded before"
        else:
            detail = f"readable again: {status.people} people, {status.faces} faces"
        self._send([PipelineStatus(gallery="stale" if status.stale else "ok", detail=detail[:2000])])

    def _check_reachable(self) -> None:
        from streamer.pipeline.slot import check_reachable

        check_reachable(self.slots, exit_if_none_connect=self.settings.reconnect.exit_if_none_connect)

    def _drain(self) -> None:
        """Wait for in-flight inference, then end every track and stream cleanly."""
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while self.client.pending and time.monotonic() < deadline:
            self._results(timeout_ms=50)
            self._check_inference()  # a worker that is down ends the wait
        client = self.client
        if self.running and client.faces_sent + client.faces_dropped:
            # The input ended: a worker that never answered is down, with why, not still "starting".
            for change in client.give_up():
                self._send([PipelineStatus(inference=change.status, detail=change.detail)])
        for slot in self.slots:
            self._send(slot.end(stopped=not self.running))
        self._send_stats()

    def _close(self) -> None:
        for slot in self.slots:
            slot.source.stop()
        self.output.close()
        self.detector.close()
        if self.matcher is not None:
            self.matcher.close()  # its reload thread first, then the file
        if self.gallery is not None:
            self.gallery.close()
        self.client.close()
        linger = 0 if self.orphaned else 2000  # let the last events reach the supervisor, if there is one
        self.events.close(linger=linger)
        self.control.close(linger=linger)

    def _send(self, events: list[Event], decoded_at: float | None = None, crop: bytes | None = None) -> None:
        for event in events:
            try:
                self.events.send_multipart(event_frames(event, decoded_at, crop), zmq.NOBLOCK)
            except zmq.Again:
                log.warning("event dropped: supervisor not reading")

    def _send_stats(self) -> None:
        now = self.last_stats = time.monotonic()
        client = self.client
        stats = WorkerStats(
            worker="detect",
            streams={slot.id: slot.stats(now) for slot in self.slots},
            queues={"inference_pending": client.pending, "inference_dropped": client.dropped,
                    "inference_expired": client.expired},
            faces_sent=client.faces_sent,
            faces_embedded=client.faces_embedded,
            faces_dropped=client.faces_dropped,
            inference=client.health,
            inference_detail=client.health_detail,
            inference_ever_up=client.ever_up,
            first_frame_at=self.first_frame_at,
            last_frame_at=self.last_frame_at,
            pid=os.getpid(),
            histograms={name: buckets.snapshot() for name, buckets in self.histograms.items()},
        )
        try:
            self.control.send_multipart(control_frames(stats), zmq.NOBLOCK)
        except zmq.Again:
            pass  # the next one carries the same totals


class _TimedDetector:
    """The detector, each call timed into streamer_detection_seconds; everything else passes through."""

    def __init__(self, detector: Any, buckets: Buckets) -> None:
        self._detector = detector
        self._buckets = buckets

    def detect(self, image: np.ndarray) -> Any:
        started = time.perf_counter()
        try:
            return self._detector.detect(image)
        finally:
            self._buckets.observe(time.perf_counter() - started)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._detector, name)


def detect_main(settings_data: dict[str, Any], inference_endpoint: str, events_endpoint: str, control_endpoint: str,
                first_track_ids: dict[str, int], log_level: int = logging.WARNING,
                temp_folder: str | None = None) -> None:
    """Process entry point (spawned by the supervisor). `temp_folder` is the supervisor's, removed by us
    if it dies without cleaning up."""
    from streamer.pipeline.worker_base import OrphanGuard, report_fatal

    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s detect: %(message)s", stream=sys.stderr)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor turns Ctrl-C into SIGTERM for us
    # Armed before the models load: a supervisor killed meanwhile must not leave us behind either.
    guard = OrphanGuard(temp_folder).start()
    try:
        worker = DetectWorker(Settings(**settings_data), inference_endpoint, events_endpoint, control_endpoint,
                              first_track_ids=first_track_ids)
        guard.attach(worker.orphan)
        signal.signal(signal.SIGTERM, worker.stop)
        worker.run()
    except StreamerError as exc:
        # A user error (missing file, bad gallery, other models on the inference worker): the supervisor
        # prints one line and exits non-zero instead of restarting us forever.
        if not guard.orphaned.is_set():
            report_fatal(control_endpoint, "detect", str(exc))
            sys.exit(2)
    finally:
        guard.finish()
