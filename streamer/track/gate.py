"""Which tracked faces of a frame go to the (expensive) embedder and attribute heads.

A track is inferred at birth, again every `refresh_s` seconds, and whenever a clearly better view of
the face appears (quality beats the best one inferred so far by `better_quality_ratio`), at most
`max_per_track` times in all. This is what makes real time affordable: a face is embedded a few
times per track, not on every frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np

from streamer.lru import LruDict
from streamer.types import Faces

if TYPE_CHECKING:
    from streamer.config import RecognitionSettings

# Face side (pixels) beyond which more resolution does not help: embedder chips are 112-150 px.
_FULL_SIZE_PX = 112.0
# Sharpness is measured on a fixed-size grey copy so that it compares faces of different sizes.
_SHARPNESS_SIDE = 64
# Variance of the Laplacian at which a face counts as half sharp (64x64 grey, 0..255).
_SHARPNESS_HALF = 100.0
# Floors keep one bad factor from zeroing the product (a zero best would make anything "better").
_FACTOR_FLOOR = 0.2


def frontalness(faces: Faces) -> np.ndarray:
    """1 for a frontal face, towards 0 for a profile, from where the nose sits between the eyes.

    The nose is projected onto the eye axis (so head roll does not matter): a frontal face puts it
    half-way between the eyes. Both landmark schemes begin with right eye, left eye, nose tip.
    """
    if len(faces) == 0:
        return np.zeros(0, np.float32)
    lm = faces.landmarks.astype(np.float64)
    right_eye, left_eye, nose = lm[:, 0], lm[:, 1], lm[:, 2]
    axis = left_eye - right_eye
    norm2 = np.einsum("ij,ij->i", axis, axis)
    t = np.einsum("ij,ij->i", nose - right_eye, axis) / np.maximum(norm2, 1e-6)
    yaw = np.abs(t - 0.5) * 2.0  # 0 frontal, 1 nose over one eye
    return np.clip(1.0 - yaw, 0.0, 1.0).astype(np.float32)


def sharpness(image_bgr: np.ndarray, faces: Faces) -> np.ndarray:
    """Variance of the Laplacian of each face crop, resized to 64x64 grey; 0 for crops off the image."""
    h, w = image_bgr.shape[:2]
    out = np.zeros(len(faces), np.float32)
    boxes = np.round(faces.boxes).astype(np.int64)
    boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, w)
    boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, h)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        if x2 - x1 < 2 or y2 - y1 < 2:
            continue
        crop = image_bgr[y1:y2, x1:x2]
        # Grey first: INTER_AREA on one channel is several times cheaper than on three.
        grey = cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY) if crop.ndim == 3 else crop
        grey = cv2.resize(grey, (_SHARPNESS_SIDE, _SHARPNESS_SIDE), interpolation=cv2.INTER_AREA)
        _, std = cv2.meanStdDev(cv2.Laplacian(grey, cv2.CV_32F))
        out[i] = float(std[0, 0]) ** 2
    return out


def face_quality(image_bgr: np.ndarray, faces: Faces) -> np.ndarray:
    """Quality in (0, 1] per face: size x frontalness x sharpness, each factor floored at 0.2.

    Only ratios between qualities of one track matter (see `InferenceGate`).
    """
    if len(faces) == 0:
        return np.zeros(0, np.float32)
    return (_geometric_quality(faces) * _sharpness_factor(image_bgr, faces)).astype(np.float32)


def _factor(value: np.ndarray) -> np.ndarray:
    return _FACTOR_FLOOR + (1 - _FACTOR_FLOOR) * value


def _geometric_quality(faces: Faces) -> np.ndarray:
    """Size and frontalness factors: from boxes and landmarks only, no pixels touched."""
    wh = np.clip(faces.boxes[:, 2:] - faces.boxes[:, :2], 0, None)
    size = np.clip(wh.min(axis=1) / _FULL_SIZE_PX, 0.0, 1.0)
    return _factor(size) * _factor(frontalness(faces))


def _sharpness_factor(image_bgr: np.ndarray, faces: Faces) -> np.ndarray:
    sharp = sharpness(image_bgr, faces)
    return _factor(sharp / (sharp + _SHARPNESS_HALF))


@dataclass
class _TrackState:
    last_time: float
    best_quality: float
    count: int


class InferenceGate:
    """Per-stream decision which tracked faces need inference. Not thread-safe (one stream thread)."""

    def __init__(
        self,
        refresh_s: float = 2.0,
        max_per_track: int = 10,
        better_quality_ratio: float = 1.3,
        max_tracks: int = 10_000,
        warmup_count: int = 1,
        warmup_refresh_s: float | None = None,
    ) -> None:
        if not refresh_s > 0:
            raise ValueError(f"InferenceGate: refresh_s must be > 0, got {refresh_s}")
        if max_per_track < 1:
            raise ValueError(f"InferenceGate: max_per_track must be >= 1, got {max_per_track}")
        if not better_quality_ratio >= 1:
            raise ValueError(f"InferenceGate: better_quality_ratio must be >= 1, got {better_quality_ratio}")
        if max_tracks < 1:
            raise ValueError(f"InferenceGate: max_tracks must be >= 1, got {max_tracks}")
        self.refresh_s = float(refresh_s)
        self.max_per_track = int(max_per_track)
        self.better_quality_ratio = float(better_quality_ratio)
        self.max_tracks = int(max_tracks)
        # Until a track has `warmup_count` inferences (the votes its name needs) it refreshes faster, so a
        # name is announced within a fraction of a second rather than after a full refresh interval.
        # The same short interval is the minimum gap between "better face" re-inferences, so a face that
        # grows quickly as it approaches does not trigger one per frame.
        self.warmup_count = int(warmup_count)
        if warmup_refresh_s is not None and not 0 < warmup_refresh_s <= self.refresh_s:
            raise ValueError(
                f"InferenceGate: warmup_refresh_s must be in (0, refresh_s={refresh_s}], got {warmup_refresh_s}"
            )
        self.warmup_refresh_s = float(warmup_refresh_s) if warmup_refresh_s is not None else self.refresh_s
        self.min_gap_s = float(warmup_refresh_s) if warmup_refresh_s is not None else 0.0
        # Bounded: a safety net if a caller forgets to call `forget`.
        self._tracks: LruDict[int, _TrackState] = LruDict(self.max_tracks)

    @classmethod
    def from_settings(cls, settings: RecognitionSettings) -> InferenceGate:
        return cls(
            warmup_count=settings.min_votes,
            warmup_refresh_s=min(settings.warmup_refresh_s, settings.refresh_s),
            refresh_s=settings.refresh_s,
            max_per_track=settings.max_per_track,
            better_quality_ratio=settings.better_quality_ratio,
        )

    def __len__(self) -> int:
        return len(self._tracks)

    def select(self, image_bgr: np.ndarray, faces: Faces, timestamp: float) -> np.ndarray:
        """Row indices (ascending, int64) of `faces` to send for inference now; records them as inferred.

        Untracked rows (track id -1) are never selected.
        """
        ids = faces.track_ids.tolist()
        # `get` marks this frame's known tracks as recent before any new one is inserted, so inserting
        # can only evict tracks not in this frame (unless one frame holds more than max_tracks).
        states = [self._tracks.get(tid) if tid >= 0 else None for tid in ids]
        # Rows whose track can still be inferred (not capped).
        open_rows = [
            row for row, (tid, state) in enumerate(zip(ids, states))
            if tid >= 0 and (state is None or state.count < self.max_per_track)
        ]  # fmt: skip
        if not open_rows:
            self._touch(ids)
            return np.zeros(0, np.int64)
        geometric = _geometric_quality(faces[np.asarray(open_rows)]).tolist()
        # Sharpness (the only part that reads pixels) is needed to record the quality of a face we
        # infer, or when size x frontalness alone could already beat the best (sharpness factor <= 1).
        candidates = []  # (row, geometric quality, refresh due)
        for row, geo in zip(open_rows, geometric):
            state = states[row]
            if state is None:
                candidates.append((row, geo, True))
                continue
            if timestamp < state.last_time:
                state.last_time = timestamp  # the stream clock restarted (file loop, reconnect)
            elapsed = timestamp - state.last_time
            due = elapsed >= (self.warmup_refresh_s if state.count < self.warmup_count else self.refresh_s)
            may_improve = elapsed >= self.min_gap_s
            if due or (may_improve and geo >= state.best_quality * self.better_quality_ratio):
                candidates.append((row, geo, due))
        chosen = []
        if candidates:
            rows = np.asarray([c[0] for c in candidates])
            quality = np.asarray([c[1] for c in candidates]) * _sharpness_factor(image_bgr, faces[rows])
            for (row, _, due), q in zip(candidates, quality.tolist()):
                tid, state = ids[row], states[row]
                if state is None:
                    self._tracks.set(tid, _TrackState(last_time=timestamp, best_quality=q, count=1))
                elif due or q >= state.best_quality * self.better_quality_ratio:
                    state.last_time = timestamp
                    state.best_quality = max(state.best_quality, q)
                    state.count += 1
                else:
                    continue
                chosen.append(row)
        self._touch(ids)
        return np.asarray(chosen, np.int64)

    def refresh_due(self, track_ids: list[int] | np.ndarray, timestamp: float) -> bool:
        """Whether `select` would infer one of these tracks at `timestamp` because it is new or its refresh
        is due (a better view can only be seen on a detected frame). Records nothing: adaptive detection
        asks this to detect on such a frame rather than predict, so names come as early as with detection
        on every frame."""
        return bool(self.due_tracks(track_ids, timestamp))

    def due_tracks(self, track_ids: list[int] | np.ndarray, timestamp: float) -> list[int]:
        """The tracks among these that `select` would infer at `timestamp` (see `refresh_due`); records
        nothing."""
        due = []
        for tid in np.asarray(track_ids, np.int64).reshape(-1).tolist():
            if tid < 0:
                continue
            state = self._tracks.get(tid)
            if state is None:
                due.append(tid)
                continue
            if state.count >= self.max_per_track:
                continue
            interval = self.warmup_refresh_s if state.count < self.warmup_count else self.refresh_s
            if timestamp < state.last_time or timestamp - state.last_time >= interval:
                due.append(tid)
        return due

    def forget(self, track_ids: list[int] | np.ndarray) -> None:
        for tid in np.asarray(track_ids, np.int64).reshape(-1).tolist():
            self._tracks.pop(tid, None)

    def reset(self) -> None:
        self._tracks.clear()

    def _touch(self, ids: list[int]) -> None:
        # After the inserts, in row order: this frame's tracks, new or known, end up the most recent.
        for tid in ids:
            self._tracks.touch(tid)
