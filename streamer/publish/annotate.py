"""Drawing on frames for the annotated video and the preview: boxes with labels, and face blurring.

Functions return annotated copies; the frame that other stages hold is never drawn on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

from streamer.imaging import check_image

KNOWN_COLOUR = (60, 200, 60)  # BGR
UNKNOWN_COLOUR = (0, 140, 255)
TEXT_COLOUR = (0, 0, 0)
FAINT_COLOUR = (200, 200, 200)  # detections without a confirmed track
FAINT_ALPHA = 0.4
FONT = cv2.FONT_HERSHEY_SIMPLEX

# A blurred face keeps about this many samples across its longer side: unrecognisable, still face-shaped.
_BLUR_SAMPLES = 12


@dataclass(frozen=True)
class FaceLabel:
    """What to write next to one face. `anonymous`: only "unknown" is written (a blurred face must not
    be described: its age, gender or emotion would reveal what the blurring hides)."""

    track: int
    name: str | None
    age: float | None
    gender: str | None
    emotion: str | None
    known: bool
    anonymous: bool = False

    def redacted(self) -> FaceLabel:
        """The label of a face that is blurred: "unknown", nothing else."""
        return FaceLabel(self.track, None, None, None, None, False, anonymous=True)

    def lines(self) -> list[str]:
        if self.anonymous:
            return ["unknown"]
        head = f"#{self.track} {self.name if self.known and self.name else 'unknown'}"
        details = [
            part
            for part in (
                None if self.age is None else f"{self.age:.0f}y",
                self.gender,
                self.emotion,
            )
            if part
        ]
        return [head, " ".join(details)] if details else [head]


def _check_boxes(boxes: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    array = np.asarray(boxes, dtype=np.float32)
    if array.size == 0:
        return array.reshape(0, 4)
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(f"boxes: expected shape (N, 4) x1,y1,x2,y2, got {array.shape}")
    return array


def _pixel_box(box: np.ndarray, shape: tuple[int, ...], margin: float = 0.0) -> tuple[int, int, int, int]:
    """`box` grown by `margin` of its size on every side, rounded outwards and clipped to the image."""
    x1, y1, x2, y2 = (float(v) for v in box)
    dx, dy = (x2 - x1) * margin, (y2 - y1) * margin
    height, width = shape[:2]
    return (
        max(0, int(np.floor(x1 - dx))),
        max(0, int(np.floor(y1 - dy))),
        min(width, int(np.ceil(x2 + dx))),
        min(height, int(np.ceil(y2 + dy))),
    )


def _blur_into(
    image: np.ndarray, boxes: np.ndarray, margin: float, method: Literal["gaussian", "pixelate"]
) -> None:
    for box in boxes:
        x1, y1, x2, y2 = _pixel_box(box, image.shape, margin)
        w, h = x2 - x1, y2 - y1
        if w <= 0 or h <= 0:
            continue
        roi = image[y1:y2, x1:x2]
        # Downsample first: the detail is destroyed for good (no deconvolution can bring it back) and the
        # cost no longer grows with the kernel a full-size blur of a large face would need.
        scale = _BLUR_SAMPLES / max(w, h)
        small_size = (max(1, round(w * scale)), max(1, round(h * scale)))
        small = cv2.resize(roi, small_size, interpolation=cv2.INTER_AREA)
        if method == "pixelate":
            roi[:] = cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)
        else:
            small = cv2.GaussianBlur(small, (0, 0), sigmaX=1.5, borderType=cv2.BORDER_REPLICATE)
            roi[:] = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def blur_faces(
    image: np.ndarray,
    boxes: np.ndarray | Sequence[Sequence[float]],
    margin: float = 0.15,
    method: Literal["gaussian", "pixelate"] = "gaussian",
) -> np.ndarray:
    """A copy of `image` (BGR uint8) with every box, grown by `margin` of its size, made unrecognisable."""
    check_image(image)
    if method not in ("gaussian", "pixelate"):
        raise ValueError(f"method: expected 'gaussian' or 'pixelate', got {method!r}")
    if margin < 0:
        raise ValueError(f"margin: expected >= 0, got {margin}")
    out = image.copy()
    _blur_into(out, _check_boxes(boxes), margin, method)
    return out


def draw_faces(
    image_bgr: np.ndarray,
    boxes: np.ndarray | Sequence[Sequence[float]],
    labels: Sequence[FaceLabel | None],
    blur_mask: np.ndarray | Sequence[bool] | None = None,
    *,
    blur_method: Literal["gaussian", "pixelate"] = "gaussian",
) -> np.ndarray:
    """An annotated copy: faces in `blur_mask` blurred first (e.g. unknown faces under --blur-unknown),
    then every face boxed and labelled with track id, name or "unknown", age, gender and emotion.

    A face whose label is None (a detection without a confirmed track yet) gets a thin, dim outline and
    no label. Labels go above their box, else below, beside or inside it: wherever they cover no other
    face (and, where possible, no other label) and stay in the image."""
    check_image(image_bgr)
    boxes = _check_boxes(boxes)
    if len(labels) != len(boxes):
        raise ValueError(f"labels: expected one per box ({len(boxes)}), got {len(labels)}")
    out = image_bgr.copy()
    if blur_mask is not None:
        mask = np.asarray(blur_mask, dtype=bool).reshape(-1)
        if mask.shape != (len(boxes),):
            raise ValueError(f"blur_mask: expected shape ({len(boxes)},), got {mask.shape}")
        _blur_into(out, boxes[mask], 0.15, blur_method)

    height, width = out.shape[:2]
    thickness = max(1, round(min(height, width) / 360))
    font_scale = 0.45 * thickness
    pixel_boxes = [_pixel_box(box, out.shape) for box in boxes]
    for (x1, y1, x2, y2), label in zip(pixel_boxes, labels):
        if label is None and x2 > x1 and y2 > y1:
            _draw_faint_box(out, x1, y1, x2, y2)
    placed: list[tuple[int, int, int, int]] = []
    for index, ((x1, y1, x2, y2), label) in enumerate(zip(pixel_boxes, labels)):
        if label is None or x2 <= x1 or y2 <= y1:
            continue
        colour = KNOWN_COLOUR if label.known else UNKNOWN_COLOUR
        cv2.rectangle(out, (x1, y1), (x2 - 1, y2 - 1), colour, thickness)
        others = [box for other, box in enumerate(pixel_boxes) if other != index]
        placed.append(_draw_label(out, label.lines(), (x1, y1, x2, y2), others, placed, colour, font_scale,
                                  thickness))
    return out


def _draw_faint_box(image: np.ndarray, x1: int, y1: int, x2: int, y2: int) -> None:
    """A one-pixel outline blended at FAINT_ALPHA: visible as "a face is here", not as a result."""
    roi = image[y1:y2, x1:x2]
    outline = roi.copy()
    cv2.rectangle(outline, (0, 0), (x2 - x1 - 1, y2 - y1 - 1), FAINT_COLOUR, 1)
    cv2.addWeighted(outline, FAINT_ALPHA, roi, 1 - FAINT_ALPHA, 0, dst=roi)


Rect = tuple[int, int, int, int]  # x1, y1, x2, y2 (exclusive)


def _overlap(a: Rect, b: Rect) -> int:
    return max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))


def place_label(
    size: tuple[int, int],
    box: Rect,
    faces: Sequence[Rect],
    image_shape: tuple[int, ...],
    labels: Sequence[Rect] = (),
) -> Rect:
    """Where to put a label block of `size` (width, height) for the face `box`: the first of above,
    below, right of, left of, inside the top, inside the bottom of the box that stays in the image and
    covers none of the other `faces`; among those, one that covers none of the `labels` already placed.
    When every placement covers some face, the one covering the least."""
    w, h = size
    height, width = image_shape[:2]
    x1, y1, x2, y2 = box
    along_x = min(max(0, x1), max(0, width - w))  # above/below/inside: aligned with the box, kept in the image
    along_y = min(max(0, y1), max(0, height - h))  # beside: aligned with the top of the box
    candidates = [
        (along_x, y1 - h),  # above
        (along_x, y2),  # below
        (x2, along_y),  # right
        (x1 - w, along_y),  # left
        (along_x, y1),  # inside, at the top
        (along_x, y2 - h),  # inside, at the bottom
    ]
    best: tuple[tuple[int, int, int], Rect] | None = None
    for order, (x, y) in enumerate(candidates):
        rect = (x, y, x + w, y + h)
        if x < 0 or y < 0 or x + w > width or y + h > height:
            continue
        score = (sum(_overlap(rect, f) for f in faces), sum(_overlap(rect, r) for r in labels), order)
        if best is None or score < best[0]:
            best = score, rect
    if best is not None:
        return best[1]
    # Larger than the room anywhere around the box: as near the top of it as the image allows.
    y = min(max(0, y1 - h), max(0, height - h))
    return along_x, y, along_x + w, y + h


def _draw_label(
    image: np.ndarray,
    lines: list[str],
    box: Rect,
    faces: Sequence[Rect],
    labels: Sequence[Rect],
    colour: tuple[int, int, int],
    font_scale: float,
    thickness: int,
) -> Rect:
    sizes = [cv2.getTextSize(line, FONT, font_scale, thickness) for line in lines]
    line_height = max(h + base for (_, h), base in sizes) + 2 * thickness
    block_height = line_height * len(lines)
    block_width = max(w for (w, _), _ in sizes) + 4 * thickness
    rect = place_label((block_width, block_height), box, faces, image.shape, labels)
    x, top = rect[:2]
    cv2.rectangle(image, (x, top), (rect[2] - 1, rect[3] - 1), colour, cv2.FILLED)
    for i, (line, ((_, text_height), baseline)) in enumerate(zip(lines, sizes)):
        y = top + i * line_height + thickness + text_height
        cv2.putText(image, line, (x + 2 * thickness, y), FONT, font_scale, TEXT_COLOUR, thickness, cv2.LINE_AA)
    return rect
