"""The four face detectors on real photos: same interface, same geometry, sensible faces."""

from __future__ import annotations

import typing
from types import SimpleNamespace

import av
import cv2
import numpy as np
import pytest

from streamer.config import DetectorSettings
from streamer.detect import (
    DETECTORS,
    BlazeFaceDetector,
    Detector,
    SCRFD500MDetector,
    YuNetDetector,
    create_detector,
)
from streamer.detect.yunet import to_blob
from streamer.errors import ModelError
from streamer.models.registry import ModelRegistry
from streamer.models.runtime import RuntimeOptions
from streamer.types import Faces, LandmarkScheme

NAMES = ["yunet", "blazeface", "scrfd_500m", "scrfd_2.5g"]
ASTRONAUT_BOX = np.array([178, 63, 178 + 90, 63 + 113], np.float32)  # MANIFEST: YuNet's box, x y w h
IMG1_FACE = np.array([420, 190, 1020, 1020], np.float32)  # deepface img1.jpg, what all four agree on


def iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def read(path) -> np.ndarray:
    image = cv2.imread(str(path))
    assert image is not None, path
    return image


@pytest.fixture(scope="module")
def astronaut(model_dir) -> np.ndarray:
    return read(model_dir / "testdata" / "astronaut.png")


@pytest.fixture(scope="module")
def big_photo(media_dir) -> np.ndarray:
    image = read(media_dir / "deepface" / "img1.jpg")
    assert image.shape == (1868, 1382, 3)
    return image


@pytest.fixture(scope="module")
def multiface(media_dir) -> np.ndarray:
    return read(media_dir / "facenet_pytorch" / "data" / "multiface.jpg")


@pytest.fixture(scope="module")
def couple(media_dir) -> np.ndarray:
    return read(media_dir / "deepface" / "couple.jpg")


def detector_settings(name: str, **fields: object) -> DetectorSettings:
    """Settings with `backend`, even before DetectorSettings has that field (the factory uses getattr)."""
    if "backend" in fields and "backend" not in DetectorSettings.model_fields:
        plain = DetectorSettings(name=name).model_dump()
        return SimpleNamespace(**{**plain, **fields})  # type: ignore[return-value]
    return DetectorSettings(name=name, **fields)


# "yunet" is the default (onnxruntime) backend; "yunet/opencv" is cv2.FaceDetectorYN, the reference.
@pytest.fixture(scope="module", params=[*NAMES, "yunet/opencv"])
def detector(request, registry) -> typing.Iterator[Detector]:
    name, _, backend = request.param.partition("/")
    settings = detector_settings(name, backend=backend) if backend else DetectorSettings(name=name)
    with create_detector(settings, registry) as made:
        yield made


def assert_well_formed(faces: Faces, image: np.ndarray, detector: Detector) -> None:
    height, width = image.shape[:2]
    k = detector.scheme.num_points
    assert faces.scheme is detector.scheme
    assert faces.boxes.shape == (len(faces), 4) and faces.boxes.dtype == np.float32
    assert faces.landmarks.shape == (len(faces), k, 2) and faces.landmarks.dtype == np.float32
    assert faces.scores.shape == (len(faces),)
    assert (faces.track_ids == -1).all()
    assert np.all(np.diff(faces.scores) <= 0), "not sorted by score"
    assert np.all(faces.scores >= detector.score_threshold) and np.all(faces.scores <= 1)
    assert np.all(faces.boxes[:, :2] >= 0) and np.all(faces.boxes[:, 2] <= width)
    assert np.all(faces.boxes[:, 3] <= height)
    sides = np.minimum(faces.boxes[:, 2] - faces.boxes[:, 0], faces.boxes[:, 3] - faces.boxes[:, 1])
    assert np.all(sides >= detector.min_face)


