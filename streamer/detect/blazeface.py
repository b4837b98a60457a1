"""BlazeFace short range (Google MediaPipe, Apache-2.0) through the MediaPipe Tasks FaceDetector.

It returns eyes, nose tip and mouth centre (scheme FOUR; its two ear points are dropped). It is fast
(it looks at a 128x128 copy) but made for faces within about 2 m, and it gives confident false
positives LARGER than the real face: callers must pick faces by score, never by size, which the
score-sorted output makes the natural choice.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from streamer.detect.base import Detector
from streamer.errors import ModelError
from streamer.types import Faces, LandmarkScheme

log = logging.getLogger(__name__)

# MediaPipe's keypoint order: right eye, left eye, nose tip, mouth centre, right ear, left ear
# (subject's right = image left), so the first four are exactly scheme FOUR.
_FOUR = slice(0, 4)

_stderr_lock = threading.Lock()


@contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Silence the C++ INFO lines LiteRT/absl write straight to fd 2 (no env var or API turns them off
    in mediapipe 1.2). Used only around model creation, warm-up and close, never around detection,
    so the process's stderr is muted for those few milliseconds only. Set STREAMER_VERBOSE_NATIVE=1
    to see them.
    """
    if os.environ.get("STREAMER_VERBOSE_NATIVE"):
        yield
        return
    with _stderr_lock:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError, AttributeError):  # no real fd 2 (embedded interpreters)
            yield
            return
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, 2)
            finally:
                os.close(devnull)
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _close_task(task: Any) -> None:
    # Runs from close(), garbage collection or atexit (weakref.finalize), i.e. always before
    # interpreter teardown, when MediaPipe's own __del__ would fail with a TypeError.
    with _quiet_native_stderr():
        try:
            task.close()
        except Exception:  # noqa: BLE001 - closing must never raise out of a finalizer
            log.debug("closing the MediaPipe face detector failed", exc_info=True)


class BlazeFaceDetector(Detector):
    name = "blazeface"
    scheme = LandmarkScheme.FOUR

    def __init__(self, model_path: Path, **options: Any) -> None:
        """`options`: the `Detector` ones (score_threshold, nms_threshold, max_side, min_face)."""
        super().__init__(model_path, **options)
        # Imported here so that importing streamer.detect does not load MediaPipe's native library.
        import mediapipe as mp
        from mediapipe.tasks.python import BaseOptions, vision

        self._mp = mp
        options = vision.FaceDetectorOptions(
            base_options=BaseOptions(model_asset_path=str(self.model_path)),
            running_mode=vision.RunningMode.IMAGE,
            min_detection_confidence=self.score_threshold,
            min_suppression_threshold=self.nms_threshold,
        )
        with _quiet_native_stderr():
            try:
                task = vision.FaceDetector.create_from_options(options)
            except (RuntimeError, ValueError) as exc:
                raise ModelError(
                    f"blazeface: cannot load {self.model_path} as a MediaPipe face detector model: {exc}"
                ) from exc
            self._task = task
            self._finalizer = weakref.finalize(self, _close_task, task)
            # The first run logs a one-off LiteRT warning about tensor alignment: take it here.
            self._task.detect(self._to_mp(np.zeros((64, 64, 3), np.uint8)))

    def _to_mp(self, image_bgr: np.ndarray) -> Any:
        rgb = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)
        return self._mp.Image(image_format=self._mp.ImageFormat.SRGB, data=rgb)

    def _detect(self, image: np.ndarray) -> Faces:
        if not self._finalizer.alive:
            raise RuntimeError("blazeface: detector used after close()")
        result = self._task.detect(self._to_mp(image))
        count = len(result.detections)
        if count == 0:
            return Faces.empty(self.scheme)
        height, width = image.shape[:2]
        boxes = np.empty((count, 4), np.float32)
        scores = np.empty(count, np.float32)
        landmarks = np.empty((count, 4, 2), np.float32)
        for row, detection in enumerate(result.detections):
            box = detection.bounding_box
            boxes[row] = (box.origin_x, box.origin_y, box.origin_x + box.width, box.origin_y + box.height)
            scores[row] = detection.categories[0].score
            points = detection.keypoints[_FOUR]
            if len(points) != 4:  # pragma: no cover - a model file without keypoints
                raise ModelError(f"blazeface: {self.model_path} gives no face keypoints")
            # Keypoints are normalised to the input image.
            landmarks[row] = [(p.x * width, p.y * height) for p in points]
        return Faces(boxes=boxes, scores=scores, landmarks=landmarks, scheme=self.scheme)

    def close(self) -> None:
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer()
