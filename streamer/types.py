"""The small typed values that travel between stages.

Every stage speaks `Faces`: one record per frame holding N rows of numpy columns (boxes, scores,
landmarks, track ids). Records are frozen; stages return new ones instead of mutating.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

import numpy as np


class LandmarkScheme(str, Enum):
    """Which facial points a detector returns, in which order (subject's right = image left).

    FIVE: right eye, left eye, nose tip, right mouth corner, left mouth corner (YuNet, SCRFD).
    FOUR: right eye, left eye, nose tip, mouth centre (BlazeFace has no mouth corners).
    """

    FIVE = "eyes-nose-mouth_corners"
    FOUR = "eyes-nose-mouth_center"

    @property
    def num_points(self) -> int:
        return 5 if self is LandmarkScheme.FIVE else 4


def rounded_box(row: Iterable[float]) -> list[float]:
    """A box as JSON-ready [x1, y1, x2, y2], to a tenth of a pixel."""
    return [round(float(v), 1) for v in row]


def _check(name: str, array: np.ndarray, shape: tuple[int, ...]) -> None:
    # A plain tuple comparison: every stage builds several Faces a frame, so this runs ~20 times a frame.
    if array.shape != shape:
        raise ValueError(f"Faces.{name}: expected shape {shape}, got {array.shape}")


@dataclass(frozen=True, eq=False)
class Faces:
    """Faces found in one image or frame, in that frame's pixel coordinates.

    boxes      (N, 4) float32  x1, y1, x2, y2
    scores     (N,)   float32  detector confidence in [0, 1]
    landmarks  (N, K, 2) float32, K given by `scheme`
    track_ids  (N,)   int64, -1 where the face is not (yet) tracked
    """

    boxes: np.ndarray
    scores: np.ndarray
    landmarks: np.ndarray
    scheme: LandmarkScheme = LandmarkScheme.FIVE
    track_ids: np.ndarray | None = None

    def __post_init__(self) -> None:
        boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        n = len(boxes)
        scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        landmarks = np.asarray(self.landmarks, dtype=np.float32)
        if landmarks.size == 0:
            landmarks = landmarks.reshape(0, self.scheme.num_points, 2)
        track_ids = (
            np.full(n, -1, dtype=np.int64)
            if self.track_ids is None
            else np.asarray(self.track_ids, dtype=np.int64).reshape(-1)
        )
        _check("scores", scores, (n,))
        _check("landmarks", landmarks, (n, self.scheme.num_points, 2))
        _check("track_ids", track_ids, (n,))
        for name, value in (
            ("boxes", boxes),
            ("scores", scores),
            ("landmarks", landmarks),
            ("track_ids", track_ids),
        ):
            object.__setattr__(self, name, value)

    @classmethod
    def empty(cls, scheme: LandmarkScheme = LandmarkScheme.FIVE) -> Faces:
        return cls._of(np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                       np.zeros((0, scheme.num_points, 2), np.float32), scheme, np.zeros(0, np.int64))

    def __len__(self) -> int:
        return len(self.boxes)

    @classmethod
    def _of(cls, boxes: np.ndarray, scores: np.ndarray, landmarks: np.ndarray, scheme: LandmarkScheme,
            track_ids: np.ndarray) -> Faces:
        """Rows taken from, or joined out of, checked `Faces`: already of the right dtypes and shapes, so not
        checked again (a frame builds some twenty of these; under cProfile the checks were 4% of a frame's
        detection and tracking)."""
        faces = object.__new__(cls)
        for name, value in (("boxes", boxes), ("scores", scores), ("landmarks", landmarks), ("scheme", scheme),
                            ("track_ids", track_ids)):
            object.__setattr__(faces, name, value)
        return faces

    def __getitem__(self, index: Any) -> Faces:
        """Rows by int, slice, index array or boolean mask; always returns a `Faces`."""
        if isinstance(index, (int, np.integer)):
            index = [int(index)]
        return Faces._of(self.boxes[index], self.scores[index], self.landmarks[index], self.scheme,
                         self.track_ids[index])

    def with_track_ids(self, track_ids: np.ndarray) -> Faces:
        ids = np.asarray(track_ids, dtype=np.int64).reshape(-1)
        _check("track_ids", ids, (len(self),))
        return Faces._of(self.boxes, self.scores, self.landmarks, self.scheme, ids)

    def scaled(self, factor: float) -> Faces:
        """Coordinates multiplied by `factor` (used to map detections on a resized copy back)."""
        return replace(self, boxes=self.boxes * factor, landmarks=self.landmarks * factor)

    @property
    def areas(self) -> np.ndarray:
        wh = np.clip(self.boxes[:, 2:] - self.boxes[:, :2], 0, None)
        return wh[:, 0] * wh[:, 1]

    def sorted_by_score(self) -> Faces:
        return self[np.argsort(-self.scores, kind="stable")]

    @staticmethod
    def merge(records: list[Faces]) -> Faces:
        if not records:
            return Faces.empty()
        schemes = {r.scheme for r in records}
        if len(schemes) != 1:
            raise ValueError(f"Faces.merge: mixed landmark schemes {sorted(s.value for s in schemes)}")
        if len(records) == 1:
            return records[0]
        return Faces._of(
            np.concatenate([r.boxes for r in records]),
            np.concatenate([r.scores for r in records]),
            np.concatenate([r.landmarks for r in records]),
            records[0].scheme,
            np.concatenate([r.track_ids for r in records]),
        )


@dataclass(frozen=True, eq=False)
class Frame:
    """One decoded video frame. `image` is BGR uint8 (H, W, 3), the layout OpenCV and our models use."""

    stream: str
    index: int  # 0-based count of frames delivered by this source
    pts: float  # stream timestamp in seconds (source clock), or wall time for sources without one
    decoded_at: float  # time.monotonic() when decoding finished; latency is measured from here
    image: np.ndarray = field(repr=False)

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])


@dataclass(frozen=True)
class Emotion:
    LABELS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")

    label: str
    scores: dict[str, float]


@dataclass(frozen=True)
class Gender:
    label: str  # "man" | "woman"
    probability: float  # probability of `label`


@dataclass(frozen=True)
class Attributes:
    age: float | None = None
    gender: Gender | None = None
    emotion: Emotion | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, rounded; None where not estimated (the wire format of attributes events)."""
        return {
            "age": None if self.age is None else round(float(self.age), 1),
            "gender": None
            if self.gender is None
            else {"label": self.gender.label, "probability": round(float(self.gender.probability), 4)},
            "emotion": None
            if self.emotion is None
            else {"label": self.emotion.label, "scores": {k: round(float(v), 4) for k, v in self.emotion.scores.items()}},
        }
