"""Alignment geometry and the embedders on real photos (detection through cv2.FaceDetectorYN directly)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from streamer.errors import ConfigError, ModelError
from streamer.infer.align import (
    ARCFACE_112,
    DLIB_150,
    ChipTemplate,
    align_faces,
    estimate_transform,
    redetect_landmarks,
)
from streamer.infer.chips import ChipPreparer
from streamer.infer.embedders import (
    ArcFaceEmbedder,
    DlibResNetEmbedder,
    EmbedderSpec,
    create_embedder,
    embedder_spec,
)
from streamer.models.registry import ModelRegistry
from streamer.models.runtime import OnnxModel
from streamer.types import Faces, LandmarkScheme

# Two photos each of five people (distinct photos, not resized copies).
PEOPLE = {
    "obama": ("face_recognition/examples/obama.jpg", "face_recognition/tests/test_images/obama3.jpg"),
    "biden": ("face_recognition/examples/biden.jpg", "face_recognition/examples/knn_examples/train/biden/biden2.jpg"),
    "lennon": ("openface/images/examples/lennon-1.jpg", "openface/images/examples/lennon-2.jpg"),
    "clapton": ("openface/images/examples/clapton-1.jpg", "openface/images/examples/clapton-2.jpg"),
    "rose_leslie": (
        "face_recognition/examples/knn_examples/train/rose_leslie/img1.jpg",
        "face_recognition/examples/knn_examples/train/rose_leslie/img2.jpg",
    ),
}


def _yunet_faces(detector, image: np.ndarray) -> Faces:
    """YuNet on a copy shrunk to a longer side of 640 (big faces come out weak at full size)."""
    scale = min(1.0, 640 / max(image.shape[:2]))
    small = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else image
    detector.setInputSize((small.shape[1], small.shape[0]))
    _, found = detector.detect(small)
    found = np.zeros((0, 15), np.float32) if found is None else found
    faces = Faces(
        boxes=np.c_[found[:, :2], found[:, :2] + found[:, 2:4]],
        scores=found[:, 14],
        landmarks=found[:, 4:14].reshape(-1, 5, 2),
    )
    return faces.scaled(1 / scale)


@pytest.fixture(scope="module")
def photos(model_dir, media_dir) -> list[tuple[str, np.ndarray, Faces]]:
    """(person, image, largest YuNet face) for every photo in PEOPLE."""
    detector = cv2.FaceDetectorYN.create(
        str(model_dir / "face_detection_yunet_2026may.onnx"), "", (320, 320), 0.5, 0.3, 5000
    )
    out = []
    for person, files in PEOPLE.items():
        for name in files:
            image = cv2.imread(str(media_dir / name))
            assert image is not None, name
            faces = _yunet_faces(detector, image)
            assert len(faces), f"YuNet found no face in {name}"
            out.append((person, image, faces[int(np.argmax(faces.areas))]))
    return out


@pytest.fixture(scope="module")
def embedders(registry) -> dict:
    return {name: create_embedder(name, registry) for name in ("dlib_resnet", "mobilefacenet")}


# -- alignment ----------------------------------------------------------------------------------


def _similarity(angle_deg: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    return np.array(
        [[scale * np.cos(a), -scale * np.sin(a), shift[0]], [scale * np.sin(a), scale * np.cos(a), shift[1]]]
    )


@pytest.mark.parametrize("template", [DLIB_150, ARCFACE_112], ids=lambda t: t.name)
@pytest.mark.parametrize("scheme", [LandmarkScheme.FIVE, LandmarkScheme.FOUR])
def test_landmarks_land_on_template_points(template, scheme):
    """Draw a dot at each landmark of a rotated, scaled face; after alignment each dot sits on its template point."""
    points = template.points_for(scheme).astype(np.float64)
    chip_to_image = _similarity(23.0, 2.7, (310.0, 95.0))
    landmarks = points @ chip_to_image[:, :2].T + chip_to_image[:, 2]
    image = np.zeros((720, 900, 3), np.uint8)
    for x, y in landmarks:
        cv2.circle(image, (int(round(x * 16)), int(round(y * 16))), 5 * 16, (255, 255, 255), -1, cv2.LINE_AA, shift=4)
    faces = Faces(boxes=np.zeros((1, 4)), scores=np.ones(1), landmarks=landmarks[None], scheme=scheme)

    matrix = estimate_transform(landmarks, points)
    np.testing.assert_allclose(landmarks @ matrix[:, :2].T + matrix[:, 2], points, atol=1e-3)

    chip = align_faces(image, faces, template)[0]
    assert chip.shape == (template.size, template.size, 3) and chip.dtype == np.uint8
    gray = chip[:, :, 0].astype(np.float64)
    for x, y in points:
        # intensity-weighted centroid of the dot within a window around where it should be
        x0, y0 = int(x) - 6, int(y) - 6
        window = gray[y0 : y0 + 13, x0 : x0 + 13]
        ys, xs = np.mgrid[y0 : y0 + 13, x0 : x0 + 13]
        centre = np.array([(xs * window).sum(), (ys * window).sum()]) / window.sum()
        assert np.hypot(*(centre - (x, y))) < 0.5, f"dot at {centre}, template point ({x:.1f}, {y:.1f})"


def test_lmeds_ignores_one_bad_landmark():
    points = DLIB_150.points_for(LandmarkScheme.FIVE).astype(np.float64)
    chip_to_image = _similarity(-10.0, 1.9, (40.0, 60.0))
    landmarks = points @ chip_to_image[:, :2].T + chip_to_image[:, 2]
    landmarks[4] += (60.0, -45.0)  # one wild mouth corner
    matrix = estimate_transform(landmarks, points)
    mapped = landmarks @ matrix[:, :2].T + matrix[:, 2]
    np.testing.assert_allclose(mapped[:4], points[:4], atol=0.05)


def test_align_empty_and_wrong_inputs():
    image = np.zeros((100, 100, 3), np.uint8)
    assert align_faces(image, Faces.empty(), DLIB_150).shape == (0, 150, 150, 3)
    with pytest.raises(ValueError, match="BGR uint8"):
        align_faces(image[:, :, 0], Faces.empty(), DLIB_150)
    only_five = ChipTemplate("five_only", 112, {LandmarkScheme.FIVE: ARCFACE_112.points_for(LandmarkScheme.FIVE)})
    four = Faces(np.zeros((1, 4)), np.ones(1), np.zeros((1, 4, 2)), scheme=LandmarkScheme.FOUR)
    with pytest.raises(ValueError, match="no FOUR points"):
        align_faces(image, four, only_five)
    with pytest.raises(ValueError, match=r"shape \(4, 2\)"):
        ChipTemplate("bad", 112, {LandmarkScheme.FOUR: np.zeros((5, 2))})


# -- embedders on real photos --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dlib_resnet", "mobilefacenet"])
def test_same_person_closer_than_different_people(name, embedders, photos):
    embedder = embedders[name]
    chips = np.concatenate([embedder.prepare(image, face) for _, image, face in photos])
    vectors = embedder.embed(chips)
    assert vectors.shape == (len(photos), embedder.dim) and vectors.dtype == np.float32
    distances = embedder.distances(vectors, vectors)
    people = np.array([person for person, _, _ in photos])
    same = people[:, None] == people[None, :]
    off_diagonal = ~np.eye(len(people), dtype=bool)
    worst_same = distances[same & off_diagonal].max()
    best_different = distances[~same].min()
    threshold = embedder.spec.threshold
    assert worst_same < threshold < best_different, (
        f"{name}: same-person distances up to {worst_same:.3f}, different people from "
        f"{best_different:.3f}, threshold {threshold}"
    )
    # float32 |a|^2 + |b|^2 - 2ab in a batch vs one pair: about 1e-6 apart
    assert embedder.distance(vectors[0], vectors[1]) == pytest.approx(distances[0, 1], abs=1e-5)


@pytest.mark.parametrize("name", ["dlib_resnet", "mobilefacenet"])
def test_any_batch_size_gives_the_same_vectors(name, embedders, photos):
    embedder = embedders[name]
    chips = np.concatenate([embedder.prepare(image, face) for _, image, face in photos[:5]])
    together = embedder.embed(chips)
    assert embedder.embed(chips[:0]).shape == (0, embedder.dim)
    one_by_one = np.concatenate([embedder.embed(chips[i : i + 1]) for i in range(len(chips))])
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)
    with pytest.raises(ValueError, match="uint8 chips"):
        embedder.embed(chips.astype(np.float32))


def test_embedder_properties(embedders):
    dlib_embedder, arcface = embedders["dlib_resnet"], embedders["mobilefacenet"]
    assert isinstance(dlib_embedder, DlibResNetEmbedder) and isinstance(arcface, ArcFaceEmbedder)
    assert dlib_embedder.spec.metric == "euclidean" and dlib_embedder.spec.threshold == 0.6
    assert dlib_embedder.id == "dlib_resnet_v1" and dlib_embedder.dim == 128
    assert arcface.spec.metric == "cosine" and arcface.id.startswith("arcface:") and arcface.dim == 128
    assert arcface.spec.template is ARCFACE_112 and dlib_embedder.spec.template is DLIB_150


def test_spec_is_usable_without_a_session(registry, photos, embedders, monkeypatch):
    import onnxruntime

    def no_sessions(*args, **kwargs):
        raise AssertionError("embedder_spec must not create an onnxruntime session")

    monkeypatch.setattr(onnxruntime, "InferenceSession", no_sessions)
    _, image, face = photos[0]
    for name in ("dlib_resnet", "mobilefacenet"):
        spec = embedder_spec(name, registry)
        assert isinstance(spec, EmbedderSpec) and spec.id == embedders[name].id
        chips = spec.prepare(image, face)
        assert chips.shape == (1, spec.chip_size, spec.chip_size, 3) and chips.dtype == np.uint8
        # the chips made here embed the same as the embedder's own
        monkeypatch.undo()
        own = embedders[name]
        np.testing.assert_allclose(own.embed(chips), own.embed(own.prepare(image, face)))
        monkeypatch.setattr(onnxruntime, "InferenceSession", no_sessions)
    assert embedder_spec("dlib_resnet", registry, threshold=0.5).threshold == 0.5


def test_factory_names_and_errors(registry, model_dir, tmp_path):
    with pytest.raises(ConfigError, match="unknown embedder 'facenet'.*dlib_resnet"):
        create_embedder("facenet", registry)
    with pytest.raises(ConfigError, match="models.paths.arcface"):
        create_embedder("arcface", registry)
    with pytest.raises(ConfigError, match="embedder.threshold"):
        create_embedder("mobilefacenet", registry, threshold=3.0)  # cosine distance is at most 2
    own = ModelRegistry(
        model_dir=model_dir, cache_dir=tmp_path, paths={"arcface": model_dir / "mobilefacenet.onnx"}
    )
    arcface = create_embedder("arcface", own, threshold=0.55)
    assert isinstance(arcface, ArcFaceEmbedder) and arcface.spec.threshold == 0.55
    commercial_only = ModelRegistry(model_dir=model_dir, cache_dir=tmp_path)
    with pytest.raises(ModelError, match="non-commercial"):
        embedder_spec("mobilefacenet", commercial_only)


def test_adapters_reject_the_wrong_model(registry, model_dir):
    dlib_onnx = OnnxModel(registry.resolve("dlib_resnet"))
    with pytest.raises(ModelError, match=r"expected \[N,3,112,112\]"):
        ArcFaceEmbedder(dlib_onnx)
    with pytest.raises(ModelError, match="not a dlib ResNet"):
        DlibResNetEmbedder(OnnxModel(model_dir / "mobilefacenet.onnx"))
    with pytest.raises(ModelError, match=r"expected \[N,3,112,112\]"):
        ArcFaceEmbedder.spec_for(registry.resolve("dlib_resnet"))


def test_spec_validation_and_distances():
    with pytest.raises(ValueError, match="metric"):
        EmbedderSpec(id="x", template=DLIB_150, metric="manhattan", threshold=0.5, dim=4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="threshold"):
        EmbedderSpec(id="x", template=DLIB_150, metric="euclidean", threshold=0.0, dim=4)
    spec = EmbedderSpec(id="x", template=ARCFACE_112, metric="cosine", threshold=0.5, dim=2)
    d = spec.distances(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[1.0, 0.0], [-1.0, 0.0], [1.0, 1.0]]))
    np.testing.assert_allclose(d, [[0, 2, 1 - np.sqrt(0.5)], [1, 1, 1 - np.sqrt(0.5)]], atol=1e-6)
    assert spec.distances(np.zeros((0, 2)), np.ones((3, 2))).shape == (0, 3)
    with pytest.raises(ValueError, match="2-D vectors"):
        spec.distances(np.ones((1, 3)), np.ones((1, 3)))


def test_dlib_embedder_agrees_with_dlibs_own_pipeline(embedders, photos):
    """The default stack (YuNet + fitted template) against dlib's own (5-point shape predictor + get_face_chip)."""
    dlib = pytest.importorskip("dlib", reason="dlib-bin (test extra) is needed to compare with dlib itself")
    import face_recognition_models

    models = Path(face_recognition_models.__file__).parent / "models"
    predictor = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
    facerec = dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat"))
    embedder = embedders["dlib_resnet"]
    for _, image, face in photos[::3]:
        rgb = np.ascontiguousarray(image[:, :, ::-1])
        x1, y1, x2, y2 = face.boxes[0].astype(int)  # dlib's predictor starts from YuNet's box
        chip_rgb = np.asarray(dlib.get_face_chip(rgb, predictor(rgb, dlib.rectangle(x1, y1, x2, y2)), 150, 0.25))
        reference = np.array(facerec.compute_face_descriptor(chip_rgb), np.float32)
        # same chip (given as BGR, like every chip in streamer): same descriptor
        chip_bgr = np.ascontiguousarray(chip_rgb[None, :, :, ::-1])
        np.testing.assert_allclose(embedder.embed(chip_bgr)[0], reference, atol=1e-5)
        # our own alignment: close to dlib's chip
        ours = embedder.embed(embedder.prepare(image, face))[0]
        cosine = ours @ reference / (np.linalg.norm(ours) * np.linalg.norm(reference))
        assert cosine > 0.97 and embedder.distance(ours, reference) < 0.3


