"""Shot-boundary detection, so a track never jumps across a cut in edited video.

A cut replaces every face at once; the Kalman prediction of a face that just left can overlap a different
person's face in the next shot, and the track (with its votes) would carry over to the wrong person.
A colour-histogram distance between consecutive frames is tiny within a shot (< 0.1 Bhattacharyya on
the clips we measured, including a hand-held crowd shot) and large at a cut (0.37-0.44).
"""

from __future__ import annotations

import cv2
import numpy as np

_SIZE = (160, 90)  # enough pixels for a stable histogram, cheap to compute (~0.15 ms per 720p frame)
_BINS = [8, 4, 4]  # hue, saturation, value
_RANGES = [0, 180, 0, 256, 0, 256]


class SceneCutDetector:
    def __init__(self, threshold: float = 0.25) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"SceneCutDetector: threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self._previous: np.ndarray | None = None

    def is_cut(self, image_bgr: np.ndarray) -> bool:
        """True when this frame starts a new shot (never for the first frame)."""
        # Nearest neighbour: a histogram needs no anti-aliasing, and it reads only the pixels it keeps
        # (~0.04 ms a 720p frame; slicing every 4th pixel first made a strided copy costing ~0.7 ms).
        small = cv2.resize(image_bgr, _SIZE, interpolation=cv2.INTER_NEAREST)
        hsv = cv2.cvtColor(small, cv2.COLOR_BGR2HSV)
        histogram = cv2.calcHist([hsv], [0, 1, 2], None, _BINS, _RANGES)
        cv2.normalize(histogram, histogram)
        previous, self._previous = self._previous, histogram
        if previous is None:
            return False
        return cv2.compareHist(previous, histogram, cv2.HISTCMP_BHATTACHARYYA) >= self.threshold

    def reset(self) -> None:
        self._previous = None
