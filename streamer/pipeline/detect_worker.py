"""The detect worker: readers, detection, tracking, which faces need inference, and what the results mean.

One process. One reader thread per source (PyAV releases the GIL while decoding); everything stateful
(trackers, gates, votes) lives on this process's main thread. Chips go to the inference worker over a
DEALER socket; results come back on the same socket and are matched against the gallery here, where the
per-track state is. Events go to the supervisor, which owns the public PUB socket and the seq counter
(so a restarted worker never resets seq).
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import orjson
import zmq

from streamer.config import Settings
from streamer.errors import SourceError, StreamerError
from streamer.infer.attributes import HEADS, attributes_from_arrays, prepare_function
from streamer.pipeline.transport import SocketDefaults, decode, encode, make_socket
from streamer.publish.annotate import FaceLabel
from streamer.publish.output import AnnotatedOutput
from streamer.types import Attributes, Faces, Frame, rounded_box

log = logging.getLogger(__name__)

_HEALTH = {"idle": "connecting", "stopped": "ended"}  # reader states -> heartbeat statuses
REQUEST_TIMEOUT_S = 10.0  # a request unanswered this long is given up (inference worker restarting)
DRAIN_TIMEOUT_S = 10.0


@dataclass
class TrackLabel:
    """What we currently believe about a track, for the annotated output."""

    name: str | None = None
    known: bool = False
    attributes: Attributes | None = None

    def for_drawing(self, track: int) -> FaceLabel:
        attributes = self.attributes or Attributes()
        return FaceLabel(
            track=track,
            name=self.name,
            age=attributes.age,
            gender=attributes.gender.label if attributes.gender else None,
            emotion=attributes.emotion.label if attributes.emotion else None,
            known=self.known,
        )


@dataclass
class StreamState:
    id: str
    source: Any
    tracker: Any
    gate: Any
    voter: Any
    smoother: Any
    labels: dict[int, TrackLabel] = field(default_factory=dict)
    live_tracks: set[int] = field(default_factory=set)
    last_update_emit: dict[int, float] = field(default_factory=dict)
    frames: int = 0
    fps: float = 0.0
    fps_window_start: float = field(default_factory=time.monotonic)
    fps_window_frames: int = 0
    scene_cuts: Any = None
    last_detections: Faces | None = None
    last_tracked: Faces | None = None
    ended: bool = False
    connected_once: bool = False
    first_failure: str | None = None  # why the very first connection attempt failed
    warned_unreachable: bool = False
    last_frame: Frame | None = None


class DetectWorker:
    def __init__(
        self,
        settings: Settings,
        inference_endpoint: str,
        events_endpoint: str,
        *,
        progress: bool = False,
        context: zmq.Context | None = None,
    ) -> None:
        from streamer.detect import create_detector
        from streamer.engine import FaceEngine
        from streamer.infer.embedders import embedder_spec

        self.settings = settings
        self.running = True
        self.progress = progress
        engine = FaceEngine(settings)
        # ByteTrack's second stage needs the low-score detections, so detect down to the tracker's low bar.
        detector_settings = settings.detector.model_copy(
            update={"score_threshold": min(settings.detector.score_threshold, settings.tracker.low_threshold)}
        )
        self.detector = create_detector(detector_settings, engine.registry)
        self.detector.detect(np.zeros((720, 1280, 3), np.uint8))  # first-run setup now, not on frame 1
        self.embedder_spec = embedder_spec(settings.embedder.name, engine.registry, settings.embedder.threshold)
        self.head_specs = {name: prepare_function(name) for name in settings.attributes.enabled}
        self.gallery = None
        self.matcher = None
        if settings.gallery.path is not None:
            from streamer.match.gallery import Gallery
            from streamer.match.matcher import Matcher

            self.gallery = Gallery(Path(settings.gallery.path), create=False, readonly=True)
            self.matcher = Matcher(self.gallery, self.embedder_spec.id, self.embedder_spec.metric, self.embedder_spec.threshold)

        self.context = context or zmq.Context.instance()
        self.requests = make_socket(
            self.context, zmq.DEALER, hwm=SocketDefaults.REQUEST_HWM, connect=inference_endpoint
        )
        self.events = make_socket(self.context, zmq.PUSH, hwm=SocketDefaults.EVENT_HWM, connect=events_endpoint)
        self.output = AnnotatedOutput(settings.output, len(settings.sources))
        self.pending: dict[int, float] = {}  # request id -> sent at
        self.pending_crops: dict[int, list[bytes]] = {}  # request id -> JPEG per face (crops enabled only)
        self.next_request = 1
        self.requests_dropped = 0
        self.faces_sent = 0
        self.streams: list[StreamState] = []
        self.started = time.monotonic()
        self.first_frame_at: float | None = None
        self.last_frame_at: float | None = None
        self.last_heartbeat = time.monotonic()

    # -- lifecycle ------------------------------------------------------------------------------------
    def open_streams(self) -> None:
        from streamer.match.voting import AttributeSmoother, IdentityVoter
        from streamer.sources import open_source
        from streamer.track.bytetrack import ByteTracker
        from streamer.track.gate import InferenceGate
        from streamer.track.scenecut import SceneCutDetector

        for index, source_settings in enumerate(self.settings.sources):
            stream_id = source_settings.id or f"cam{index}"
            source = open_source(source_settings, stream_id, self.settings.reconnect)
            self.streams.append(
                StreamState(
                    id=stream_id,
                    source=source,
                    tracker=ByteTracker.from_settings(self.settings.tracker),
                    gate=InferenceGate.from_settings(self.settings.recognition),
                    voter=IdentityVoter.from_settings(self.settings.recognition),
                    smoother=AttributeSmoother(),
                    scene_cuts=SceneCutDetector(self.settings.tracker.scene_cut_threshold)
                    if self.settings.tracker.scene_cut_threshold > 0
                    else None,
                )
            )
        for stream in self.streams:
            stream.source.start()

    def stop(self, *_: object) -> None:
        self.running = False

    def run(self) -> None:
        try:
            self.open_streams()
            self._loop()
            self._drain()
        finally:
            self._close()

    def _loop(self) -> None:
        while self.running:
            worked = False
            for stream in self.streams:
                self._forward_status(stream)
                if stream.ended:
                    continue
                frame = stream.source.read(timeout=0)
                if frame is not None:
                    self.process(stream, frame)
                    worked = True
                elif stream.source.finished:
                    self._forward_status(stream)
                    self._end_stream(stream)
            self._receive_results(timeout_ms=0 if worked else 5)
            self._expire_requests()
            self._maybe_heartbeat()
            if all(s.ended for s in self.streams):
                break
            self._check_reachable()

    def _check_reachable(self) -> None:
        unreachable = [s for s in self.streams if s.first_failure is not None and not s.connected_once]
        exiting = self.settings.reconnect.exit_if_none_connect and len(unreachable) == len(self.streams)
        for stream in unreachable:
            if not exiting and not stream.warned_unreachable:
                stream.warned_unreachable = True
                log.warning("source %s: cannot connect to %s (%s); retrying", stream.id, stream.source.url,
                            stream.first_failure)
        if exiting and self.streams:
            reasons = "; ".join(f"{s.id} ({s.source.url}): {s.first_failure}" for s in unreachable)
            raise SourceError(
                f"cannot connect to any source: {reasons} "
                "(set reconnect.exit_if_none_connect=false to keep retrying)"
            )

    def _drain(self) -> None:
        """Wait for in-flight inference, then end every track and stream cleanly."""
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while self.pending and time.monotonic() < deadline:
            self._receive_results(timeout_ms=50)
        for stream in self.streams:
            self._forward_status(stream)
            self._end_stream(stream)
        self._send_stats()

    def _close(self) -> None:
        for stream in self.streams:
            stream.source.stop()
        self.output.close()
        self.detector.close()
        if self.gallery is not None:
            self.gallery.close()
        self.requests.close()
        self.events.close(linger=2000)  # let the last events reach the supervisor

    # -- per frame ----------------------------------------------------------------------------------------
    def process(self, stream: StreamState, frame: Frame) -> None:
        previous, stream.last_frame = stream.last_frame, frame
        # With detector.interval > 1 the frames in between are only counted and drawn: tracks keep the
        # boxes of their last detection (the tracker sees every n-th frame as consecutive steps).
        if stream.frames % self.settings.detector.interval == 0:
            if stream.scene_cuts is not None and stream.scene_cuts.is_cut(frame.image):
                # New shot: the faces before the cut are gone, whatever the motion model predicts.
                for info in stream.tracker.flush():
                    self._end_track(stream, info, previous)
            detections = self.detector.detect(frame.image)
            update = stream.tracker.update(detections, frame.index, frame.pts)
            for info in update.started:
                stream.live_tracks.add(info.track_id)
                self._emit("track.started", stream, frame, track=info.track_id, box=rounded_box(info.box))
            for info in update.ended:
                self._end_track(stream, info, frame)
            faces = update.faces
            self._maybe_track_updates(stream, frame, faces)
            rows = stream.gate.select(frame.image, faces, frame.pts)
            if len(rows):
                self._request_inference(stream, frame, faces[rows])
            stream.last_detections, stream.last_tracked = detections, faces
        if self.output.active and stream.last_detections is not None:
            labels = {track: label.for_drawing(track) for track, label in stream.labels.items()}
            if not self.output.render(
                stream.id, frame, stream.last_detections, stream.last_tracked, labels, stream.source.frame_rate
            ):
                self.running = False  # the viewer closed the preview
        self._count_fps(stream)

    def _maybe_track_updates(self, stream: StreamState, frame: Frame, faces: Faces) -> None:
        interval = self.settings.publish.track_update_s
        if interval <= 0:
            return
        for row in range(len(faces)):
            track = int(faces.track_ids[row])
            last = stream.last_update_emit.get(track)
            if last is None:
                stream.last_update_emit[track] = frame.pts  # started just now; no update yet
            elif frame.pts - last >= interval:
                stream.last_update_emit[track] = frame.pts
                self._emit("track.updated", stream, frame, track=track, box=rounded_box(faces.boxes[row]))

    def _end_track(self, stream: StreamState, info: Any, frame: Frame | None) -> None:
        self._emit(
            "track.ended",
            stream,
            frame,
            track=info.track_id,
            box=rounded_box(info.box),
            duration=max(0.0, float(info.duration_s)),
            frames=int(info.frames_seen),
            at_frame=info.last_frame,
            at_pts=info.last_timestamp,
        )
        stream.live_tracks.discard(info.track_id)
        stream.gate.forget([info.track_id])
        stream.voter.forget(info.track_id)
        stream.smoother.forget(info.track_id)
        stream.labels.pop(info.track_id, None)
        stream.last_update_emit.pop(info.track_id, None)

    def _end_stream(self, stream: StreamState) -> None:
        if stream.ended:
            return
        for info in stream.tracker.flush():
            self._end_track(stream, info, stream.last_frame)
        detail = "stopped" if not self.running else "end of input"
        self._emit_raw({"kind": "stream.status", "stream": stream.id, "status": "ended", "detail": detail})
        stream.ended = True

    def _forward_status(self, stream: StreamState) -> None:
        for change in stream.source.poll_status():
            if change.status == "ended":
                continue  # sent by _end_stream after the last tracks have ended
            self._emit_raw(
                {"kind": "stream.status", "stream": stream.id, "status": change.status, "detail": change.detail}
            )
            if change.status in ("connected", "reconnected"):
                stream.connected_once = True
            elif change.status == "lost" and not stream.connected_once and stream.first_failure is None:
                stream.first_failure = change.detail
            if change.status == "lost":
                # A reconnect restarts the stream clock; coasting tracks would never match again.
                for info in stream.tracker.flush():
                    self._end_track(stream, info, stream.last_frame)

    # -- inference ------------------------------------------------------------------------------------------
    def _request_inference(self, stream: StreamState, frame: Frame, faces: Faces) -> None:
        arrays: dict[str, np.ndarray] = {"chips": self.embedder_spec.prepare(frame.image, faces)}
        for name, prepare in self.head_specs.items():
            arrays[name] = prepare(frame.image, faces)
        request_id = self.next_request
        self.next_request += 1
        header = {
            "id": request_id,
            "n": len(faces),
            "stream": stream.id,
            "frame": frame.index,
            "pts": frame.pts,
            "decoded_at": frame.decoded_at,
            "tracks": faces.track_ids.tolist(),
            "boxes": [rounded_box(b) for b in faces.boxes],
        }
        # Live sources must never stall on inference; files wait (backpressure) so no face is skipped.
        flags = zmq.NOBLOCK if stream.source.live else 0
        try:
            self.requests.send_multipart(encode(header, arrays), flags=flags, copy=False)
        except zmq.Again:
            self.requests_dropped += 1
            return
        self.pending[request_id] = time.monotonic()
        self.faces_sent += len(faces)
        if self.settings.publish.include_crops:
            self.pending_crops[request_id] = [_jpeg_crop(frame.image, box) for box in faces.boxes]

    def _receive_results(self, timeout_ms: int) -> None:
        if not self.requests.poll(timeout_ms, zmq.POLLIN):
            return
        while True:
            try:
                frames = self.requests.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            message = decode(frames)
            crops = self.pending_crops.pop(message.header["id"], None)
            if self.pending.pop(message.header["id"], None) is None:
                continue  # given up on already
            self._handle_result(message.header, message.arrays, crops)

    def _expire_requests(self) -> None:
        now = time.monotonic()
        for request_id, sent in list(self.pending.items()):
            if now - sent > REQUEST_TIMEOUT_S:
                del self.pending[request_id]
                self.pending_crops.pop(request_id, None)
                log.warning("inference request %d timed out (is the inference worker running?)", request_id)

    def _handle_result(
        self, header: dict[str, Any], arrays: dict[str, np.ndarray], crops: list[bytes] | None = None
    ) -> None:
        stream = next((s for s in self.streams if s.id == header["stream"]), None)
        if stream is None:
            return
        tracks = header["tracks"]
        matches = None
        if "embedding" in arrays and self.matcher is not None:
            matches = self.matcher.match(arrays["embedding"])
        attributes = (
            attributes_from_arrays(len(tracks), arrays) if any(h in arrays for h in HEADS) else None
        )
        for row, track in enumerate(tracks):
            if track not in stream.live_tracks:
                continue  # ended while its faces were in flight: its per-track state is gone, keep it so
            label = stream.labels.setdefault(track, TrackLabel())
            fields = {
                "track": track,
                "box": header["boxes"][row],
                "frame": header["frame"],
                "pts": header["pts"],
            }
            if "embedding" in arrays:
                if matches is not None:
                    match = matches[row]
                    name, distance, score = match.name, match.distance, match.score
                else:  # no gallery: every face is unknown, by definition
                    name, distance, score = None, float("inf"), 0.0
                log.debug("%s track %d frame %d: %s at distance %.3f", stream.id, track, header["frame"], name, distance)
                announcement = stream.voter.add(track, name, score)
                if announcement is not None:
                    label.name = announcement.name
                    label.known = announcement.name is not None
                    votes = dict(announcement.votes)
                    if announcement.unknown_votes:
                        votes["unknown"] = announcement.unknown_votes
                    extra = {}
                    if self.settings.publish.include_embeddings:
                        extra["embedding"] = [float(v) for v in arrays["embedding"][row]]
                    self._emit_raw(
                        {
                            "kind": "identity",
                            "stream": stream.id,
                            **fields,
                            "name": announcement.name,
                            "score": round(float(announcement.score), 4),
                            "distance": _finite(distance),
                            "votes": votes,
                            **extra,
                        },
                        decoded_at=header["decoded_at"],
                        crop=crops[row] if crops else None,
                    )
            if attributes is not None:
                smoothed = stream.smoother.add(track, attributes[row])
                label.attributes = smoothed
                self._emit_raw(
                    {"kind": "attributes", "stream": stream.id, **fields, **smoothed.as_dict()},
                    decoded_at=header["decoded_at"],
                )

    # -- output ----------------------------------------------------------------------------------------------
    # -- events -------------------------------------------------------------------------------------------------
    def _emit(
        self,
        kind: str,
        stream: StreamState,
        frame: Frame | None,
        *,
        at_frame: int | None = None,  # when the event is about an earlier frame (a track's last sighting)
        at_pts: float | None = None,
        **fields: Any,
    ) -> None:
        payload = {
            "kind": kind,
            "stream": stream.id,
            "frame": at_frame if at_frame is not None else (frame.index if frame else 0),
            "pts": at_pts if at_pts is not None else (frame.pts if frame else 0.0),
            **fields,
        }
        self._emit_raw(payload, decoded_at=frame.decoded_at if frame is not None else None)

    def _emit_raw(self, payload: dict[str, Any], decoded_at: float | None = None, crop: bytes | None = None) -> None:
        if decoded_at is not None:
            payload["_decoded_at"] = decoded_at
        frames = [orjson.dumps(payload)] if crop is None else [orjson.dumps(payload), crop]
        try:
            self.events.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            log.warning("event dropped: supervisor not reading")

    def _count_fps(self, stream: StreamState) -> None:
        self.last_frame_at = time.monotonic()
        if self.first_frame_at is None:
            self.first_frame_at = self.last_frame_at
        stream.frames += 1
        stream.fps_window_frames += 1
        now = time.monotonic()
        if now - stream.fps_window_start >= 1.0:
            stream.fps = stream.fps_window_frames / (now - stream.fps_window_start)
            stream.fps_window_start, stream.fps_window_frames = now, 0

    def _maybe_heartbeat(self) -> None:
        now = time.monotonic()
        if now - self.last_heartbeat >= min(1.0, self.settings.publish.heartbeat_s):
            self.last_heartbeat = now
            self._send_stats()

    def _send_stats(self) -> None:
        streams = {}
        for stream in self.streams:
            stats = stream.source.stats
            fps = stream.fps
            window = time.monotonic() - stream.fps_window_start
            if not fps and stream.fps_window_frames and window > 0.2:  # before the first full window
                fps = stream.fps_window_frames / window
            streams[stream.id] = {
                "fps": round(fps, 2),
                "frames": stream.frames,
                "dropped": int(stats.dropped),
                "status": "ended" if stream.ended else _HEALTH.get(stats.status, stats.status),
                "reconnects": int(stats.reconnects),
                "total_frames": stream.source.total_frames,
            }
        self._emit_raw(
            {
                "kind": "_stats",
                "streams": streams,
                "queues": {"inference_pending": len(self.pending), "inference_dropped": self.requests_dropped},
                "faces_sent": self.faces_sent,
                "first_frame_at": self.first_frame_at,
                "last_frame_at": self.last_frame_at,
            }
        )


def _jpeg_crop(image: np.ndarray, box: np.ndarray, margin: float = 0.2) -> bytes:
    x1, y1, x2, y2 = box
    mx, my = (x2 - x1) * margin, (y2 - y1) * margin
    h, w = image.shape[:2]
    left, top = int(max(0, x1 - mx)), int(max(0, y1 - my))
    right, bottom = int(min(w, x2 + mx)), int(min(h, y2 + my))
    crop = image[top:max(bottom, top + 1), left:max(right, left + 1)]
    return cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes()


def _finite(value: float) -> float | None:
    return round(float(value), 6) if np.isfinite(value) else None


def detect_main(
    settings_data: dict[str, Any],
    inference_endpoint: str,
    events_endpoint: str,
    progress: bool = False,
    log_level: int = logging.WARNING,
) -> None:
    """Process entry point (spawned by the supervisor)."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s detect: %(message)s", stream=sys.stderr)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor turns Ctrl-C into SIGTERM for us
    try:
        worker = DetectWorker(Settings(**settings_data), inference_endpoint, events_endpoint, progress=progress)
        signal.signal(signal.SIGTERM, worker.stop)
        worker.run()
    except StreamerError as exc:
        # A user error (missing file, bad gallery, missing model): tell the supervisor, which prints one
        # line and exits non-zero instead of restarting us forever.
        _report_fatal(events_endpoint, str(exc))
        sys.exit(2)


def _report_fatal(events_endpoint: str, message: str) -> None:
    socket = make_socket(zmq.Context.instance(), zmq.PUSH, hwm=10, connect=events_endpoint)
    socket.send(orjson.dumps({"kind": "_fatal", "message": message}))
    socket.close(linger=2000)
