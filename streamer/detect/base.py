"""The one interface every face detector implements, and the geometry they all share.

A subclass only implements `_detect` (and optionally `_detect_batch`) on an image that is already
small enough; the base class validates input, shrinks large images to `max_side`, maps results back
to the original pixels, clips boxes, drops tiny faces and sorts by score. That keeps the detectors
interchangeable: the same frame gives comparable `Faces` whichever model found them.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import ClassVar, Generic, TypeVar

import cv2
import numpy as np

from streamer.errors import ModelError
from streamer.imaging import check_image  # also re-exported from streamer.detect
from streamer.lru import LruDict
from streamer.types import Faces, LandmarkScheme

log = logging.getLogger(__name__)

T = TypeVar("T")


def shrink(image: np.ndarray, max_side: int) -> tuple[np.ndarray, float, float]:
    """A copy whose longer side is at most `max_side` (never upscaled) and the x, y factors back."""
    height, width = image.shape[:2]
    longer = max(height, width)
    if longer <= max_side:
        return image, 1.0, 1.0
    scale = max_side / longer
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    # INTER_AREA averages the pixels it drops, so small faces survive the shrink without aliasing.
    small = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)
    return small, width / new_w, height / new_h


class SizeCache(Generic[T]):
    """Per-input-size state (a sized model, anchor grids), built once and reused for every frame.

    Bounded so a stream of ever-changing photo sizes cannot grow it without limit.
    """

    def __init__(self, build: Callable[[Hashable], T], capacity: int = 8) -> None:
        self._build = build
        self._items: LruDict[Hashable, T] = LruDict(capacity)

    def get(self, key: Hashable) -> T:
        return self._items.get_or_create(key, lambda: self._build(key))

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


class Detector(ABC):
    """Finds faces in BGR images. Boxes and landmarks come back in the original image's pixels,
    sorted by score (highest first). Use as a context manager or call `close()` when done."""

    name: ClassVar[str]
    scheme: ClassVar[LandmarkScheme]
    # Region crops start on multiples of this many network-input pixels (see detect_regions): the coarsest
    # stride of the network's output grids, or 1 for a detector without such grids.
    region_align: ClassVar[int] = 1

    def __init__(
        self,
        model_path: Path,
        *,
        score_threshold: float = 0.6,
        nms_threshold: float = 0.3,
        max_side: int = 640,
        min_face: int = 20,
    ) -> None:
        for label, value in (("score_threshold", score_threshold), ("nms_threshold", nms_threshold)):
            if not 0.0 < value < 1.0:
                raise ValueError(f"{self.name}: {label} must be in (0, 1), got {value}")
        if max_side < 32:
            raise ValueError(f"{self.name}: max_side must be at least 32 pixels, got {max_side}")
        if min_face < 0:
            raise ValueError(f"{self.name}: min_face must be >= 0 pixels, got {min_face}")
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise ModelError(f"{self.name} detector: model file not found: {self.model_path}")
        self.score_threshold = float(score_threshold)
        self.nms_threshold = float(nms_threshold)
        self.max_side = int(max_side)
        self.min_face = int(min_face)

    # -- the interface -------------------------------------------------------------------------
    def detect(self, image_bgr: np.ndarray) -> Faces:
        return self.detect_batch([image_bgr])[0]

    def detect_batch(self, images: Sequence[np.ndarray]) -> list[Faces]:
        """One `Faces` per image, in order. Images may differ in size."""
        checked = [check_image(image) for image in images]
        if not checked:
            return []
        shrunk = [shrink(image, self.max_side) for image in checked]
        found = self._detect_batch([small for small, _, _ in shrunk])
        return [
            self._finish(faces, fx, fy, image.shape[1], image.shape[0])
            for faces, (_, fx, fy), image in zip(found, shrunk, checked)
        ]

    def detect_regions(self, image_bgr: np.ndarray, regions: np.ndarray) -> Faces:
        """Faces inside `regions` ((n, 4) x1, y1, x2, y2 in `image_bgr` pixels) of one frame, in frame pixels.

        Each region is detected at the scale a full `detect` of this frame would use, so a face gets the
        same score and landmarks either way and the tracker sees one consistent detector. A face cut by a
        region's edge (not the frame's) is dropped: half a face is a wrong box, and the region was drawn
        around the faces it is for. Adaptive detection (streamer.track.processor) calls this between full
        detections, around the tracks that still want one.
        """
        image = check_image(image_bgr)
        height, width = image.shape[:2]
        boxes = np.asarray(regions, np.float64).reshape(-1, 4)
        if not len(boxes):
            return Faces.empty(self.scheme)
        longer = max(height, width)
        scale = min(1.0, self.max_side / longer)
        crops, origins = [], []
        # Region edges on the network's coarsest grid (`region_align` input pixels, 32 for the stride-8/16/32
        # detectors; times 1/scale in frame pixels): the shrunk crop is then the very pixels a full detection
        # sees there, and every output location sits where it sits on the full frame, so box and landmark
        # regressions come out the same (on a 2-pixel grid landmarks moved by a pixel or two).
        step = self.region_align / scale
        for x1, y1, x2, y2 in boxes.tolist():  # Python floats: math.floor/ceil, not numpy's, on scalars
            left = max(0, int(math.floor(x1 / step) * step))
            top = max(0, int(math.floor(y1 / step) * step))
            right = min(width, math.ceil(math.ceil(x2 / step) * step))
            bottom = min(height, math.ceil(math.ceil(y2 / step) * step))
            if right - left < 2 or bottom - top < 2:
                continue
            crop = image[top:bottom, left:right]
            if scale < 1.0:
                size = (max(1, round((right - left) * scale)), max(1, round((bottom - top) * scale)))
                crop = cv2.resize(crop, size, interpolation=cv2.INTER_AREA)
            crops.append(np.ascontiguousarray(crop))
            origins.append((left, top, right, bottom))
        if not crops:
            return Faces.empty(self.scheme)
        found = []
        for faces, crop, (left, top, right, bottom) in zip(self._detect_batch(crops), crops, origins):
            if not len(faces):
                continue
            fx, fy = (right - left) / crop.shape[1], (bottom - top) / crop.shape[0]
            factor = np.array([fx, fy, fx, fy], np.float32)
            offset = np.array([left, top, left, top], np.float32)
            faces = Faces._of(faces.boxes * factor + offset, faces.scores, faces.landmarks * factor[:2] + offset[:2],
                              faces.scheme, faces.track_ids)
            margin = 1.0  # a box within a pixel of an inner edge was cut by it
            b = faces.boxes
            cut = (((b[:, 0] <= left + margin) & (left > 0)) | ((b[:, 1] <= top + margin) & (top > 0))
                   | ((b[:, 2] >= right - margin) & (right < width))
                   | ((b[:, 3] >= bottom - margin) & (bottom < height)))
            found.append(faces[~cut])
        if not found:
            return Faces.empty(self.scheme)
        return self._finish(Faces.merge(found), 1.0, 1.0, width, height)

    def close(self) -> None:
        """Release native resources; the detector must not be used afterwards. Safe to call twice."""

    def __enter__(self) -> Detector:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(model_path={str(self.model_path)!r}, "
            f"score_threshold={self.score_threshold}, "
            f"nms_threshold={self.nms_threshold}, max_side={self.max_side}, min_face={self.min_face})"
        )

    # -- what each detector implements ------------------------------------------------------------
    @abstractmethod
    def _detect(self, image: np.ndarray) -> Faces:
        """Faces in `image` (already shrunk, C-contiguous BGR uint8), in its own pixels, any order."""

    def _detect_batch(self, images: list[np.ndarray]) -> list[Faces]:
        return [self._detect(np.ascontiguousarray(image)) for image in images]

    # -- shared post-processing -------------------------------------------------------------------
    def _finish(self, faces: Faces, fx: float, fy: float, width: int, height: int) -> Faces:
        if len(faces) == 0:
            return Faces.empty(self.scheme)
        landmarks = faces.landmarks
        if fx != 1.0 or fy != 1.0:
            factor = np.array([fx, fy, fx, fy], np.float32)
            boxes = faces.boxes * factor
            landmarks = landmarks * factor[:2]
        else:
            boxes = faces.boxes.copy()
        # Landmarks stay unclipped: an eye just outside the frame is still where it is, and
        # alignment needs the true geometry. Boxes are clipped so crops never index outside.
        np.clip(boxes[:, 0::2], 0, width, out=boxes[:, 0::2])
        np.clip(boxes[:, 1::2], 0, height, out=boxes[:, 1::2])
        faces = Faces._of(boxes, faces.scores, landmarks, faces.scheme, faces.track_ids)
        sides = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
        finite = np.isfinite(faces.scores) & np.isfinite(boxes).all(axis=1)
        keep = finite & (sides > 0) & (sides >= self.min_face)
        return faces[keep].sorted_by_score()
