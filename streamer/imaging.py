"""Image helpers every stage shares: one guarded decoder, one input check, one array conversion, one JPEG
encoder, one face crop.

Kept here, not in a stage, because detectors, the engine, attribute heads, the publisher and the
detect worker all need exactly the same behaviour (and the same error text) for them.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import cv2
import numpy as np

from streamer.errors import InputError

JPEG_QUALITY = 90
CROP_MARGIN = 0.2  # share of the box added on each side of a published face crop
MAX_PIXELS_SETTING = "limits.max_image_pixels (STREAMER_LIMITS__MAX_IMAGE_PIXELS)"
NOT_AN_IMAGE = "not an image (or an unsupported/corrupt image file)"


def declared_size(data: bytes) -> tuple[int, str] | None:
    """How many pixels an encoded image declares in its header, read without decoding a pixel, and the
    same in words ("20000x20000 (400.0 megapixels)"); None when the bytes are not an image format Pillow
    knows (every format OpenCV reads except EXR, HDR and PFM).

    OpenCV has no header-only call: `cv2.imdecode` allocates the whole image first, so a 629-byte JPEG
    whose header says 20000x20000 costs 2.4 GB before anything can refuse it. Pillow's `Image.open` is lazy.
    Above twice its own MAX_IMAGE_PIXELS (about 179 megapixels, more than `limits.max_image_pixels` may
    be set to) Pillow refuses to say the size; the count is then that bound plus one.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        # Pillow warns above its own limit (89 MP), which a raised max_image_pixels may allow: the caller
        # decides, so the warning would only be noise on the user's terminal.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
    except Image.DecompressionBombError:
        bound = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        return bound + 1, f"more than {bound / 1e6:.0f} megapixels"
    except (UnidentifiedImageError, OSError, ValueError, EOFError, SyntaxError):
        return None
    return int(width) * int(height), f"{width}x{height} ({width * height / 1e6:.1f} megapixels)"


def decode_image(data: bytes, max_pixels: int, name: str = "<bytes>") -> np.ndarray:
    """A BGR uint8 image from encoded bytes (JPEG, PNG, WebP, BMP, TIFF, GIF, PNM...), refused with one
    InputError line, before any pixel is decoded, when its header declares more than `max_pixels` pixels.

    `name` (a path, usually) starts every message. The cap bounds memory: decoding costs 3 bytes a pixel
    whatever the file size, and a small file can declare any size.
    """
    declared = declared_size(data) if data else None
    if declared is None:
        raise InputError(f"{name}: {NOT_AN_IMAGE}")
    pixels, words = declared
    if pixels > max_pixels:
        raise InputError(
            f"{name}: image is {words}, over the limit of {max_pixels / 1e6:g} "
            f"megapixels set by {MAX_PIXELS_SETTING}: downscale it or raise the limit (decoding costs 3 MB "
            "per megapixel)"
        )
    try:
        decoded = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:
        # OpenCV's own guard (OPENCV_IO_MAX_IMAGE_PIXELS, read once when cv2 loads) or a decoder failure.
        decoded = None
    if decoded is None:
        raise InputError(f"{name}: {NOT_AN_IMAGE}")
    return decoded


def read_image(path: str | Path, max_pixels: int) -> np.ndarray:
    """`decode_image` of a file's bytes; InputError for a missing, unreadable or oversized file."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not an image")
    # Bytes, then imdecode, instead of imread: imread can't report why it failed and mishandles
    # non-ASCII paths on some platforms.
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    return decode_image(data, max_pixels, str(path))


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
