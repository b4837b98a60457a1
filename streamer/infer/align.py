"""Face alignment: a similarity transform from detector landmarks onto an embedder's chip template.

Each embedder was trained on chips cut with one geometry; a `ChipTemplate` states where the detector's
landmarks must land in that chip, per landmark scheme (five points from YuNet/SCRFD, four from
BlazeFace). `align_faces` fits rotation + uniform scale + translation per face (LMEDS, so one bad point
cannot drag the fit) and warps every face of a `Faces` record into a batch of chips (area-averaged first
when the face is much larger than the chip, edges repeated where the chip reaches past the photo).
`redetect_landmarks` (opt-in) finds each face's landmarks again on a view cut with the first alignment,
because a detector's landmarks on a tilted face lean towards upright.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import cv2
import numpy as np

from streamer.imaging import check_image
from streamer.types import Faces, LandmarkScheme


@dataclass(frozen=True, eq=False)
class ChipTemplate:
    """Chip size (pixels, square) and where each landmark scheme's points belong in the chip."""

    name: str
    size: int
    points: dict[LandmarkScheme, np.ndarray] = field(repr=False)

    def __post_init__(self) -> None:
        if self.size < 8:
            raise ValueError(f"ChipTemplate {self.name}: size must be >= 8 pixels, got {self.size}")
        checked = {}
        for scheme, pts in self.points.items():
            pts = np.asarray(pts, dtype=np.float32)
            if pts.shape != (scheme.num_points, 2):
                raise ValueError(
                    f"ChipTemplate {self.name}: {scheme.name} points must have shape "
                    f"({scheme.num_points}, 2), got {pts.shape}"
                )
            if pts.min() < 0 or pts.max() > self.size:
                raise ValueError(f"ChipTemplate {self.name}: {scheme.name} points outside the {self.size}px chip")
            pts.setflags(write=False)
            checked[LandmarkScheme(scheme)] = pts
        if not checked:
            raise ValueError(f"ChipTemplate {self.name}: no landmark scheme given")
        object.__setattr__(self, "points", checked)

    def points_for(self, scheme: LandmarkScheme) -> np.ndarray:
        try:
            return self.points[scheme]
        except KeyError:
            have = ", ".join(s.name for s in self.points)
            raise ValueError(f"ChipTemplate {self.name} has no {scheme.name} points (has {have})") from None


# ArcFace / insightface standard 112x112 five-point template (insightface `face_align.arcface_dst`).
# FOUR: eyes and nose as in FIVE; BlazeFace's mouth centre mapped into this chip from the shared
# identity photos (YuNet's five points aligned onto ARCFACE_112, BlazeFace points carried along and
# averaged, 110 of 116 faces kept) by tools/fit_dlib_template.py.
ARCFACE_112 = ChipTemplate(
    name="arcface_112",
    size=112,
    points={
        LandmarkScheme.FIVE: np.array(
            [
                [38.2946, 51.6963],
                [73.5318, 51.5014],
                [56.0252, 71.7366],
                [41.5493, 92.3655],
                [70.7299, 92.2041],
            ]
        ),
        LandmarkScheme.FOUR: np.array(
            [
                [38.03, 54.55],
                [74.76, 54.72],
                [56.14, 75.83],
                [56.12, 93.47],
            ]
        ),
    },
)

# dlib's 150x150 chip (get_face_chip, padding 0.25, as dlib_face_recognition_resnet_model_v1 expects).
# Fitted by tools/fit_dlib_template.py: dlib's own HOG + 5-point shape predictor + get_face_chip on the
# shared identity photos, YuNet (FIVE) and BlazeFace (FOUR) landmarks mapped into dlib's chip and
# robustly averaged (116 photos; 106 and 110 faces kept). Descriptors of YuNet-aligned chips agree with
# those of dlib's own chips at mean cosine 0.993 (min 0.968).
DLIB_150 = ChipTemplate(
    name="dlib_150",
    size=150,
    points={
        LandmarkScheme.FIVE: np.array(
            [
                [45.70, 44.86],
                [101.55, 44.40],
                [73.85, 77.13],
                [49.51, 100.66],
                [98.92, 100.42],
            ]
        ),
        LandmarkScheme.FOUR: np.array(
            [
                [47.24, 48.02],
                [102.61, 48.08],
                [74.66, 80.04],
                [74.71, 106.61],
            ]
        ),
    },
)


