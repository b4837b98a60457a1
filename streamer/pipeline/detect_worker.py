"""The detect worker: the loop that wires sources, per-stream processors, the inference client and the
track recognisers together, and hands their events to the supervisor.

One process per shard of the streams (`pipeline.detect_workers`: the supervisor deals them out, each
worker knows only its own). One reader thread per source (PyAV releases the GIL while decoding);
everything stateful lives on this process's main thread. The supervisor owns the public socket and `seq`, so a restarted
worker never resets it; it passes `first_track_ids` so track ids are never reused within a run.

The inference client's health changes become `pipeline.status` events (inference down/up, with why), and
its state rides on every stats message for the heartbeat. A supervisor that is gone (SIGKILL) stops
the worker at once, without a drain: there is nobody left to publish to (`worker_base.OrphanGuard`).

For `streamer serve` the supervisor also sends commands (`messages.Watch`, `AddSource`, `RemoveSource`,
`SetCrops`): sources are opened and closed at run time, and the streams someone watches get annotated
JPEG tiles on the frames channel (`streamer.pipeline.live`). With `keep_running` the worker idles
without sources instead of exiting when the last one ends.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import zmq

from streamer.config import Settings, SourceSettings
from streamer.errors import SourceError, StreamerError
from streamer.logutil import RateLimitedLog
from streamer.match.matcher import open_matcher
from streamer.pipeline.inference_client import InferenceClient
from streamer.pipeline.live import LiveRenderer
from streamer.pipeline.messages import (
    AddSource,
    DetectOptions,
    LiveFrameMeta,
    RemoveSource,
    SetCrops,
    Watch,
    WorkerStats,
    control_frames,
    event_frames,
    live_frame_frames,
    parse_command,
)
from streamer.pipeline.metrics import (
    BATCH_FACES,
    DETECT_SECONDS,
    INFERENCE_SECONDS,
    Buckets,
)
from streamer.pipeline.slot import StreamSlot
from streamer.publish.events import Event, PipelineStatus, StreamStatus
from streamer.publish.output import AnnotatedOutput, face_labels
from streamer.sockets import SocketDefaults, SocketKind, make_socket

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 10.0
# How long a track's end waits for its faces still at inference (streamer.pipeline.slot): past the p95 of
# identity events under load (about 1.6 s on 2 busy cores with 5 streams), short enough that a dead worker
# delays track.ended by little.
HOLD_ENDED_S = 3.0
LIVE_HWM = 2  # tiles queued for the supervisor: a newer one is worth more than an old one waiting
COMMANDS_PER_TURN = 64  # commands applied between two frames, so a flood cannot stall the streams


class DetectWorker:
    def __init__(self, settings: Settings, inference_endpoint: str, events_endpoint: str, control_endpoint: str,
                 *, first_track_ids: Mapping[str, int] | None = None, context: zmq.Context | None = None,
                 options: DetectOptions | None = None) -> None:
        from streamer.infer.chips import ChipPreparer
        from streamer.models.factory import ModelFactory

        self.settings = settings
        self.options = options = options or DetectOptions()
        self.keep_running = options.keep_running
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
        self.gallery, self.matcher = open_matcher(settings.gallery, spec)
        context = context or zmq.Context.instance()
        self.client = InferenceClient.from_settings(settings, models, inference_endpoint, context=context,
                                                    crops=options.crops)
        self.events = make_socket(context, SocketKind.PUSH, hwm=SocketDefaults.EVENT_HWM, connect=events_endpoint)
        self.control = make_socket(context, SocketKind.PUSH, hwm=SocketDefaults.EVENT_HWM, connect=control_endpoint)
        self.commands = self.frames = None
        if options.commands_endpoint is not None:
            self.commands = make_socket(context, SocketKind.PULL, hwm=SocketDefaults.EVENT_HWM,
                                        connect=options.commands_endpoint, max_message_bytes=1 << 20)
        if options.frames_endpoint is not None:
            self.frames = make_socket(context, SocketKind.PUSH, hwm=LIVE_HWM, connect=options.frames_endpoint)
        serve = settings.serve
        self.renderer = LiveRenderer(serve.live_fps, serve.live_max_width, settings.output.blur_unknown)
        self.watches: dict[str, float] = {}  # stream -> time.monotonic() when its watch expires
        self.live_dropped = 0  # tiles the supervisor had no room for
        self._log = RateLimitedLog(log)
        sources = {source.id or f"cam{i}": source.url for i, source in enumerate(settings.sources)}
        count = len(settings.sources) if options.stream_count is None else options.stream_count
        self.output = AnnotatedOutput(settings.output, count, sources)  # sources: audio to copy
        self.first_track_ids = dict(first_track_ids or {})
        self.slots: list[StreamSlot] = []
        self.first_frame_at: float | None = None
        self.last_frame_at: float | None = None
        self.last_stats = 0.0
        self.gallery_stale = False
        self.pid = os.getpid()  # on every event: the supervisor tells its detect workers apart

    def stop(self, *_: object) -> None:
        self.running = False

    def orphan(self) -> None:
        """The supervisor is gone: stop decoding now; nothing more is sent."""
        self.orphaned = True
        self.running = False

    def run(self) -> None:
        try:
            self._open_streams()
            while self.running and (self.keep_running or not all(slot.ended for slot in self.slots)):
                self._turn()
            if not self.orphaned:
                self._drain()
        finally:
            self._close()

    def _open_streams(self) -> None:
        for index, source_settings in enumerate(self.settings.sources):
            stream = source_settings.id or f"cam{index}"
            if not self.keep_running:
                self.slots.append(self._new_slot(source_settings, stream, self.first_track_ids.get(stream, 1)))
                continue
            # Serving: one bad source is that stream's end, not the console's.
            try:
                self.slots.append(self._new_slot(source_settings, stream, self.first_track_ids.get(stream, 1)))
            except SourceError as exc:
                self._send([StreamStatus(stream=stream, status="ended", detail=str(exc)[:2000])])
        started = []
        for slot in self.slots:
            if not self.keep_running:
                slot.source.start()
                continue
            try:
                slot.source.start()
                started.append(slot)
            except SourceError as exc:
                self._send([StreamStatus(stream=slot.id, status="ended", detail=str(exc)[:2000])])
        if self.keep_running:
            self.slots = started

    def _new_slot(self, source_settings: SourceSettings, stream: str, first_track_id: int) -> StreamSlot:
        from streamer.match.recogniser import TrackRecogniser
        from streamer.sources import open_source
        from streamer.track.processor import StreamProcessor

        processor = StreamProcessor.from_settings(stream, self.settings, self.detector, self.chips.prepare,
                                                  first_track_id=first_track_id)
        recogniser = TrackRecogniser.from_settings(stream, self.settings, self.matcher)
        return StreamSlot(open_source(source_settings, stream, self.settings.reconnect), processor, recogniser)

    # -- commands (streamer serve) ---------------------------------------------------------------------------
    def _commands(self) -> None:
        if self.commands is None:
            return
        for _ in range(COMMANDS_PER_TURN):
            try:
                frames = self.commands.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                command = parse_command(frames)
            except ValueError as exc:  # another process sent it: refuse it, keep going
                self._log.warning("command", "refusing an invalid command: %s", exc)
                continue
            if isinstance(command, Watch):
                self._watch(command)
            elif isinstance(command, AddSource):
                self._add_source(command)
            elif isinstance(command, RemoveSource):
                self._remove_source(command.stream)
            elif isinstance(command, SetCrops):
                self.client.include_crops = command.on or self.settings.publish.include_crops
        now = time.monotonic()
        for stream in [s for s, until in self.watches.items() if until <= now]:
            del self.watches[stream]  # not renewed: the viewer (or the supervisor) is gone
            self.renderer.forget(stream)

    def _watch(self, command: Watch) -> None:
        if not command.active:
            self.watches.pop(command.stream, None)
            self.renderer.forget(command.stream)
        elif any(slot.id == command.stream for slot in self.slots):  # bounded by the slots
            self.watches[command.stream] = time.monotonic() + command.ttl_s

    def _add_source(self, command: AddSource) -> None:
        stream = command.source.id
        assert stream is not None  # AddSource validates it
        if any(slot.id == stream for slot in self.slots):
            return  # a restarted worker got it with its arguments already
        first = max(command.first_track_id, self.first_track_ids.get(stream, 1))
        try:
            slot = self._new_slot(command.source, stream, first)
            slot.source.start()
        except SourceError as exc:
            self._send([StreamStatus(stream=stream, status="ended", detail=str(exc)[:2000])])
            return
        self.slots.append(slot)
        log.info("source %s added: %s", stream, command.source.url)

    def _remove_source(self, stream: str) -> None:
        slot = next((s for s in self.slots if s.id == stream), None)
        if slot is None:
            return  # never opened, or removed already
        self._send(slot.end(stopped=True, detail="removed"))
        self.slots.remove(slot)
        self.first_track_ids[stream] = slot.processor.next_track_id  # the same id added again goes on counting
        self.watches.pop(stream, None)
        self.renderer.forget(stream)
        # A network source's reader can take its timeouts to notice the stop: never on this thread.
        threading.Thread(target=slot.source.stop, name=f"stop-{stream}", daemon=True).start()
        log.info("source %s removed", stream)

    def _live(self, slot: StreamSlot, frame: Any) -> None:
        """A tile of this frame for the supervisor, when someone watches and one is due."""
        if self.frames is None or slot.id not in self.watches or not self.renderer.due(slot.id):
            return
        detections = slot.processor.last_detections
        labels = [] if detections is None else self.output.labels(detections, slot.processor.last_tracked,
                                                                     face_labels(slot.recogniser.tracks))
        jpeg = self.renderer.render(frame.image, detections, labels)
        meta = LiveFrameMeta(stream=slot.id, frame=frame.index, pts=frame.pts, decoded_at=frame.decoded_at,
                             encoded_at=time.monotonic())
        try:
            self.frames.send_multipart(live_frame_frames(meta, jpeg), zmq.NOBLOCK)
            slot.live_frames += 1
        except zmq.Again:
            self.live_dropped += 1

    def _turn(self) -> None:
        worked = False
        self._commands()
        for slot in self.slots:
            self._send(slot.status_events())
            if slot.ended or slot.ending:
                continue
            frame = slot.source.read(timeout=0)
            if frame is not None:
                self._process(slot, frame)
                worked = True
            elif slot.source.finished:
                # Held: names of its last tracks still at inference are published before the stream ends.
                self._send(slot.end(stopped=False, hold=True))
        # Idle without sources (serving, none added yet): wake less often; a command waits at most that long.
        self._results(timeout_ms=0 if worked else 5 if self.slots else 50)
        self.client.expire()
        now = time.monotonic()
        for slot in self.slots:
            self._send(slot.release_overdue(now, HOLD_ENDED_S))
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
            if self.client.submit(step.chips, frame.image, live=slot.source.live):
                slot.submitted(step.chips.tracks)
        if self.output.active and slot.processor.last_detections is not None:
            tracked = slot.processor.last_tracked
            if not self.output.render(slot.id, frame, slot.processor.last_detections, tracked,
                                      face_labels(slot.recogniser.tracks), slot.source.frame_rate):
                self.running = False  # the viewer closed the preview
        if self.watches:
            self._live(slot, frame)
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
            self._send(slot.answered(answered.batch.tracks))

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

        # Serving, sources come and go over the API: a wrong address is that stream's problem, shown on it.
        check_reachable(self.slots, exit_if_none_connect=self.settings.reconnect.exit_if_none_connect
                        and not self.keep_running)

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
        for socket in (self.commands, self.frames):
            if socket is not None:
                socket.close(linger=0)

    def _send(self, events: list[Event], decoded_at: float | None = None, crop: bytes | None = None) -> None:
        for event in events:
            try:
                self.events.send_multipart(event_frames(event, decoded_at, crop, self.pid), zmq.NOBLOCK)
            except zmq.Again:
                log.warning("event dropped: supervisor not reading")

    def _send_stats(self) -> None:
        now = self.last_stats = time.monotonic()
        client = self.client
        stats = WorkerStats(
            worker="detect",
            streams={slot.id: slot.stats(now) for slot in self.slots},
            queues={"inference_pending": client.pending, "inference_dropped": client.dropped,
                    "inference_expired": client.expired, "live_dropped": self.live_dropped},
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
        return self._timed(self._detector.detect, image)

    def detect_regions(self, image: np.ndarray, regions: np.ndarray) -> Any:
        return self._timed(self._detector.detect_regions, image, regions)

    def _timed(self, call: Any, *args: Any) -> Any:
        started = time.perf_counter()
        try:
            return call(*args)
        finally:
            self._buckets.observe(time.perf_counter() - started)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._detector, name)


def detect_main(settings_data: dict[str, Any], inference_endpoint: str, events_endpoint: str, control_endpoint: str,
                first_track_ids: dict[str, int], log_level: int = logging.WARNING,
                temp_folder: str | None = None, options: dict[str, Any] | None = None) -> None:
    """Process entry point (spawned by the supervisor). `temp_folder` is the supervisor's, removed by us
    if it dies without cleaning up; `options`: a DetectOptions as a dict."""
    from streamer.pipeline.worker_base import OrphanGuard, report_fatal

    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s detect: %(message)s", stream=sys.stderr)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor turns Ctrl-C into SIGTERM for us
    # Armed before the models load: a supervisor killed meanwhile must not leave us behind either.
    guard = OrphanGuard(temp_folder).start()
    try:
        worker = DetectWorker(Settings(**settings_data), inference_endpoint, events_endpoint, control_endpoint,
                              first_track_ids=first_track_ids, options=DetectOptions(**(options or {})))
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
