"""The onnxruntime wrapper: provider choice that is checked, batches of any size, clear load errors."""

from __future__ import annotations

import numpy as np
import pytest

from streamer.errors import ModelError
from streamer.models.runtime import OnnxModel, RuntimeOptions, available_devices


@pytest.fixture(scope="module")
def mobilefacenet(model_dir):
    return model_dir / "mobilefacenet.onnx"


def test_auto_uses_what_really_loaded(mobilefacenet):
    model = OnnxModel(mobilefacenet, RuntimeOptions(device="auto"))
    assert model.providers[-1] == "CPUExecutionProvider"  # the fallback is always there
    assert model.device == ("cuda" if model.providers[0] == "CUDAExecutionProvider" else "cpu")
    assert model.device in available_devices()


@pytest.mark.skipif("cuda" in available_devices(), reason="this machine has CUDA: the refusal cannot happen")
def test_cuda_demanded_without_cuda_is_an_error(mobilefacenet):
    with pytest.raises(ModelError, match="device=cuda.*CUDA did not load"):
        OnnxModel(mobilefacenet, RuntimeOptions(device="cuda"))


def test_batches_of_any_size_match_one_by_one(mobilefacenet):
    model = OnnxModel(mobilefacenet, RuntimeOptions(device="cpu"), max_batch=4)
    rng = np.random.default_rng(0)
    batch = rng.uniform(-1, 1, (10, 3, 112, 112)).astype(np.float32)
    whole = model.run(batch)[0]  # split into 4 + 4 + 2 internally
    singles = np.concatenate([model.run(batch[i : i + 1])[0] for i in range(10)])
    assert whole.shape == (10, 128)
    np.testing.assert_allclose(whole, singles, atol=1e-4)
    assert model.run(batch[:0])[0].shape[0] == 0


def test_load_errors_are_model_errors(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        OnnxModel(tmp_path / "missing.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00garbage" * 64)
    with pytest.raises(ModelError, match="corrupt or not ONNX"):
        OnnxModel(garbage)


def test_input_check_names_the_mismatch(mobilefacenet):
    model = OnnxModel(mobilefacenet, RuntimeOptions(device="cpu"))
    model.check_input((3, 112, 112))
    with pytest.raises(ModelError, match="expects input"):
        model.check_input((3, 150, 150))
