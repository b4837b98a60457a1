"""YuNet (OpenCV Zoo, MIT) through `cv2.FaceDetectorYN`: boxes plus 5 landmarks in scheme FIVE order."""

from __future__ import annotations

import logging
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np

from streamer.detect.base import Detector, SizeCache
from streamer.errors import ModelError
from streamer.types import Faces, LandmarkScheme

log = logging.getLogger(__name__)

_TOP_K = 5000


@contextmanager
def _quiet_opencv() -> Iterator[None]:
    """Hide OpenCV 5's harmless 'setPreferableTarget ... new graph engine' warning while a net is built.

    The log level is process-wide, so it is lowered only for the few milliseconds of creation and
    put back exactly as it was.
    """
    logging_api = getattr(getattr(cv2, "utils", None), "logging", None)
    if logging_api is None:  # pragma: no cover - builds without cv2.utils.logging
        yield
        return
    previous = logging_api.getLogLevel()
    logging_api.setLogLevel(min(previous, logging_api.LOG_LEVEL_ERROR))
    try:
        yield
    finally:
        logging_api.setLogLevel(previous)


def _one_line(exc: cv2.error) -> str:
    return " ".join(str(getattr(exc, "err", exc)).replace(">", " ").split())


class YuNetDetector(Detector):
    name = "yunet"
    scheme = LandmarkScheme.FIVE

    def __init__(
        self,
        model_path: Path,
        *,
        score_threshold: float = 0.6,
        nms_threshold: float = 0.3,
        max_side: int = 640,
        min_face: int = 20,
    ) -> None:
        super().__init__(
            model_path,
            score_threshold=score_threshold,
            nms_threshold=nms_threshold,
            max_side=max_side,
            min_face=min_face,
        )
        # One FaceDetectorYN per input size: the first run at a new size re-plans the network, so a
        # fixed-size video pays that once and mixed-size batches do not thrash one instance.
        self._by_size: SizeCache[cv2.FaceDetectorYN] = SizeCache(self._build)
        # Fail now, with a clear error, if the file is not a YuNet model (a wrong ONNX file loads
        # fine and only breaks at the first detect).
        try:
            self._build((64, 64)).detect(np.zeros((64, 64, 3), np.uint8))
        except cv2.error as exc:
            raise ModelError(
                f"yunet: {self.model_path} does not run as a YuNet model: {_one_line(exc)}"
            ) from exc

    def _build(self, size: Hashable) -> cv2.FaceDetectorYN:
        assert isinstance(size, tuple)
        try:
            with _quiet_opencv():
                return cv2.FaceDetectorYN.create(
                    str(self.model_path), "", size, self.score_threshold, self.nms_threshold, _TOP_K
                )
        except cv2.error as exc:
            raise ModelError(
                f"yunet: cannot load {self.model_path} as a YuNet ONNX model: {_one_line(exc)}"
            ) from exc

    def _detect(self, image: np.ndarray) -> Faces:
        height, width = image.shape[:2]
        _, rows = self._by_size.get((width, height)).detect(image)
        if rows is None or len(rows) == 0:
            return Faces.empty(self.scheme)
        # Each row: x, y, w, h, then (x, y) of right eye, left eye, nose, right and left mouth
        # corner (subject's right = image left, the FIVE order), then the score.
        xywh = rows[:, 0:4]
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        return Faces(
            boxes=boxes,
            scores=rows[:, 14],
            landmarks=rows[:, 4:14].reshape(-1, 5, 2),
            scheme=self.scheme,
        )

    def close(self) -> None:
        self._by_size.clear()
