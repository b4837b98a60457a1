"""How usable one face is for recognition: size, sharpness and pose, and why it would be refused.

The measures are the inference gate's own (`streamer.track.gate`), so a face the gate ranks highly is the
same face enrolment accepts; this module adds the units people set thresholds in (pixels, degrees).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from streamer.track.gate import face_quality as _gate_quality
from streamer.track.gate import frontalness, sharpness
from streamer.types import Faces

if TYPE_CHECKING:
    from streamer.config import EnrolmentSettings


@dataclass(frozen=True)
class FaceQuality:
    """score: in (0, 1], the gate's size x frontalness x sharpness; size: shorter box side (px);
    sharpness: variance of the Laplacian of the 64x64 grey crop; yaw: degrees, 0 frontal;
    reasons: why enrolment refuses the face (empty when it is good enough)."""

    score: float
    size: float
    sharpness: float
    yaw: float
    reasons: tuple[str, ...]


def yaw_degrees(faces: Faces) -> np.ndarray:
    """Head yaw (degrees, unsigned) from where the nose sits between the eyes.

    With the nose tip about half an inter-eye distance in front of the eyes (a typical face), its
    offset from the eye midpoint, relative to half the inter-eye distance, is tan(yaw). The gate's
    frontalness is 1 minus that offset, clipped, so 45 degrees means "nose over an eye or beyond".
    """
    offset = 1.0 - frontalness(faces).astype(np.float64)
    return np.degrees(np.arctan(offset)).astype(np.float32)


def face_quality(
    image_bgr: np.ndarray, box: np.ndarray, landmarks: np.ndarray, limits: EnrolmentSettings | None = None
) -> FaceQuality:
    """Quality of the face at `box` (x1, y1, x2, y2) with 5-point `landmarks` (right eye, left eye, nose,
    mouth corners) in `image_bgr`; `reasons` are checked against `limits` (default: enrolment defaults)."""
    from streamer.config import EnrolmentSettings

    limits = limits or EnrolmentSettings()
    face = Faces(np.asarray(box, np.float32)[None], np.ones(1, np.float32), np.asarray(landmarks, np.float32)[None])
    size = float(max(0.0, min(face.boxes[0, 2] - face.boxes[0, 0], face.boxes[0, 3] - face.boxes[0, 1])))
    sharp = float(sharpness(image_bgr, face)[0])
    yaw = float(yaw_degrees(face)[0])
    reasons = []
    if size < limits.min_face_px:
        reasons.append(f"face too small ({size:.0f} px, enrolment.min_face_px is {limits.min_face_px})")
    if sharp < limits.min_sharpness:
        reasons.append(f"face blurred (sharpness {sharp:.0f}, enrolment.min_sharpness is {limits.min_sharpness:g})")
    if yaw > limits.max_yaw_deg:
        reasons.append(f"face turned away (yaw about {yaw:.0f} degrees, enrolment.max_yaw_deg is "
                       f"{limits.max_yaw_deg:g})")
    score = float(_gate_quality(image_bgr, face)[0])
    return FaceQuality(
        score=round(score, 4), size=round(size, 1), sharpness=round(sharp, 1), yaw=round(yaw, 1), reasons=tuple(reasons)
    )


def left_to_right(faces: Faces) -> np.ndarray:
    """Row order of `faces` by box centre, left to right (ties: top first): how `--face N` counts."""
    if len(faces) == 0:
        return np.zeros(0, np.int64)
    cx = (faces.boxes[:, 0] + faces.boxes[:, 2]) / 2
    cy = (faces.boxes[:, 1] + faces.boxes[:, 3]) / 2
    return np.lexsort((cy, cx)).astype(np.int64)
