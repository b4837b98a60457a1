"""What people watch: the annotated video file per stream and the preview window.

Every detection is drawn (and blurred under `blur_unknown` unless it belongs to a known person), tracked
or not: a face is never exposed just because its track is not confirmed yet.
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
from streamer.publish.video import VideoWriter
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
    def __init__(self, settings: OutputSettings, stream_count: int) -> None:
        self.settings = settings
        self.stream_count = stream_count
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
        from streamer.track.bytetrack import box_iou

        labels = []
        iou = box_iou(detections.boxes, tracked.boxes) if len(tracked) and len(detections) else None
        for row in range(len(detections)):
            label = FaceLabel(track=-1, name=None, age=None, gender=None, emotion=None, known=False)
            if iou is not None and iou[row].max() > _SAME_FACE_IOU:
                track = int(tracked.track_ids[int(iou[row].argmax())])
                label = track_labels.get(track, FaceLabel(track, None, None, None, None, False))
            labels.append(label)
        blur = np.array([not label.known for label in labels], bool) if self.settings.blur_unknown else None
        annotated = draw_faces(frame.image, detections.boxes, labels, blur)
        if self.settings.path is not None:
            writer = self._writers.get(stream_id)
            if writer is None:
                writer = self._writers[stream_id] = VideoWriter(
                    self.path_for(stream_id), fps or 30.0, frame.width, frame.height
                )
            writer.write(annotated)
        if self.preview:
            import cv2

            cv2.imshow(f"streamer {stream_id}", annotated)
            if cv2.waitKey(1) & 0xFF in (ord("q"), 27):
                return False
        return True

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()
        if self.preview:
            import cv2

            cv2.destroyAllWindows()