def _umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (2x3) mapping src onto dst; the fallback when LMEDS finds no model."""
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / len(src)
    u, s, vt = np.linalg.svd(cov)
    d = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[1, 1] = -1
    rotation = u @ d @ vt
    var = (src_c**2).sum() / len(src)
    scale = (s * np.diag(d)).sum() / var if var > 0 else 1.0
    matrix = np.empty((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - scale * rotation @ src_mean
    return matrix


def estimate_transform(landmarks: np.ndarray, template_points: np.ndarray) -> np.ndarray:
    """2x3 similarity transform taking one face's landmarks (K, 2) onto the template points (K, 2)."""
    src = np.asarray(landmarks, dtype=np.float64).reshape(-1, 2)
    dst = np.asarray(template_points, dtype=np.float64).reshape(-1, 2)
    if src.shape != dst.shape:
        raise ValueError(f"landmarks {src.shape} and template points {dst.shape} differ in shape")
    matrix, _ = cv2.estimateAffinePartial2D(src, dst, method=cv2.LMEDS)
    if matrix is None or not np.isfinite(matrix).all():
        matrix = _umeyama(src, dst)
    return matrix


# Below this scale (chip pixels per image pixel) a single bilinear warp samples the face too sparsely
# and aliases (fine texture turns into noise the network reads as identity). Like dlib's own chip
# extraction, which goes down an image pyramid first, the region is first shrunk with area averaging to
# about chip resolution. Measured on the shared pairs (tools/degrade_pairs.py): ROC AUC clean
# 0.99993 -> 0.99996, JPEG 0.99960 -> 0.99964, rotated 0.99555 -> 0.99569, with BORDER_REPLICATE below.
_ANTIALIAS_BELOW = 0.75