# -- mirror averaging and chip quality ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["dlib_resnet", "mobilefacenet"])
def test_flip_average_embeds_chips_and_mirrors_in_one_batch(name, registry, embedders, photos):
    plain = embedders[name]
    assert plain.spec.flip_average is False  # off by default (measured: no gain for dlib's ResNet)
    flipped = create_embedder(name, registry, flip_average=True)
    assert flipped.spec.flip_average and flipped.id == plain.id  # same vector space, same gallery id
    assert embedder_spec(name, registry, flip_average=True).flip_average
    chips = np.concatenate([plain.prepare(image, face) for _, image, face in photos[:4]])
    calls = []
    original = flipped.model.run
    flipped.model.run = lambda batch: calls.append(len(batch)) or original(batch)
    try:
        vectors = flipped.embed(chips)
    finally:
        flipped.model.run = original
    assert calls == [2 * len(chips)] and vectors.shape == (len(chips), plain.dim)
    own, mirrored = plain.embed(chips), plain.embed(np.ascontiguousarray(chips[:, :, ::-1]))
    expected = (own + mirrored) / 2
    if plain.spec.l2_normalize:
        expected /= np.linalg.norm(expected, axis=1, keepdims=True)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    # the id stays because the averaged vector is close to the plain one: far inside the threshold
    shift = np.diag(plain.distances(vectors, own))
    assert shift.max() < plain.spec.threshold / 3, shift
    assert flipped.embed(chips[:0]).shape == (0, plain.dim)


