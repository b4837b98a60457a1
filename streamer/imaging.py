"""Image helpers every stage shares: one input check, one array conversion, one JPEG encoder, one face crop.

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


def check_image(image: object) -> np.ndarray:
    """`image` itself when it is a non-empty BGR uint8 (H, W, 3) array; ValueError stating expected and got.

    The one check behind every stage that takes a frame (detectors, attribute crops, the engine), so
    they all refuse the same inputs with the same words.
    """
    if not isinstance(image, np.ndarray):
        got = type(image).__name__
    elif image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or image.size == 0:
        got = f"{image.dtype} {image.shape}"
    else:
        return image
    # Both word orders appear because callers' messages have long used both ("uint8 BGR", "BGR uint8").
    raise ValueError(
        f"expected a uint8 BGR image: an (H, W, 3) array of BGR uint8 pixels with H, W > 0, got {got}"
    )


def as_bgr(array: object) -> np.ndarray:
    """A BGR uint8 (H, W, 3) image from a grey (H, W), BGRA (H, W, 4) or BGR uint8 array; ValueError otherwise.

    BGR input comes back as is (no copy); the other two are converted into a new array.
    """
    if not isinstance(array, np.ndarray):
        raise ValueError(f"image array must be a numpy array, got {type(array).__name__}")
    if array.dtype != np.uint8:
        raise ValueError(f"image array must be uint8, got {array.dtype}")
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ValueError(f"image array must be HxW, HxWx3 or HxWx4, got shape {array.shape}")
    if array.size == 0:
        # cv2.cvtColor fails on empty input with an opaque cv2.error; say what is wrong instead.
        raise ValueError(f"image array must not be empty, got shape {array.shape}")
    if array.ndim == 2:
        return cv2.cvtColor(array, cv2.COLOR_GRAY2BGR)
    if array.shape[2] == 4:
        return cv2.cvtColor(array, cv2.COLOR_BGRA2BGR)
    return array