def _warp_one(image_bgr: np.ndarray, matrix: np.ndarray, size: int, out: np.ndarray) -> None:
    scale = float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))
    source = image_bgr
    if scale < _ANTIALIAS_BELOW:
        # the part of the image the chip sees (chip corners mapped back), 2 px of context for the filter
        inverse = cv2.invertAffineTransform(matrix)
        corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], np.float64) @ inverse.T
        height, width = image_bgr.shape[:2]
        x0, y0 = np.maximum(np.floor(corners.min(0) - 2).astype(int), 0)
        x1, y1 = np.ceil(corners.max(0) + 2).astype(int)
        x1, y1 = min(int(x1), width), min(int(y1), height)
        if x1 - x0 >= 2 and y1 - y0 >= 2:
            w, h = x1 - x0, y1 - y0
            new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
            source = cv2.resize(image_bgr[y0:y1, x0:x1], (new_w, new_h), interpolation=cv2.INTER_AREA)
            fx, fy = new_w / w, new_h / h
            # cv2.resize maps pixel centres: image x = (small x + 0.5) / fx - 0.5 + x0
            linear = matrix[:, :2]
            shrunk = np.empty((2, 3))
            shrunk[:, 0] = linear[:, 0] / fx
            shrunk[:, 1] = linear[:, 1] / fy
            shrunk[:, 2] = matrix[:, 2] + linear @ np.array([0.5 / fx - 0.5 + x0, 0.5 / fy - 0.5 + y0])
            matrix = shrunk
    # Chip area outside the photo (a tightly cropped portrait): repeat the edge rather than paint it
    # black, so a crop's borders do not become a feature two unrelated tight crops share (measured:
    # ROC AUC on the clean pairs 0.99994 -> 0.99996, darkened copies 5 -> 3 wrong accepts).
    cv2.warpAffine(source, matrix, (size, size), dst=out, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def align_faces(image_bgr: np.ndarray, faces: Faces, template: ChipTemplate) -> np.ndarray:
    """Chips (N, S, S, 3) uint8 BGR, one per face, with the landmarks warped onto the template."""
    check_image(image_bgr)
    size = template.size
    chips = np.zeros((len(faces), size, size, 3), dtype=np.uint8)
    if len(faces) == 0:
        return chips
    points = template.points_for(faces.scheme)
    for i, landmarks in enumerate(faces.landmarks):
        _warp_one(image_bgr, estimate_transform(landmarks, points), size, chips[i])
    return chips


# A second look at each face, for tilted faces. YuNet's landmarks on a face turned in the image plane lean
# towards upright (a face of the shared photos turned 20 degrees reads as 0.6), so the chip keeps the
# tilt and the embedding drifts. Detecting again on a view cut with that first alignment (the chip's field
# doubled, the face centred at a fixed size) reads the tilt much better (that face: 11 of the 20 degrees).
# Measured with tools/chip_compare.py (variant redetect, zoom 2) on the shared 719 pairs, accuracy at the
# shipped threshold / ROC AUC: clean 99.30% / 0.99996 -> 99.58% / 0.99997; rotated 20 degrees 98.75% /
# 0.99569 -> 99.17% / 0.99679 (the rest is one photo whose largest face is the wrong person: without its
# 12 pairs 99.15% / 0.99973 -> 99.58% / 1.0); downscaled AUC 0.99990 -> 0.99996; JPEG, darkened and mixed
# copies unchanged in accuracy (AUC 0.99964 -> 0.99964, 0.99999 -> 1.0, 0.99630 -> 0.99653). It costs one
# detector run on a (2 * zoom * chip)-pixel square per face (about as much as embedding the face), hence
# opt-in.
REDETECT_ZOOM = 2.0


def redetect_landmarks(
    image_bgr: np.ndarray,
    faces: Faces,
    template: ChipTemplate,
    detect: Callable[[np.ndarray], Faces],
    zoom: float = REDETECT_ZOOM,
) -> Faces:
    """`faces` with each face's landmarks detected again on a view cut with its first alignment.

    `detect` is the detector that found `faces` (same landmark scheme). The view is the chip's field
    doubled (chip centre in the middle) at `zoom` view pixels per chip pixel; the face nearest the view's
    centre gives the new landmarks. A face the second look does not find keeps its landmarks.
    """
    check_image(image_bgr)
    if not zoom > 0:
        raise ValueError(f"redetect_landmarks: zoom must be > 0, got {zoom}")
    if len(faces) == 0:
        return faces
    points = template.points_for(faces.scheme)
    side = round(2 * template.size * zoom)
    view = np.empty((side, side, 3), np.uint8)
    landmarks = faces.landmarks.copy()
    for i, first in enumerate(faces.landmarks):
        to_view = estimate_transform(first, points) * zoom
        to_view[:, 2] += template.size * zoom / 2  # chip coordinates [-S/2, 3S/2] -> view [0, side]
        _warp_one(image_bgr, to_view, side, view)
        found = detect(view)
        if found.scheme != faces.scheme:
            raise ValueError(f"redetect_landmarks: detector gives {found.scheme.name} landmarks, faces have "
                             f"{faces.scheme.name}")
        if len(found) == 0:
            continue
        centres = (found.boxes[:, :2] + found.boxes[:, 2:]) / 2
        offset = np.sqrt(((centres - side / 2) ** 2).sum(1))
        best = int(np.argmin(offset))
        if offset[best] > side / 4:  # someone else in the view, not this face
            continue
        back = cv2.invertAffineTransform(to_view)
        landmarks[i] = found.landmarks[best] @ back[:, :2].T + back[:, 2]
    return Faces(boxes=faces.boxes, scores=faces.scores, landmarks=landmarks, scheme=faces.scheme,
                 track_ids=faces.track_ids)