def test_large_faces_are_area_averaged_before_the_warp(photos):
    """A face many times the chip size: the chip equals a warp of an area-shrunk copy, not the aliased
    direct warp (which keeps much more pixel-to-pixel noise)."""
    _, image, face = max(photos, key=lambda p: float(p[2].areas[0]))
    chip = align_faces(image, face, DLIB_150)[0].astype(np.float32)
    matrix = estimate_transform(face.landmarks[0], DLIB_150.points_for(face.scheme))
    assert np.sqrt(abs(np.linalg.det(matrix[:, :2]))) < 0.5  # the photo's face is big
    direct = cv2.warpAffine(image, matrix, (150, 150), flags=cv2.INTER_LINEAR).astype(np.float32)

    def roughness(x: np.ndarray) -> float:  # mean absolute difference between neighbouring pixels
        return float(np.abs(np.diff(x[30:120, 30:120], axis=1)).mean())

    assert roughness(chip) < roughness(direct)
    assert np.abs(chip - direct).mean() < 8  # the same face in the same place, only smoother


def test_chip_past_the_photo_edge_repeats_the_edge():
    image = np.full((60, 60, 3), 200, np.uint8)
    faces = Faces(boxes=[[0, 0, 60, 60]], scores=[1.0],
                  landmarks=[[[15, 20], [45, 20], [30, 35], [18, 48], [42, 48]]])
    chip = align_faces(image, faces, DLIB_150)[0]
    assert (chip == 200).all()  # no black frame around a tightly cropped portrait