def assert_face_geometry(faces: Faces, scheme: LandmarkScheme) -> None:
    """Landmarks inside their box; subject's right eye (and mouth corner) on the image's left."""
    for box, points in zip(faces.boxes, faces.landmarks):
        margin = 0.05 * (box[2] - box[0])
        assert np.all(points[:, 0] >= box[0] - margin) and np.all(points[:, 0] <= box[2] + margin)
        assert np.all(points[:, 1] >= box[1] - margin) and np.all(points[:, 1] <= box[3] + margin)
        right_eye, left_eye, nose = points[0], points[1], points[2]
        assert right_eye[0] < nose[0] < left_eye[0]
        assert max(right_eye[1], left_eye[1]) < nose[1]
        if scheme is LandmarkScheme.FIVE:
            assert points[3][0] < points[4][0]  # right mouth corner left of the left one
            assert nose[1] < min(points[3][1], points[4][1])
        else:
            assert nose[1] < points[3][1]  # mouth centre below the nose tip


def test_factory_covers_every_configurable_name() -> None:
    allowed = set(typing.get_args(DetectorSettings.model_fields["name"].annotation))
    assert set(DETECTORS) == allowed == set(NAMES)


def test_astronaut_gives_one_face_where_the_manifest_says(detector, astronaut) -> None:
    faces = detector.detect(astronaut)
    assert_well_formed(faces, astronaut, detector)
    assert len(faces) == 1
    assert iou(faces.boxes[0], ASTRONAUT_BOX) > 0.7, faces.boxes[0]
    assert faces.scores[0] > 0.75
    assert_face_geometry(faces, detector.scheme)


def test_big_photo_is_detected_on_a_shrunk_copy_and_mapped_back(detector, big_photo) -> None:
    faces = detector.detect(big_photo)
    assert_well_formed(faces, big_photo, detector)
    assert len(faces) >= 1
    # Box in the original 1382x1868 pixels (well beyond the 640 px detection copy).
    assert iou(faces.boxes[0], IMG1_FACE) > 0.6, faces.boxes[0]
    assert_face_geometry(faces[0], detector.scheme)


def test_several_faces(detector, multiface, couple) -> None:
    faces = detector.detect(couple)
    assert_well_formed(faces, couple, detector)
    assert len(faces) == 2
    assert_face_geometry(faces, detector.scheme)
    if detector.name != "blazeface":  # short-range BlazeFace cannot see multiface.jpg's small faces
        faces = detector.detect(multiface)
        assert_well_formed(faces, multiface, detector)
        assert len(faces) >= 5
        assert_face_geometry(faces, detector.scheme)


def test_empty_frame_gives_no_faces_with_the_right_shapes(detector) -> None:
    black = np.zeros((720, 1280, 3), np.uint8)
    faces = detector.detect(black)
    assert len(faces) == 0
    assert faces.boxes.shape == (0, 4)
    assert faces.landmarks.shape == (0, detector.scheme.num_points, 2)
    assert faces.scheme is detector.scheme


def test_batch_equals_one_by_one_and_reuses_per_size_state(detector, astronaut, couple) -> None:
    small_couple = cv2.resize(couple, (570, 397), interpolation=cv2.INTER_AREA)
    tiny = np.full((24, 40, 3), 128, np.uint8)  # smaller than any stride: must not break
    images = [astronaut, small_couple, tiny, astronaut[:, ::-1], astronaut]  # includes a non-contiguous view
    batch = detector.detect_batch(images)
    assert len(batch) == len(images)
    for image, faces in zip(images, batch):
        single = detector.detect(image)
        assert len(single) == len(faces)
        np.testing.assert_allclose(faces.boxes, single.boxes, atol=1e-3)
        np.testing.assert_allclose(faces.landmarks, single.landmarks, atol=1e-3)
    assert len(batch[2]) == 0
    # A mirrored image mirrors the face: its box lands where the mirror puts it.
    flipped = batch[3].boxes[0]
    mirrored_back = np.array([512 - flipped[2], flipped[1], 512 - flipped[0], flipped[3]])
    assert iou(mirrored_back, batch[0].boxes[0]) > 0.8
    assert_face_geometry(batch[3], detector.scheme)  # the eyes swap sides with the mirror
    assert detector.detect_batch([]) == []


