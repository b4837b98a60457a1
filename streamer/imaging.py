"""Image helpers every stage shares: one input check, one JPEG encoder, one face crop.

Kept here, not in a stage, because detectors, the engine, attribute heads, the publisher and the
detect worker all need exactly the same behaviour (and the same error text) for them.
"""

from __future__ import annotations

import cv2
import numpy as np

JPEG_QUALITY = 90
CROP_MARGIN = 0.2  # share of the box added on each side of a published face crop


def encode_jpeg(image: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """JPEG bytes of a non-empty uint8 grey or BGR image; ValueError otherwise."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim not in (2, 3) or image.size == 0:
        shape = getattr(image, "shape", type(image).__name__)
        dtype = getattr(image, "dtype", "")
        raise ValueError(f"expected a non-empty uint8 grey or BGR image, got {dtype} {shape}")
    ok, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError(f"JPEG encoding failed for an image of shape {image.shape}")
    return buffer.tobytes()


def face_crop(image: np.ndarray, box: np.ndarray, margin: float = CROP_MARGIN) -> np.ndarray:
    """The face in `box` (x1, y1, x2, y2) with `margin` of its size added on each side, clipped to the
    image; never empty (at least one pixel)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    mx, my = (x2 - x1) * margin, (y2 - y1) * margin
    h, w = image.shape[:2]
    left, top = int(max(0, min(w - 1, x1 - mx))), int(max(0, min(h - 1, y1 - my)))
    right, bottom = int(min(w, x2 + mx)), int(min(h, y2 + my))
    return image[top : max(bottom, top + 1), left : max(right, left + 1)]