# -- a second look at tilted faces --------------------------------------------------------------------


def _rotated(image: np.ndarray, angle: float) -> np.ndarray:
    """`image` turned by `angle` degrees (counter-clockwise on screen) on a canvas grown to hold it."""
    h, w = image.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    cos, sin = abs(m[0, 0]), abs(m[0, 1])
    nw, nh = int(h * sin + w * cos), int(h * cos + w * sin)
    m[0, 2] += nw / 2 - w / 2
    m[1, 2] += nh / 2 - h / 2
    return cv2.warpAffine(image, m, (nw, nh), flags=cv2.INTER_LINEAR)


def _eye_angle(landmarks: np.ndarray) -> float:
    (x0, y0), (x1, y1) = landmarks[0], landmarks[1]
    return float(np.degrees(np.arctan2(y1 - y0, x1 - x0)))


def test_redetect_straightens_the_chip_of_a_tilted_face(model_dir, photos, embedders):
    """YuNet reads a face turned 20 degrees as nearly upright; the second look on the first chip's view
    reads the tilt much better, and the tilted photo's descriptor comes closer to that of the upright photo."""
    yunet = cv2.FaceDetectorYN.create(str(model_dir / "face_detection_yunet_2026may.onnx"), "", (320, 320), 0.5, 0.3)

    def detect(image: np.ndarray) -> Faces:
        return _yunet_faces(yunet, image)

    embedder = embedders["dlib_resnet"]
    _, upright, upright_face = next(p for p in photos if p[0] == "biden")
    upright_vector = embedder.embed(embedder.prepare(upright, upright_face))[0]
    tilted = _rotated(upright, 20.0)  # counter-clockwise on screen: the eye line rises to the right, -20 degrees
    faces = detect(tilted)
    face = faces[int(np.argmax(faces.areas))]
    again = redetect_landmarks(tilted, face, DLIB_150, detect)
    np.testing.assert_array_equal(again.boxes, face.boxes)
    first_error, second_error = abs(_eye_angle(face.landmarks[0]) + 20), abs(_eye_angle(again.landmarks[0]) + 20)
    assert second_error < 0.6 * first_error, (first_error, second_error)  # measured: 20.6 -> 9.1 degrees
    plain = embedder.distance(embedder.embed(embedder.prepare(tilted, face))[0], upright_vector)
    looked_again = embedder.distance(embedder.embed(embedder.prepare(tilted, face, detect))[0], upright_vector)
    assert looked_again < plain, (plain, looked_again)
    # the detect worker's chip preparer takes the same second look
    chips = ChipPreparer(embedder.spec, (), redetect=detect).prepare(tilted, face)["chips"]
    np.testing.assert_array_equal(chips, embedder.prepare(tilted, face, detect))
    assert not np.array_equal(chips, ChipPreparer(embedder.spec, ()).prepare(tilted, face)["chips"])
    # an upright face keeps about the landmarks it had
    kept = redetect_landmarks(upright, upright_face, DLIB_150, detect)
    scale = float(upright_face.boxes[0, 2] - upright_face.boxes[0, 0])
    assert np.abs(kept.landmarks - upright_face.landmarks).max() < 0.06 * scale


def test_redetect_keeps_landmarks_it_cannot_improve(photos):
    _, image, face = photos[0]
    assert redetect_landmarks(image, Faces.empty(), DLIB_150, lambda _: Faces.empty()).landmarks.shape == (0, 5, 2)
    same = redetect_landmarks(image, face, DLIB_150, lambda _: Faces.empty())  # nothing found on the view
    np.testing.assert_array_equal(same.landmarks, face.landmarks)
    # a face far from the view's centre is someone else
    far = Faces(boxes=[[0, 0, 20, 20]], scores=[0.9], landmarks=[[[5, 5], [15, 5], [10, 10], [6, 15], [14, 15]]])
    np.testing.assert_array_equal(redetect_landmarks(image, face, DLIB_150, lambda _: far).landmarks, face.landmarks)
    four = Faces(boxes=[[0, 0, 600, 600]], scores=[0.9], landmarks=np.zeros((1, 4, 2)), scheme=LandmarkScheme.FOUR)
    with pytest.raises(ValueError, match="FOUR landmarks"):
        redetect_landmarks(image, face, DLIB_150, lambda _: four)
    with pytest.raises(ValueError, match="zoom"):
        redetect_landmarks(image, face, DLIB_150, lambda _: far, zoom=0)
