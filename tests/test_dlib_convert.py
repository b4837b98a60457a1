"""The dlib ResNet converter: same descriptors as dlib itself, and clear errors for damaged files."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from streamer.errors import ModelError
from streamer.models.convert import dlib_resnet
from streamer.models.registry import get_spec
from streamer.models.runtime import OnnxModel

log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def dat_path(registry) -> Path:
    return registry.source("dlib_resnet")


@pytest.fixture(scope="module")
def onnx_model(registry) -> OnnxModel:
    return OnnxModel(registry.resolve("dlib_resnet"), name="dlib_resnet")


@pytest.fixture(scope="module")
def dlib_chips(model_dir, media_dir) -> np.ndarray:
    """Chips cut by dlib's own pipeline (HOG + 5-point predictor + get_face_chip), plus hard cases."""
    dlib = pytest.importorskip("dlib", reason="dlib-bin (test extra) is needed to compare with dlib itself")
    import cv2
    import face_recognition_models

    predictor = dlib.shape_predictor(
        str(Path(face_recognition_models.__file__).parent / "models" / "shape_predictor_5_face_landmarks.dat")
    )
    hog = dlib.get_frontal_face_detector()
    chips = []
    for path in (
        model_dir / "testdata" / "astronaut.png",
        media_dir / "openface" / "images" / "examples" / "clapton-2.jpg",
        media_dir / "face_recognition" / "examples" / "knn_examples" / "train" / "rose_leslie" / "img2.jpg",
    ):
        rgb = np.ascontiguousarray(cv2.imread(str(path))[:, :, ::-1])
        rects = hog(rgb, 0)
        assert rects, f"dlib's HOG found no face in {path}"
        for rect in rects:  # astronaut also gives a false positive on the mission patch: a fine input too
            chips.append(np.asarray(dlib.get_face_chip(rgb, predictor(rgb, rect), 150, 0.25)))
    chips.append(chips[0][:, ::-1])  # mirror image
    chips.append(np.random.default_rng(0).integers(0, 256, (150, 150, 3), dtype=np.uint8))  # noise
    return np.ascontiguousarray(np.stack(chips))


def test_hard_coded_architecture_matches_the_file_structure():
    assert dlib_resnet.expected_wrapper_codes() == dlib_resnet.EXPECTED_WRAPPER_CODES
    kinds = [t[0] for t in dlib_resnet.ARCHITECTURE]
    assert kinds.count("con") == 29 and kinds.count("add_prev") == 14 and kinds.count("fc") == 1


def test_parse_reads_the_stored_settings(dat_path):
    net = dlib_resnet.parse(dat_path)
    assert net.size == (150, 150)
    np.testing.assert_allclose(net.channel_means, (122.782, 117.001, 104.298), atol=1e-4)
    assert net.distance_threshold == pytest.approx(0.6) and net.margin == pytest.approx(0.04)
    assert len(net.layers) == 108


def test_converted_model_has_the_declared_interface(onnx_model):
    assert onnx_model.input_name == dlib_resnet.INPUT_NAME
    assert onnx_model.input_shape[1:] == (150, 150, 3) and not isinstance(onnx_model.input_shape[0], int)
    assert onnx_model.output_names == [dlib_resnet.OUTPUT_NAME]
    meta = onnx_model.session.get_modelmeta().custom_metadata_map
    assert float(meta[dlib_resnet.META_THRESHOLD]) == 0.6
    assert meta["source_sha256"] == get_spec("dlib_resnet").sha256
    assert dlib_resnet.read_threshold(onnx_model.path) == 0.6


def test_descriptors_match_dlib(dat_path, onnx_model, dlib_chips, record_property):
    import dlib

    reference = np.array(
        [dlib.face_recognition_model_v1(str(dat_path)).compute_face_descriptor(c) for c in dlib_chips],
        dtype=np.float32,
    )
    ours = onnx_model.run(dlib_chips.astype(np.float32))[0]
    max_abs = float(np.abs(ours - reference).max())
    record_property("max_abs_diff_vs_dlib", max_abs)
    log.info("converted dlib ResNet vs dlib on %d chips: max abs diff %.3g", len(dlib_chips), max_abs)
    assert max_abs < 5e-6, f"max abs difference vs dlib {max_abs:.3g}"
    # not normalised: dlib's Euclidean threshold applies to raw descriptors
    assert np.all(np.linalg.norm(ours[:-1], axis=1) > 1.0)


def test_batch_rows_are_independent(onnx_model, dlib_chips):
    batch = onnx_model.run(dlib_chips.astype(np.float32))[0]
    single = np.concatenate([onnx_model.run(c[None].astype(np.float32))[0] for c in dlib_chips[:3]])
    np.testing.assert_allclose(batch[:3], single, atol=1e-5)


def _damaged(data: bytes, how: str) -> bytes:
    if how == "truncated":
        return data[: len(data) // 2]
    if how == "trailing bytes":
        return data + b"\x01\x00"
    if how == "empty":
        return b""
    if how == "wrong structure":
        # the first wrapper code after the loss layer (a 2) turned into a 1: tag/skip where a layer is
        pos = data.index(b"loss_metric_2") + len(b"loss_metric_2") + 12  # margin and threshold: 6 bytes each
        assert data[pos : pos + 2] == b"\x01\x02"
        return data[:pos] + b"\x01\x01" + data[pos + 2 :]
    if how == "not dlib":
        return b"\x89PNG\r\n\x1a\n" + data[8:]
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated", "trailing bytes", "empty", "wrong structure", "not dlib"])
def test_damaged_file_raises_model_error(dat_path, tmp_path, how):
    bad = tmp_path / "bad.dat"
    bad.write_bytes(_damaged(dat_path.read_bytes(), how))
    with pytest.raises(ModelError, match="bad.dat"):
        dlib_resnet.convert(bad, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()
