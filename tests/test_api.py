"""The Python API on real photos: what a program importing streamer gets."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import streamer
from streamer.config import load_settings
from streamer.engine import FaceEngine
from streamer.errors import InputError, NoFaceError
from streamer.match.gallery import Gallery


@pytest.fixture(scope="module")
def engine(model_dir, cache_dir):
    settings = load_settings(overrides={"model_dir": str(model_dir), "models": {"cache_dir": str(cache_dir)}})
    with FaceEngine(settings) as engine:
        yield engine


def test_import_loads_no_models_or_native_libraries():
    code = "import sys, streamer; print(sorted(m for m in ('cv2', 'mediapipe', 'onnxruntime', 'av') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_module_level_calls_use_the_default_engine(monkeypatch, engine, media_dir):
    monkeypatch.setattr(streamer, "_engine", engine)
    result = streamer.verify(media_dir / "deepface/img1.jpg", media_dir / "deepface/img2.jpg")
    assert result.verified and result.model == "dlib_resnet" and result.model_id == "dlib_resnet_v1"
    assert result.metric == "euclidean"
    faces, embeddings = streamer.represent(media_dir / "face_recognition/examples/two_people.jpg")
    assert len(faces) == 2 and embeddings.shape == (2, 128) and embeddings.dtype == np.float32


def test_arrays_in_any_common_layout(engine, media_dir):
    import cv2

    bgr = cv2.imread(str(media_dir / "deepface/img1.jpg"))
    gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    bgra = cv2.cvtColor(bgr, cv2.COLOR_BGR2BGRA)
    counts = {len(engine.detect(image)) for image in (bgr, gray, bgra)}
    assert counts == {len(engine.detect(bgr))} and len(engine.detect(bgr)) >= 1
    with pytest.raises(InputError, match="uint8"):
        engine.detect(bgr.astype(np.float32))


def test_find_against_a_gallery(monkeypatch, engine, media_dir, tmp_path):
    path = tmp_path / "g.db"
    with Gallery(path) as gallery:
        engine.enroll(gallery, "obama", [media_dir / "face_recognition/examples/obama.jpg"])
        engine.enroll(gallery, "biden", [media_dir / "face_recognition/examples/biden.jpg"])
    monkeypatch.setattr(streamer, "_engine", engine)
    faces = streamer.find(media_dir / "face_recognition/examples/two_people.jpg", gallery=path)
    assert sorted(f.name for f in faces) == ["biden", "obama"]
    with Gallery(path, create=False) as gallery:
        alone = engine.find(media_dir / "face_recognition/examples/obama2.jpg", gallery)
    assert [f.name for f in alone] == ["obama"]
    assert all(0.5 < f.score <= 1 and f.distance < 0.6 and 0 < f.detection_score <= 1 for f in faces)
    by_path = engine.find(media_dir / "face_recognition/examples/obama2.jpg", str(path))  # a path works too
    assert [(f.name, f.box) for f in by_path] == [(f.name, f.box) for f in alone]


def test_enrollment_fails_whole_when_one_photo_has_no_face(engine, media_dir, tmp_path):
    import cv2

    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.zeros((300, 300, 3), np.uint8))
    with Gallery(tmp_path / "g.db") as gallery:
        with pytest.raises(NoFaceError, match="blank.png"):
            engine.enroll(gallery, "obama", [media_dir / "face_recognition/examples/obama.jpg", blank])
        assert gallery.people() == []


def test_analyze_gives_typed_attributes(engine, media_dir):
    faces = engine.analyze(media_dir / "deepface/img41.jpg")  # George Clooney per the attribute spec
    face = max(faces, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))
    assert face.attributes.gender.label == "man" and face.attributes.gender.probability > 0.5
    assert 30 < face.attributes.age < 80
    assert abs(sum(face.attributes.emotion.scores.values()) - 1) < 1e-3


def test_engine_and_gallery_import_from_the_package():
    from streamer import FaceEngine as PackageEngine, Gallery as PackageGallery

    assert PackageEngine is FaceEngine and PackageGallery is Gallery
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        streamer.Nope  # noqa: B018
