"""The command line as users and scripts see it: JSON contracts, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cli(model_dir, cache_dir):
    env = {
        **os.environ,
        "STREAMER_MODEL_DIR": str(model_dir),
        "STREAMER_MODELS__CACHE_DIR": str(cache_dir),
        "PYTHONPATH": str(REPO),
    }

    def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [sys.executable, "-m", "streamer", *args], capture_output=True, text=True, env=env, timeout=300
        )
        if ok:
            assert result.returncode == 0, result.stderr
        return result

    return run


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("streamer: error: ")
    return lines[0]


def test_verify_same_and_different_person(cli, media_dir):
    same = json.loads(cli("verify", str(media_dir / "deepface/img1.jpg"), str(media_dir / "deepface/img2.jpg"), "--json").stdout)
    assert set(same) >= {"verified", "distance", "threshold", "model", "model_id", "facial_areas"}
    assert same["verified"] is True and same["distance"] < same["threshold"] == 0.6
    assert same["model"] == "dlib_resnet" and same["model_id"] == "dlib_resnet_v1"
    result = cli("verify", str(media_dir / "deepface/img1.jpg"), str(media_dir / "deepface/img13.jpg"), "--json", ok=False)
    assert result.returncode == 1, result.stderr  # like cmp/diff: 1 = different
    different = json.loads(result.stdout)
    assert different["verified"] is False and different["distance"] > different["threshold"]


def test_verify_pairs_reports_bad_rows_and_goes_on(cli, media_dir, tmp_path):
    blank = tmp_path / "blank.png"
    import cv2
    import numpy as np

    cv2.imwrite(str(blank), np.full((200, 200, 3), 127, np.uint8))
    (tmp_path / "notes.jpg").write_text("not an image")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(
        "file_a,file_b\n"
        f"{media_dir}/deepface/img1.jpg,{media_dir}/deepface/img2.jpg\n"
        f"{media_dir}/deepface/img1.jpg,{blank}\n"
        f"{media_dir}/deepface/img1.jpg,notes.jpg\n"
        f"missing.jpg,{media_dir}/deepface/img2.jpg\n"
        f"{media_dir}/deepface/img1.jpg,{media_dir}/deepface/img13.jpg\n"
    )
    result = cli("verify", "--pairs", str(pairs), "--json", ok=False)
    assert result.returncode == 2, result.stderr  # some pairs could not be compared
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 5
    assert rows[0]["verified"] is True and "error" not in rows[0]
    for row in rows[1:4]:
        assert row["verified"] is None and row["error"]
    assert "no face" in rows[1]["error"] and "not an image" in rows[2]["error"] and "no such file" in rows[3]["error"]
    assert rows[4]["verified"] is False and rows[4]["distance"] > 0.6
    assert all({"file_a", "file_b", "verified", "distance"} <= set(r) for r in rows)


def test_analyze_json_contract(cli, media_dir):
    faces = json.loads(cli("analyze", str(media_dir / "deepface/img1.jpg"), "--json").stdout)
    assert len(faces) >= 1
    face = max(faces, key=lambda f: (f["box"][2] - f["box"][0]) * (f["box"][3] - f["box"][1]))
    assert len(face["box"]) == 4 and 0 < face["detection_score"] <= 1
    assert 15 < face["age"] < 60
    assert face["gender"]["label"] == "woman" and 0.5 <= face["gender"]["probability"] <= 1
    assert face["emotion"]["label"] in face["emotion"]["scores"] and len(face["emotion"]["scores"]) == 7
    assert "race" not in face


def test_gallery_enroll_find_list_remove(cli, media_dir, tmp_path):
    gallery = tmp_path / "people.db"
    cli("gallery", "add", "obama", str(media_dir / "face_recognition/examples/obama.jpg"), "--gallery", str(gallery))
    cli("gallery", "add", "biden", str(media_dir / "face_recognition/examples/biden.jpg"), "--gallery", str(gallery))
    listed = json.loads(cli("gallery", "list", "--gallery", str(gallery), "--json").stdout)
    assert sorted((p["name"], p["faces"]) for p in listed) == [("biden", 1), ("obama", 1)]

    found = json.loads(cli("find", str(media_dir / "face_recognition/examples/obama2.jpg"), "--gallery", str(gallery), "--json").stdout)
    assert [f["name"] for f in found] == ["obama"]
    assert 0.5 < found[0]["score"] <= 1 and len(found[0]["box"]) == 4 and 0 < found[0]["detection_score"] <= 1
    two = json.loads(cli("find", str(media_dir / "face_recognition/examples/two_people.jpg"), "--gallery", str(gallery), "--json").stdout)
    assert sorted(str(f["name"]) for f in two) == ["biden", "obama"]

    cli("gallery", "rename", "biden", "joe", "--gallery", str(gallery))
    cli("gallery", "remove", "obama", "--gallery", str(gallery))
    listed = json.loads(cli("gallery", "list", "--gallery", str(gallery), "--json").stdout)
    assert [p["name"] for p in listed] == ["joe"]
    found = json.loads(cli("find", str(media_dir / "face_recognition/examples/obama2.jpg"), "--gallery", str(gallery), "--json").stdout)
    assert [f["name"] for f in found] == [None]


def test_gallery_import_enrols_what_works_and_says_what_it_left_out(cli, media_dir, tmp_path):
    people = tmp_path / "people"
    (people / "obama").mkdir(parents=True)
    (people / "biden").mkdir()
    for name in ("obama.jpg", "obama2.jpg"):
        (people / "obama" / name).write_bytes((media_dir / "face_recognition/examples" / name).read_bytes())
    (people / "biden" / "biden.jpg").write_bytes((media_dir / "face_recognition/examples/biden.jpg").read_bytes())
    gallery = tmp_path / "g.db"
    cli("gallery", "import", str(people), "--gallery", str(gallery))
    listed = {p["name"]: p["faces"] for p in json.loads(cli("gallery", "list", "--gallery", str(gallery), "--json").stdout)}
    assert listed == {"obama": 2, "biden": 1}

    (people / "kit").mkdir()
    (people / "kit" / "kit.jpg").write_bytes((media_dir / "face_recognition/examples/obama_small.jpg").read_bytes())
    (people / "kit" / "readme.txt").write_text("not a photo")
    # A stray non-image is a warning (exit 0); the photos already enrolled add nothing.
    done = cli("gallery", "import", str(people), "--gallery", str(gallery))
    assert "readme.txt: not an image" in done.stderr and "skipped 3 already enrolled" in done.stderr
    listed = {p["name"]: p["faces"] for p in json.loads(cli("gallery", "list", "--gallery", str(gallery), "--json").stdout)}
    assert listed == {"obama": 2, "biden": 1, "kit": 1}

    # A photo that cannot be read fails the import (exit 2), named, while the rest still lands.
    (people / "kit" / "broken.jpg").write_text("not a photo either")
    fresh = tmp_path / "fresh.db"
    failed = cli("gallery", "import", str(people), "--gallery", str(fresh), ok=False)
    assert failed.returncode == 2 and "broken.jpg: not an image file" in failed.stderr
    assert "Traceback" not in failed.stderr
    listed = {p["name"]: p["faces"] for p in json.loads(cli("gallery", "list", "--gallery", str(fresh), "--json").stdout)}
    assert listed == {"obama": 2, "biden": 1, "kit": 1}


@pytest.mark.parametrize(
    "args, expected",
    [
        (["analyze", "/nonexistent/photo.jpg"], "no such file"),
        (["verify", "{readme}", "{img}"], "not an image"),
        (["gallery", "import", "{empty}", "--gallery", "{tmp}/g.db"], "no sub-folders"),
        (["analyze", "{img}", "--detector", "nosuch"], "setting detector.name"),
        (["analyze", "{blank}"], None),
        (["gallery", "add", "x", "{img}", "--gallery", "/nonexistent-dir/g.db"], "does not exist"),
        (["gallery", "add", "x", "{img}", "--gallery", "{img}"], "gallery"),
        (["find", "{img}", "--gallery", "{tmp}/missing.db"], "gallery"),
    ],
)
def test_user_errors_are_one_line(cli, media_dir, tmp_path, args, expected):
    import cv2
    import numpy as np

    (tmp_path / "empty").mkdir()
    cv2.imwrite(str(tmp_path / "blank.png"), np.zeros((100, 100, 3), np.uint8))
    values = {
        "readme": str(REPO / "README.md"),
        "img": str(media_dir / "deepface/img1.jpg"),
        "empty": str(tmp_path / "empty"),
        "tmp": str(tmp_path),
        "blank": str(tmp_path / "blank.png"),
    }
    if expected is None:  # a photo with no face is not an error for analyze: an empty list
        assert json.loads(cli(*[a.format(**values) for a in args], "--json").stdout) == []
        return
    assert expected in one_line_error(cli(*[a.format(**values) for a in args], ok=False))
    assert not list(tmp_path.glob("*.db")), "a failed command must not leave a gallery file behind"


def test_corrupt_and_unknown_model_files(cli, media_dir, tmp_path):
    corrupt = tmp_path / "yunet.onnx"
    corrupt.write_bytes(b"\x08\x01garbage" * 100)
    env_paths = json.dumps({"yunet": str(corrupt)})
    result = subprocess.run(
        [sys.executable, "-m", "streamer", "analyze", str(media_dir / "deepface/img1.jpg")],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO), "STREAMER_MODELS__PATHS": env_paths},
    )
    assert "yunet" in one_line_error(result)
    empty_dir = tmp_path / "models"
    empty_dir.mkdir()
    message = one_line_error(cli("analyze", str(media_dir / "deepface/img1.jpg"), "--model-dir", str(empty_dir), ok=False))
    assert "not found" in message and "face_detection_yunet" in message


def test_models_list(cli):
    rows = json.loads(cli("models", "list", "--json").stdout)
    by_name = {r["name"]: r for r in rows}
    assert {"yunet", "blazeface", "scrfd_500m", "dlib_resnet", "emotion", "gender", "age", "mobilefacenet"} <= set(by_name)
    assert by_name["yunet"]["origin"] == "model_dir" and by_name["yunet"]["licence"].startswith("MIT")
    assert by_name["dlib_resnet"]["origin"] in ("package", "model_dir")
    assert by_name["scrfd_500m"]["commercial_use"] is False
    for row in rows:
        assert len(row["sha256"]) == 64


def test_noncommercial_model_is_opt_in(cli, media_dir):
    message = one_line_error(cli("detect", str(media_dir / "deepface/img1.jpg"), "--detector", "scrfd_500m", ok=False))
    assert "non-commercial" in message
    faces = json.loads(
        cli("detect", str(media_dir / "deepface/img1.jpg"), "--detector", "scrfd_500m", "--allow-noncommercial", "--json").stdout
    )
    assert len(faces) >= 1
