"""The shared image helpers: the one input check, the array conversion, JPEG encoding and face crops."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from streamer.engine import load_image
from streamer.errors import InputError
from streamer.imaging import as_bgr, check_image, encode_jpeg, face_crop


def _scene(height: int = 48, width: int = 64) -> np.ndarray:
    """A BGR image with different values per pixel and channel, so a wrong conversion shows."""
    y, x = np.mgrid[0:height, 0:width]
    return np.dstack([x * 3 % 256, y * 5 % 256, (x + y) % 256]).astype(np.uint8)


# -- check_image --------------------------------------------------------------------------------


def test_check_image_returns_a_valid_image_itself():
    image = _scene()
    assert check_image(image) is image
    assert check_image(np.zeros((1, 1, 3), np.uint8)).shape == (1, 1, 3)


@pytest.mark.parametrize(
    ("bad", "got"),
    [
        (np.zeros((8, 8, 3), np.float32), "float32 (8, 8, 3)"),
        (np.zeros((8, 8), np.uint8), "uint8 (8, 8)"),
        (np.zeros((8, 8, 4), np.uint8), "uint8 (8, 8, 4)"),
        (np.zeros((8, 8, 1), np.uint8), "uint8 (8, 8, 1)"),
        (np.zeros((0, 8, 3), np.uint8), "uint8 (0, 8, 3)"),
        (np.zeros((2, 8, 8, 3), np.uint8), "uint8 (2, 8, 8, 3)"),
        ([[0, 0, 0]], "list"),
        (None, "NoneType"),
    ],
    ids=["float32", "grey", "bgra", "one-channel", "empty", "batch", "list", "none"],
)
def test_check_image_names_expected_and_actual(bad, got):
    with pytest.raises(ValueError) as info:
        check_image(bad)
    message = str(info.value)
    assert "expected a uint8 BGR image" in message and "(H, W, 3)" in message
    assert message.endswith(f"got {got}")


# -- as_bgr -------------------------------------------------------------------------------------


def test_as_bgr_passes_bgr_through_without_a_copy():
    image = _scene()
    assert as_bgr(image) is image


def test_as_bgr_converts_grey_and_bgra():
    bgr = _scene()
    grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    from_grey = as_bgr(grey)
    assert from_grey.shape == bgr.shape and from_grey.dtype == np.uint8
    assert all(np.array_equal(from_grey[:, :, c], grey) for c in range(3))
    bgra = np.dstack([bgr, np.full(bgr.shape[:2], 7, np.uint8)])
    np.testing.assert_array_equal(as_bgr(bgra), bgr)  # alpha dropped, colours untouched
    # whatever as_bgr returns passes the one check every stage applies
    for array in (bgr, grey, bgra):
        check_image(as_bgr(array))


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.zeros((8, 8, 3), np.float32), "image array must be uint8, got float32"),
        (np.zeros((8, 8, 3), np.uint16), "image array must be uint8, got uint16"),
        (np.zeros((8, 8, 2), np.uint8), r"image array must be HxW, HxWx3 or HxWx4, got shape \(8, 8, 2\)"),
        (np.zeros(8, np.uint8), r"image array must be HxW, HxWx3 or HxWx4, got shape \(8,\)"),
        (np.zeros((0, 8), np.uint8), r"image array must not be empty, got shape \(0, 8\)"),
        (np.zeros((8, 0, 4), np.uint8), r"image array must not be empty, got shape \(8, 0, 4\)"),
        ([[1, 2], [3, 4]], "image array must be a numpy array, got list"),
    ],
    ids=["float32", "uint16", "two-channel", "1-d", "empty-grey", "empty-bgra", "list"],
)
def test_as_bgr_rejects_with_expected_and_actual(bad, message):
    with pytest.raises(ValueError, match=message):
        as_bgr(bad)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.zeros((8, 8, 3), np.float32), "image array must be uint8, got float32"),
        (np.zeros((8, 8, 5), np.uint8), r"image array must be HxW, HxWx3 or HxWx4, got shape \(8, 8, 5\)"),
        (np.zeros((0, 8, 3), np.uint8), "image array must not be empty"),
    ],
    ids=["dtype", "shape", "empty"],
)
def test_engine_load_image_reports_bad_arrays_as_input_errors(bad, message):
    with pytest.raises(InputError, match=message):
        load_image(bad)


def test_engine_load_image_converts_arrays_like_as_bgr():
    bgr = _scene()
    assert load_image(bgr) is bgr
    grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    np.testing.assert_array_equal(load_image(grey), as_bgr(grey))


# -- encode_jpeg and face_crop ------------------------------------------------------------------


def test_encode_jpeg_round_trips_grey_and_bgr():
    for image in (_scene(), _scene()[:, :, 0]):
        data = encode_jpeg(image)
        assert data[:2] == b"\xff\xd8"  # JPEG start-of-image marker
        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        assert decoded.shape == image.shape
    with pytest.raises(ValueError, match="expected a non-empty uint8 grey or BGR image"):
        encode_jpeg(np.zeros((0, 4, 3), np.uint8))


@pytest.mark.parametrize(
    ("box", "shape"),
    [
        ((10, 10, 30, 30), (28, 28)),  # 20 px face + 20 % margin (4 px) each side
        ((-50, -50, -10, -10), (1, 1)),  # entirely off the image: still one pixel
        ((0, 0, 64, 48), (48, 64)),  # margin clipped to the image
    ],
    ids=["inside", "outside", "whole"],
)
def test_face_crop_adds_margin_and_is_never_empty(box, shape):
    crop = face_crop(_scene(), np.asarray(box, np.float32))
    assert crop.shape[:2] == shape
