"""The Keras .h5 -> ONNX converters against the TensorFlow outputs stored in keras_reference.npz."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import onnx
import pytest

from streamer.errors import ModelError
from streamer.models.convert.keras_h5 import convert_mini_xception, convert_ssrnet_age
from streamer.models.registry import MODELS, ModelRegistry
from streamer.models.runtime import OnnxModel, RuntimeOptions

# model name -> (reference input key, reference output key, output width, tolerance)
# Tolerances: float32 accumulation-order noise between onnxruntime and TF (probabilities; age in years).
CASES = {
    "emotion": ("emotion_input", "emotion_output", 7, 1e-5),
    "gender": ("gender_input", "gender_output", 2, 1e-5),
    "age": ("age_input", "age_output", 1, 1e-4),
}


@pytest.fixture(scope="module")
def reference(model_dir):
    with np.load(model_dir / "testdata" / "keras_reference.npz") as data:
        return {key: data[key] for key in data.files}


@pytest.mark.parametrize("name", list(CASES))
def test_parity_with_keras(name, registry, reference):
    input_key, output_key, width, tolerance = CASES[name]
    model = OnnxModel(registry.resolve(name), RuntimeOptions(device="cpu"), name=name)
    (out,) = model.run(reference[input_key])
    expected = reference[output_key]
    assert out.shape == expected.shape == (67, width)
    diff = np.abs(out - expected)
    print(f"{name}: max abs diff {diff.max():.3g}, mean {diff.mean():.3g} over {len(out)} faces")
    assert diff.max() <= tolerance
    if width > 1:
        assert np.array_equal(out.argmax(axis=1), expected.argmax(axis=1))


@pytest.mark.parametrize("name", list(CASES))
def test_graph_is_clean_nhwc_and_batch_dynamic(name, registry, reference):
    path = registry.resolve(name)
    graph_model = onnx.load(str(path))
    onnx.checker.check_model(graph_model, full_check=True)
    assert graph_model.opset_import[0].version == 17
    (graph_input,) = graph_model.graph.input
    dims = [d.dim_param or d.dim_value for d in graph_input.type.tensor_type.shape.dim]
    channels = 3 if name == "age" else 1
    assert graph_input.name == "input" and dims == ["N", 64, 64, channels]
    assert graph_model.graph.node[0].op_type == "Transpose"

    model = OnnxModel(path, RuntimeOptions(device="cpu"), name=name)
    batch = reference[CASES[name][0]][:5]
    (together,) = model.run(batch)
    one_by_one = np.concatenate([model.run(batch[i : i + 1])[0] for i in range(len(batch))])
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)
    (empty,) = model.session.run(None, {"input": batch[:0]})
    assert empty.shape == (0, CASES[name][2])


def test_converted_files_are_cached(registry):
    first = registry.resolve("emotion")
    mtime = first.stat().st_mtime_ns
    assert registry.resolve("emotion") == first and first.stat().st_mtime_ns == mtime


# -- files that must be refused ---------------------------------------------------------------


def test_corrupt_file_is_refused(model_dir, tmp_path):
    source = tmp_path / "emotion.hdf5"
    data = bytearray((model_dir / MODELS["emotion"].filename).read_bytes())
    data[len(data) // 2] ^= 0xFF
    source.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256"):
        convert_mini_xception(source, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize(
    "convert, wrong",
    [(convert_mini_xception, "age"), (convert_ssrnet_age, "gender"), (convert_ssrnet_age, "mobilefacenet")],
)
def test_other_models_are_refused(convert, wrong, model_dir, tmp_path):
    with pytest.raises(ModelError, match="sha256"):
        convert(model_dir / MODELS[wrong].filename, tmp_path / "out.onnx")


def test_not_hdf5_is_refused_even_without_the_hash_check(tmp_path):
    source = tmp_path / "junk.h5"
    source.write_bytes(b"this is not hdf5" * 100)
    with pytest.raises(ModelError, match="HDF5"):
        convert_mini_xception(source, tmp_path / "out.onnx", allowed_sha256=None)
    with pytest.raises(ModelError, match="not found"):
        convert_ssrnet_age(tmp_path / "missing.h5", tmp_path / "out.onnx")


def test_unknown_layer_is_refused(model_dir, tmp_path):
    source = tmp_path / "gender.hdf5"
    shutil.copy(model_dir / MODELS["gender"].filename, source)
    with h5py.File(source, "r+") as h5:
        config = json.loads(h5.attrs["model_config"])
        config["config"]["layers"][3]["class_name"] = "LeakyReLU"  # activation_1
        h5.attrs["model_config"] = json.dumps(config)
    with pytest.raises(ModelError, match="LeakyReLU"):
        convert_mini_xception(source, tmp_path / "out.onnx", allowed_sha256=None)


def test_swapped_weight_shapes_are_refused(model_dir, tmp_path):
    source = tmp_path / "age.h5"
    shutil.copy(model_dir / MODELS["age"].filename, source)
    with h5py.File(source, "r+") as h5:
        del h5["dense_3/dense_3/kernel:0"]
        h5["dense_3/dense_3/kernel:0"] = np.zeros((6, 3), np.float32)  # expected (3, 6)
    with pytest.raises(ModelError, match="dense_3"):
        convert_ssrnet_age(source, tmp_path / "out.onnx", allowed_sha256=None)


def test_registry_reports_a_bad_explicit_file(model_dir, tmp_path):
    bad = tmp_path / "my_emotion.hdf5"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)
    registry = ModelRegistry(model_dir=model_dir, cache_dir=tmp_path / "cache", paths={"emotion": bad})
    with pytest.raises(ModelError, match="mini_XCEPTION"):
        registry.resolve("emotion")
    assert not list((tmp_path / "cache").rglob("*.onnx"))
