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
FONT = cv2.FONT_HERSHEY_SIMPLEX

# A blurred face keeps about this many samples across its longer side: unrecognisable, still face-shaped.
_BLUR_SAMPLES = 12


@dataclass(frozen=True)
class FaceLabel:
    """What to write next to one face."""

    track: int
    name: str | None
    age: float | None
    gender: str | None
    emotion: str | None
    known: bool

    def lines(self) -> list[str]:
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
    labels: Sequence[FaceLabel],
    blur_mask: np.ndarray | Sequence[bool] | None = None,
    *,
    blur_method: Literal["gaussian", "pixelate"] = "gaussian",
) -> np.ndarray:
    """An annotated copy: faces in `blur_mask` blurred first (e.g. unknown faces under --blur-unknown),
    then every face boxed and labelled with track id, name or "unknown", age, gender and emotion."""
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
    for box, label in zip(boxes, labels):
        x1, y1, x2, y2 = _pixel_box(box, out.shape)
        if x2 <= x1 or y2 <= y1:
            continue
        colour = KNOWN_COLOUR if label.known else UNKNOWN_COLOUR
        cv2.rectangle(out, (x1, y1), (x2 - 1, y2 - 1), colour, thickness)
        _draw_label(out, label.lines(), x1, y1, y2, colour, font_scale, thickness)
    return out


def _draw_label(
    image: np.ndarray,
    lines: list[str],
    x: int,
    box_top: int,
    box_bottom: int,
    colour: tuple[int, int, int],
    font_scale: float,
    thickness: int,
) -> None:
    sizes = [cv2.getTextSize(line, FONT, font_scale, thickness) for line in lines]
    line_height = max(h + base for (_, h), base in sizes) + 2 * thickness
    block_height = line_height * len(lines)
    block_width = max(w for (w, _), _ in sizes) + 4 * thickness
    # Above the box when there is room, below it otherwise (faces at the top edge).
    top = box_top - block_height if box_top - block_height >= 0 else min(box_bottom, image.shape[0] - block_height)
    x = min(max(0, x), max(0, image.shape[1] - block_width))
    cv2.rectangle(image, (x, top), (x + block_width, top + block_height), colour, cv2.FILLED)
    for i, (line, ((_, text_height), baseline)) in enumerate(zip(lines, sizes)):
        y = top + i * line_height + thickness + text_height
        cv2.putText(image, line, (x + 2 * thickness, y), FONT, font_scale, TEXT_COLOUR, thickness, cv2.LINE_AA)
