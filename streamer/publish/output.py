"""What people watch: the annotated video file per stream and the preview window.

Faces of confirmed tracks are boxed and labelled; a detection without a confirmed track gets only a faint
outline (no "#-1" label). Under `blur_unknown` every face that is not a known person is blurred, tracked or
not (a face is never exposed just because its track is not confirmed yet), and its label says "unknown" and
nothing more. When a stream's source is a local file with sound, its audio is copied into the video at
close.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from streamer.config import OutputSettings
from streamer.publish.annotate import FaceLabel, draw_faces
from streamer.publish.video import VideoWriter, copy_audio
from streamer.types import Faces, Frame

log = logging.getLogger(__name__)

_SAME_FACE_IOU = 0.9  # tracked faces are the detections themselves, so their boxes coincide


def face_labels(tracks: Mapping[int, object]) -> dict[int, FaceLabel]:
    """Labels to draw from what the recogniser believes of each live track (`name`, `known`,
    `attributes`: streamer.match.recogniser.TrackState)."""
    labels = {}
    for track, state in tracks.items():
        attributes = state.attributes
        labels[track] = FaceLabel(
            track=track,
            name=state.name,
            age=attributes.age if attributes else None,
            gender=attributes.gender.label if attributes and attributes.gender else None,
            emotion=attributes.emotion.label if attributes and attributes.emotion else None,
            known=state.known,
        )
    return labels


def display_available() -> bool:
    """cv2.imshow aborts the whole process (Qt, SIGABRT) without a display, so ask before opening one."""
    if sys.platform.startswith("linux"):
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return True


class AnnotatedOutput:
    def __init__(
        self, settings: OutputSettings, stream_count: int, sources: Mapping[str, str] | None = None
    ) -> None:
        """`sources`: stream id -> source URL; a stream whose URL is a local file with an audio stream gets
        that audio in its video."""
        self.settings = settings
        self.stream_count = stream_count
        self.sources = dict(sources or {})
        self._first_pts: dict[str, float] = {}
        self.preview = settings.preview and display_available()
        if settings.preview and not self.preview:
            log.warning("output.preview: no display here (DISPLAY/WAYLAND_DISPLAY unset); running without a window")
        self._writers: dict[str, VideoWriter] = {}

    @property
    def active(self) -> bool:
        return self.settings.path is not None or self.preview

    def path_for(self, stream_id: str) -> Path:
        assert self.settings.path is not None
        path = Path(self.settings.path)
        if self.stream_count > 1:  # one file per stream: out.mp4 -> out-cam0.mp4, out-cam1.mp4
            path = path.with_name(f"{path.stem}-{stream_id}{path.suffix}")
        return path

    def render(
        self,
        stream_id: str,
        frame: Frame,
        detections: Faces,
        tracked: Faces,
        track_labels: Mapping[int, FaceLabel],
        fps: float | None,
    ) -> bool:
        """Draw, write and show one frame; False when the viewer closed the preview (q or Esc)."""
        labels = self.labels(detections, tracked, track_labels)
        known = np.array([label is not None and label.known for label in labels], bool)
        blur = ~known if self.settings.blur_unknown else None
        annotated = draw_faces(frame.image, detections.boxes, labels, blur)
        if self.settings.path is not None:
            writer = self._writers.get(stream_id)
            if writer is None:
                writer = self._writers[stream_id] = VideoWriter(
                    self.path_for(stream_id), fps or 30.0, frame.width, frame.height
                )
                self._first_pts[stream_id] = frame.pts
            writer.write(annotated)
        if self.preview:
            import cv2

            cv2.imshow(f"streamer {stream_id}", annotated)
            if cv2.waitKey(1) & 0xFF in (ord("q"), 27):
                return False
        return True

    def labels(
        self, detections: Faces, tracked: Faces | None, track_labels: Mapping[int, FaceLabel]
    ) -> list[FaceLabel | None]:
        """One label per detection: its confirmed track's (redacted to "unknown" for an unknown face under
        `blur_unknown`), or None for a detection no confirmed track holds."""
        from streamer.track.bytetrack import box_iou

        labels: list[FaceLabel | None] = [None] * len(detections)
        if tracked is None or not len(tracked) or not len(detections):
            return labels
        iou = box_iou(detections.boxes, tracked.boxes)
        for row in range(len(detections)):
            column = int(iou[row].argmax())
            track = int(tracked.track_ids[column])
            if iou[row, column] <= _SAME_FACE_IOU or track < 0:
                continue
            label = track_labels.get(track) or FaceLabel(track, None, None, None, None, False)
            if self.settings.blur_unknown and not label.known:
                label = label.redacted()
            labels[row] = label
        return labels

    def close(self) -> None:
        try:
            for stream_id, writer in self._writers.items():
                writer.close()
                self._add_audio(stream_id, writer)
        finally:
            self._writers.clear()
        if self.preview:
            import cv2

            cv2.destroyAllWindows()

    def _add_audio(self, stream_id: str, writer: VideoWriter) -> None:
        source = self.sources.get(stream_id)
        if not source or writer.frames == 0 or not Path(source).is_file():
            return  # live sources (cameras, RTSP, lavfi) have no file to take the sound from
        try:
            if copy_audio(writer.path, source, start=self._first_pts.get(stream_id, 0.0),
                          duration=writer.duration):
                log.info("copied the audio of %s into %s", source, writer.path)
        except Exception as exc:  # noqa: BLE001 - the video is worth keeping without its sound
            log.warning("output.path: %s written without audio: copying the audio of %s failed: %s",
                        writer.path, source, exc)