def test_fixed_size_video_does_no_per_frame_setup(registry, astronaut) -> None:
    frame = cv2.resize(astronaut, (1280, 720))
    with YuNetDetector(registry.resolve("yunet")) as yunet:
        for _ in range(3):
            yunet.detect(frame)
        assert len(yunet._by_size) == 1
    with SCRFD500MDetector(registry.resolve("scrfd_500m")) as scrfd:
        for _ in range(3):
            scrfd.detect(frame)
        assert len(scrfd._anchors) == 1


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((64, 64, 3), np.float32),
        np.zeros((64, 64), np.uint8),
        np.zeros((64, 64, 4), np.uint8),
        np.zeros((0, 64, 3), np.uint8),
        [[0, 0, 0]],
    ],
    ids=["float32", "gray", "bgra", "empty", "list"],
)
def test_bad_input_raises_value_error_naming_expected_and_actual(detector, bad) -> None:
    with pytest.raises(ValueError, match=r"expected a uint8 BGR image.*got"):
        detector.detect(bad)
    with pytest.raises(ValueError, match="expected"):
        detector.detect_batch([np.zeros((8, 8, 3), np.uint8), bad])


def test_min_face_and_max_side(registry, astronaut, big_photo) -> None:
    path = registry.resolve("yunet")
    with YuNetDetector(path, min_face=100) as strict:  # the astronaut's face is 90 px wide
        assert len(strict.detect(astronaut)) == 0
    with YuNetDetector(path, max_side=320) as small:
        faces = small.detect(big_photo)
        assert iou(faces.boxes[0], IMG1_FACE) > 0.6


