"""Face quality (size, sharpness, yaw) and what enrolment refuses: small, blurred, turned-away and group photos."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from streamer.errors import InputError, NoFaceError
from streamer.infer.quality import face_quality, left_to_right, yaw_degrees
from streamer.match.gallery import Gallery
from streamer.types import Faces

REPO = Path(__file__).resolve().parents[1]
PHOTOS = "face_recognition/examples"
GROUP = f"{PHOTOS}/knn_examples/test/obama_and_biden.jpg"
# The most turned single-face photo of the shared media (yaw about 26 degrees by its landmarks).
TURNED = f"{PHOTOS}/knn_examples/test/obama1.jpg"
# Photos the other tests and the demo enrol, and the shared set's extremes: smallest face (obama-240p,
# 54 px), least sharp (Chandler.png), most turned (obama1.jpg). The defaults must accept all of them.
ENROLLED_ELSEWHERE = [
    f"{PHOTOS}/obama.jpg", f"{PHOTOS}/biden.jpg", f"{PHOTOS}/obama2.jpg", f"{PHOTOS}/lin-manuel-miranda.png",
    f"{PHOTOS}/obama-240p.jpg", TURNED, "deepface/img1.jpg", "deepface/img2.jpg",
    "face_reidentification/assets/faces/Chandler.png",
    "facenet_pytorch/data/test_images_aligned/bradley_cooper/1.png",
]  # fmt: skip


def cli(*args: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "streamer", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=120)  # fmt: skip


def _engine(model_dir, cache_dir, **enrolment):
    from streamer.config import load_settings
    from streamer.engine import FaceEngine

    overrides = {"model_dir": str(model_dir), "models": {"cache_dir": str(cache_dir)}}
    if enrolment:
        overrides["enrolment"] = enrolment
    return FaceEngine(load_settings(overrides=overrides))


@pytest.fixture(scope="module")
def engine(model_dir, cache_dir):
    with _engine(model_dir, cache_dir) as engine:
        yield engine


def _portrait(media_dir) -> np.ndarray:
    return cv2.imread(str(media_dir / PHOTOS / "obama.jpg"))


def _quality(engine, image):
    face = engine.detect(image)[0]
    return face_quality(image, face.boxes[0], face.landmarks[0])


# -- the measures ---------------------------------------------------------------------------------
def _frontal_landmarks(nose_x: float) -> np.ndarray:
    # right eye, left eye, nose, mouth corners of an upright face 100 px wide; only the nose moves.
    return np.array([[30, 40], [70, 40], [nose_x, 60], [35, 80], [65, 80]], np.float32)


def test_yaw_grows_as_the_nose_moves_towards_an_eye_whatever_the_roll() -> None:
    noses = [50, 55, 60, 65, 70, 80]
    lm = np.stack([_frontal_landmarks(x) for x in noses])
    faces = Faces(np.tile([0, 0, 100, 100], (len(noses), 1)), np.ones(len(noses)), lm)
    yaw = yaw_degrees(faces)
    assert yaw[0] == pytest.approx(0, abs=0.01)
    assert np.all(np.diff(yaw[:5]) > 0)
    assert yaw[4] == pytest.approx(45, abs=0.01)  # nose over the left eye
    assert yaw[5] == pytest.approx(45, abs=0.01)  # beyond: the landmarks cannot tell more
    # Rolled 30 degrees about the face centre: the same yaw.
    angle = np.radians(30)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]], np.float32)
    rolled = Faces(faces.boxes, faces.scores, (lm - 50) @ rot.T + 50)
    np.testing.assert_allclose(yaw_degrees(rolled), yaw, atol=0.01)


def test_a_synthetic_profile_is_refused_for_its_yaw(media_dir) -> None:
    from streamer.config import EnrolmentSettings

    image = _portrait(media_dir)
    box = np.array([0, 0, 100, 100], np.float32)
    frontal = face_quality(image, box, _frontal_landmarks(50))
    profile = face_quality(image, box, _frontal_landmarks(68))
    assert frontal.yaw < 1 and not any("turned" in r for r in frontal.reasons)
    assert profile.yaw > EnrolmentSettings().max_yaw_deg
    assert any("turned away" in r and "enrolment.max_yaw_deg" in r for r in profile.reasons)
    assert profile.score < frontal.score


def test_size_and_sharpness_of_real_degraded_copies(engine, media_dir) -> None:
    image = _portrait(media_dir)
    good = _quality(engine, image)
    assert good.reasons == ()
    assert good.size == pytest.approx(240, abs=15) and 0 < good.score <= 1
    small = _quality(engine, cv2.resize(image, None, fx=0.12, fy=0.12, interpolation=cv2.INTER_AREA))
    assert small.size < 40 and any("too small" in r for r in small.reasons)
    blurred = _quality(engine, cv2.GaussianBlur(image, (0, 0), 8))
    assert blurred.sharpness < good.sharpness / 10 and any("blurred" in r for r in blurred.reasons)
    assert small.score < good.score and blurred.score < good.score


def test_faces_are_numbered_left_to_right(engine, media_dir) -> None:
    faces = engine.detect(media_dir / GROUP)
    order = left_to_right(faces)
    centres = (faces.boxes[order, 0] + faces.boxes[order, 2]) / 2
    assert len(faces) == 3 and np.all(np.diff(centres) > 0)


@pytest.mark.parametrize("photo", ENROLLED_ELSEWHERE)
def test_the_defaults_accept_the_photos_the_tests_and_demo_enrol(engine, media_dir, photo) -> None:
    image = cv2.imread(str(media_dir / photo))
    assert _quality(engine, image).reasons == ()


def test_the_defaults_accept_the_demo_still(engine) -> None:
    image = cv2.imread(str(REPO / "sample_videos/astronaut.jpg"))
    assert _quality(engine, image).reasons == ()


# -- enrolment ------------------------------------------------------------------------------------
def test_enroll_refuses_small_blurred_and_group_photos_and_writes_nothing(tmp_path, engine, media_dir) -> None:
    image = _portrait(media_dir)
    small = cv2.resize(image, None, fx=0.12, fy=0.12, interpolation=cv2.INTER_AREA)
    blurred = cv2.GaussianBlur(image, (0, 0), 8)
    with Gallery(tmp_path / "g.db") as g:
        with pytest.raises(InputError, match="too small"):
            engine.enroll(g, "Barack Obama", [image, small])  # one bad photo fails the whole call
        with pytest.raises(InputError, match="blurred"):
            engine.enroll(g, "Barack Obama", [blurred])
        with pytest.raises(InputError, match="3 faces found; pick one with --face largest or --face N"):
            engine.enroll(g, "Barack Obama", [media_dir / GROUP])
        with pytest.raises(NoFaceError):
            engine.enroll(g, "Barack Obama", [np.full((200, 200, 3), 127, np.uint8)])
        assert g.people() == []
        assert engine.enroll(g, "Barack Obama", [image]) == 1


def test_enroll_face_picks_largest_or_nth_from_the_left(tmp_path, engine, media_dir) -> None:
    group = cv2.imread(str(media_dir / GROUP))
    faces = engine.detect(group)
    centres = (faces.boxes[:, 0] + faces.boxes[:, 2]) / 2
    leftmost, rightmost = int(np.argmin(centres)), int(np.argmax(centres))
    chosen, vector = engine.enrolment_face(group, 1)
    np.testing.assert_allclose(chosen.boxes[0], faces.boxes[leftmost])
    np.testing.assert_allclose(vector, engine.embed_faces(group, faces[leftmost])[0], atol=1e-5)
    # The third face from the left, a girl in the front row, looks down and to the side: a real turned face.
    assert rightmost == int(left_to_right(faces)[2])
    with pytest.raises(InputError, match=r"refused: face turned away \(yaw about \d+ degrees"):
        engine.enrolment_face(group, 3)
    np.testing.assert_allclose(engine.enrolment_face(group, "largest")[0].boxes[0],
                               faces.boxes[int(np.argmax(faces.areas))])  # fmt: skip
    with pytest.raises(InputError, match="--face 4 asked for, but only 3 face"):
        engine.enrolment_face(group, 4)
    with pytest.raises(InputError, match="'largest' or a face number"):
        engine.enrolment_face(group, 0)
    # The largest face of obama_and_biden.jpg is Obama: enrolled from the group, his portrait is found.
    with Gallery(tmp_path / "g.db") as g:
        assert engine.enroll(g, "Barack Obama", [media_dir / GROUP], face="largest") == 1
        assert [f.name for f in engine.find(media_dir / PHOTOS / "obama.jpg", g)] == ["Barack Obama"]


def test_a_turned_face_is_refused_below_the_configured_max_yaw(tmp_path, model_dir, cache_dir, media_dir) -> None:
    with _engine(model_dir, cache_dir, max_yaw_deg=20) as strict, Gallery(tmp_path / "g.db") as g:
        with pytest.raises(InputError, match=r"turned away \(yaw about 2\d degrees, enrolment.max_yaw_deg is 20\)"):
            strict.enroll(g, "Barack Obama", [media_dir / TURNED])
        assert g.people() == []


def test_a_bad_enrolment_setting_fails_naming_it() -> None:
    from streamer.config import load_settings
    from streamer.errors import ConfigError

    with pytest.raises((ConfigError, ValueError), match="enrolment.max_yaw_deg"):
        load_settings(overrides={"enrolment": {"max_yaw_deg": 120}})


# -- the CLI --------------------------------------------------------------------------------------
def test_cli_add_refuses_a_group_photo_naming_the_count_until_face_is_given(tmp_path, media_dir) -> None:
    gallery = tmp_path / "people.db"
    refused = cli("gallery", "add", "Barack Obama", media_dir / GROUP, "--gallery", gallery)
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "3 faces found" in lines[0] and "--face largest" in lines[0]
    assert not gallery.exists()
    bad = cli("gallery", "add", "Barack Obama", media_dir / GROUP, "--face", "first", "--gallery", gallery)
    assert bad.returncode == 2 and "expected 'largest' or a face number" in bad.stderr
    done = cli("gallery", "add", "Barack Obama", media_dir / GROUP, "--face", "largest", "--gallery", gallery)
    assert done.returncode == 0, done.stderr
    assert "enrolled Barack Obama: 1 face(s)" in done.stderr


def test_cli_import_reports_each_refused_photo_and_enrols_the_rest(tmp_path, media_dir) -> None:
    photos = tmp_path / "photos"
    (photos / "Barack Obama").mkdir(parents=True)
    (photos / "Joe Biden").mkdir()
    portrait = _portrait(media_dir)
    cv2.imwrite(str(photos / "Barack Obama" / "sharp.jpg"), portrait)
    cv2.imwrite(str(photos / "Barack Obama" / "blurred.jpg"), cv2.GaussianBlur(portrait, (0, 0), 8))
    cv2.imwrite(str(photos / "Joe Biden" / "group.jpg"), cv2.imread(str(media_dir / GROUP)))
    gallery = tmp_path / "people.db"
    result = cli("gallery", "import", photos, "--gallery", gallery)
    assert result.returncode == 2
    assert "blurred.jpg: refused: face blurred" in result.stderr
    assert "group.jpg: 3 faces found" in result.stderr
    assert "imported 1 face(s), 1 new people" in result.stderr
    listed = cli("gallery", "list", "--gallery", gallery)
    assert listed.stdout.splitlines() == ["Barack Obama\t1 face(s)"]
