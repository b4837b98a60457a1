"""Trustworthy enrolment: re-imports add nothing, imports say what they left out, galleries of another
embedder and missing galleries fail in one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from streamer.errors import GalleryError
from streamer.match.gallery import Gallery

REPO = Path(__file__).resolve().parents[1]
PHOTOS = "face_recognition/examples"


def cli(*args: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "streamer", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=120)  # fmt: skip


def faces(gallery: Path) -> dict[str, int]:
    return {p["name"]: p["faces"] for p in json.loads(cli("gallery", "list", "--gallery", gallery, "--json").stdout)}


def test_adding_the_same_photos_again_adds_nothing(tmp_path, media_dir):
    gallery, photo = tmp_path / "people.db", media_dir / PHOTOS / "obama.jpg"
    copy = tmp_path / "renamed.jpg"
    shutil.copy(photo, copy)
    assert cli("gallery", "add", "Barack Obama", photo, "--gallery", gallery).returncode == 0
    again = cli("gallery", "add", "Barack Obama", photo, copy, "--gallery", gallery)  # same bytes, other name too
    assert again.returncode == 0 and "enrolled Barack Obama: 0 face(s)" in again.stderr, again.stderr
    assert "renamed.jpg: the same photo is already enrolled" in again.stderr
    assert faces(gallery) == {"Barack Obama": 1}


def test_import_skips_strays_reports_failures_and_reimports_nothing(tmp_path, media_dir):
    root = tmp_path / "people"
    for name, photo in (("Barack Obama", "obama.jpg"), ("Joe Biden", "biden.jpg")):
        (root / name).mkdir(parents=True)
        shutil.copy(media_dir / PHOTOS / photo, root / name / photo)
    (root / "Barack Obama" / "notes.txt").write_text("met at the conference")
    (root / "Nobody Yet").mkdir()
    (root / "README.md").write_text("one folder per person")
    gallery = tmp_path / "people.db"
    done = cli("gallery", "import", root, "--gallery", gallery)
    assert done.returncode == 0, done.stderr  # only strays: a warning each, not a failure
    assert "skipped" in done.stderr and "notes.txt" in done.stderr and "Nobody Yet" in done.stderr
    assert "imported 2 face(s), 2 new people" in done.stderr and "0 failed" in done.stderr
    assert faces(gallery) == {"Barack Obama": 1, "Joe Biden": 1}
    again = cli("gallery", "import", root, "--gallery", gallery)
    assert again.returncode == 0 and "imported 0 face(s), 0 new people; skipped 2 already enrolled" in again.stderr
    assert faces(gallery) == {"Barack Obama": 1, "Joe Biden": 1}

    # A photo without a face fails (exit 2), named, while the rest still lands.
    cv2.imwrite(str(root / "Joe Biden" / "blank.png"), np.zeros((200, 200, 3), np.uint8))
    shutil.copy(media_dir / PHOTOS / "obama2.jpg", root / "Barack Obama" / "obama2.jpg")
    failed = cli("gallery", "import", root, "--gallery", gallery)
    assert failed.returncode == 2 and "blank.png: no face found" in failed.stderr, failed.stderr
    assert "Traceback" not in failed.stderr and "1 failed" in failed.stderr
    assert faces(gallery) == {"Barack Obama": 2, "Joe Biden": 1}


def test_a_gallery_of_another_embedder_fails_run_and_find_in_one_line(tmp_path, media_dir):
    gallery = tmp_path / "people.db"
    with Gallery(gallery) as g:
        g.add("Someone", np.ones((1, 512)), "arcface:0123456789ab")
    clip = media_dir / "facenet_pytorch/examples/video.mp4"
    run = cli("run", clip, "--gallery", gallery, "--quiet")
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1, run.stderr
    assert "arcface:0123456789ab" in lines[0] and "dlib_resnet_v1" in lines[0] and "re-enrol" in lines[0]
    found = cli("find", media_dir / PHOTOS / "obama.jpg", "--gallery", gallery)
    assert found.returncode == 2 and "arcface:0123456789ab" in found.stderr and "Traceback" not in found.stderr
    Gallery(tmp_path / "empty.db").close()  # an empty gallery is fine: no embedder to disagree with
    assert cli("find", media_dir / PHOTOS / "obama.jpg", "--gallery", tmp_path / "empty.db").returncode == 0


def test_a_missing_gallery_is_an_error_never_a_new_file(tmp_path, media_dir):
    missing = tmp_path / "people.db"
    for args in (("find", media_dir / PHOTOS / "obama.jpg"), ("run", media_dir / "facenet_pytorch/examples/video.mp4",
                                                              "--quiet")):
        done = cli(*args, "--gallery", missing)
        assert done.returncode == 2 and "does not exist" in done.stderr and len(done.stderr.splitlines()) == 1
        assert not missing.exists()
    from streamer.config import load_settings
    from streamer.engine import FaceEngine

    engine = FaceEngine(load_settings())
    with pytest.raises(GalleryError, match="does not exist"):
        engine.find(media_dir / PHOTOS / "obama.jpg", str(missing))
    assert not missing.exists()