def test_boxes_are_clipped_to_the_image(registry, astronaut) -> None:
    crop = np.ascontiguousarray(astronaut[100:, 210:])  # cuts the face at the top and left
    with YuNetDetector(registry.resolve("yunet"), min_face=10) as yunet:
        faces = yunet.detect(crop)
    assert len(faces) >= 1
    assert np.all(faces.boxes[:, :2] >= 0)
    assert np.all(faces.boxes[:, 2] <= crop.shape[1]) and np.all(faces.boxes[:, 3] <= crop.shape[0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"score_threshold": 1.5}, "score_threshold must be in"),
        ({"nms_threshold": 0.0}, "nms_threshold must be in"),
        ({"max_side": 16}, "max_side must be at least 32"),
        ({"min_face": -1}, "min_face must be >= 0"),
    ],
)
def test_bad_settings_raise_value_error(registry, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        YuNetDetector(registry.resolve("yunet"), **kwargs)


@pytest.mark.parametrize(
    ("cls", "wrong_file"),
    [
        (YuNetDetector, "scrfd_500m_bnkps.onnx"),
        (BlazeFaceDetector, "face_detection_yunet_2026may.onnx"),
        (SCRFD500MDetector, "face_detection_yunet_2026may.onnx"),
        (YuNetDetector, "no_such_file.onnx"),
    ],
)
def test_wrong_model_file_raises_model_error_at_construction(model_dir, cls, wrong_file) -> None:
    with pytest.raises(ModelError, match=cls.name):
        cls(model_dir / wrong_file)


def test_factory_propagates_registry_errors(tmp_path, model_dir) -> None:
    empty = ModelRegistry(model_dir=tmp_path, cache_dir=tmp_path / "cache")
    with pytest.raises(ModelError, match="yunet not found"):
        create_detector(DetectorSettings(name="yunet"), empty)
    commercial_only = ModelRegistry(model_dir=model_dir, cache_dir=tmp_path / "cache")
    with pytest.raises(ModelError, match="non-commercial"):
        create_detector(DetectorSettings(name="scrfd_500m"), commercial_only)


def test_factory_passes_settings_through(registry) -> None:
    settings = DetectorSettings(
        name="scrfd_2.5g", score_threshold=0.7, nms_threshold=0.4, max_side=320, min_face=12
    )
    with create_detector(settings, registry) as made:
        assert made.name == "scrfd_2.5g"
        assert (made.score_threshold, made.nms_threshold, made.max_side, made.min_face) == (0.7, 0.4, 320, 12)


def test_blazeface_close_is_idempotent_and_use_after_close_fails(registry, astronaut) -> None:
    blaze = BlazeFaceDetector(registry.resolve("blazeface"))
    assert len(blaze.detect(astronaut)) == 1
    blaze.close()
    blaze.close()
    with pytest.raises(RuntimeError, match="after close"):
        blaze.detect(astronaut)
    # A detector dropped without close() is closed by its finalizer, not by MediaPipe at exit.
    BlazeFaceDetector(registry.resolve("blazeface"))


# -- YuNet: the onnxruntime backend against cv2.FaceDetectorYN -------------------------------------------


@pytest.fixture(scope="module")
def yunet_pair(registry) -> typing.Iterator[tuple[YuNetDetector, YuNetDetector]]:
    path = registry.resolve("yunet")
    with YuNetDetector(path) as fast, YuNetDetector(path, backend="opencv") as reference:
        yield fast, reference


@pytest.fixture(scope="module")
def video_frames(media_dir) -> list[np.ndarray]:
    """Six frames spread over the facenet_pytorch clip, at 720p as a camera would send them."""
    frames = []
    with av.open(str(media_dir / "facenet_pytorch" / "examples" / "video.mp4")) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index % 15 == 0:
                frames.append(cv2.resize(frame.to_ndarray(format="bgr24"), (1280, 720)))
            if len(frames) == 6:
                break
    assert len(frames) == 6
    return frames


def assert_same_faces(got: Faces, want: Faces, label: str) -> None:
    assert len(got) == len(want), f"{label}: {len(got)} faces vs {len(want)}"
    for box, points, score in zip(want.boxes, want.landmarks, want.scores):
        # Pair by overlap, not by rank: two faces with near-equal scores may swap places.
        match = int(np.argmax([iou(box, other) for other in got.boxes]))
        assert iou(box, got.boxes[match]) > 0.98, (label, box, got.boxes[match])
        np.testing.assert_allclose(got.boxes[match], box, atol=1e-2, err_msg=label)
        np.testing.assert_allclose(got.landmarks[match], points, atol=1e-2, err_msg=label)
        assert abs(float(got.scores[match]) - float(score)) < 1e-3, label


def test_yunet_backends_agree_on_real_photos(yunet_pair, media_dir, model_dir, astronaut) -> None:
    fast, reference = yunet_pair
    deepface = sorted((media_dir / "deepface").glob("img*.jpg"))[:24]
    paths = [
        *deepface,
        media_dir / "deepface" / "couple.jpg",
        media_dir / "facenet_pytorch" / "data" / "multiface.jpg",
    ]
    total = 0
    for path in paths:
        image = read(path)
        want = reference.detect(image)
        assert_same_faces(fast.detect(image), want, path.name)
        total += len(want)
    assert_same_faces(fast.detect(astronaut), reference.detect(astronaut), "astronaut")
    assert total >= len(paths) + 5  # the comparison really covered faces (multiface alone has 6)


@pytest.mark.parametrize("max_side", [640, 1280])
def test_yunet_backends_agree_on_video_frames(registry, video_frames, max_side) -> None:
    # A low threshold keeps many overlapping candidates alive, so NMS decides a lot here.
    options = dict(score_threshold=0.3, max_side=max_side, min_face=0)
    path = registry.resolve("yunet")
    fast = YuNetDetector(path, **options)
    reference = YuNetDetector(path, backend="opencv", **options)
    with fast, reference:
        found = 0
        for index, frame in enumerate(video_frames):
            want = reference.detect(frame)
            assert_same_faces(fast.detect(frame), want, f"frame {index} at {max_side}")
            found += len(want)
        assert found >= len(video_frames)


def test_yunet_preprocessing_is_what_face_detector_yn_feeds_the_net(astronaut, couple) -> None:
    small = np.ascontiguousarray(couple[:397, :570])
    blob = to_blob([astronaut[:500, :490], small], 576, 512)
    padded = [
        cv2.copyMakeBorder(
            image, 0, 512 - image.shape[0], 0, 576 - image.shape[1], cv2.BORDER_CONSTANT
        )
        for image in (astronaut[:500, :490], small)
    ]
    np.testing.assert_array_equal(blob, cv2.dnn.blobFromImages(padded))  # raw BGR 0..255, NCHW
    assert blob.dtype == np.float32 and blob.shape == (2, 3, 512, 576)
    assert blob[:, :, 500:, :].max() == 0 and blob[0, :, :, 490:].max() == 0  # zero pad bottom/right


def test_yunet_onnxruntime_session_defaults_to_one_thread(registry, yunet_pair) -> None:
    fast, _ = yunet_pair
    assert fast.backend == "onnxruntime" and fast.model is not None
    assert fast.model.session.get_session_options().intra_op_num_threads == 1
    two_threads = RuntimeOptions(device="cpu", intra_op_threads=2)
    with YuNetDetector(registry.resolve("yunet"), runtime=two_threads) as two:
        assert two.model is not None and two.model.session.get_session_options().intra_op_num_threads == 2
        assert two.model.device == "cpu"


def test_factory_picks_the_yunet_backend(registry) -> None:
    with create_detector(DetectorSettings(name="yunet"), registry) as default:
        assert isinstance(default, YuNetDetector) and default.backend == "onnxruntime"
    runtime = RuntimeOptions(device="cpu", intra_op_threads=2)
    with create_detector(detector_settings("yunet", backend="onnxruntime"), registry, runtime) as made:
        assert made.model.session.get_session_options().intra_op_num_threads == 2  # type: ignore[attr-defined]
    # The runtime is for onnxruntime sessions; the opencv backend takes none and must not fail on one.
    settings = detector_settings("yunet", backend="opencv", max_side=320)
    with create_detector(settings, registry, runtime) as made:
        assert isinstance(made, YuNetDetector) and made.backend == "opencv" and made.max_side == 320


def test_yunet_bad_backend_and_misplaced_runtime_raise_value_error(registry) -> None:
    path = registry.resolve("yunet")
    with pytest.raises(ValueError, match=r"backend must be one of .*got 'tensorrt'"):
        YuNetDetector(path, backend="tensorrt")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="onnxruntime backend only"):
        YuNetDetector(path, backend="opencv", runtime=RuntimeOptions())


@pytest.mark.parametrize("backend", ["onnxruntime", "opencv"])
def test_yunet_rejects_a_wrong_model_file_on_either_backend(model_dir, tmp_path, backend) -> None:
    with pytest.raises(ModelError, match="yunet"):
        YuNetDetector(model_dir / "scrfd_500m_bnkps.onnx", backend=backend)  # type: ignore[arg-type]
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not an onnx file")
    with pytest.raises(ModelError, match="yunet"):
        YuNetDetector(corrupt, backend=backend)  # type: ignore[arg-type]


def test_yunet_onnxruntime_close_is_idempotent_and_use_after_close_fails(registry, astronaut) -> None:
    yunet = YuNetDetector(registry.resolve("yunet"))
    assert len(yunet.detect(astronaut)) == 1
    yunet.close()
    yunet.close()
    with pytest.raises(RuntimeError, match="after close"):
        yunet.detect(astronaut)
