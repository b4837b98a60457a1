"""Negative examples: `gallery reject NAME IMG...` teaches "this is not NAME"."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from streamer.match.gallery import APPLICATION_ID, Gallery
from streamer.match.matcher import Matcher

REPO = Path(__file__).resolve().parents[1]
EMB = "test-embedder"
# The different-people pair of the shared photos nearest for dlib_resnet (tools/lookalike.py): 0.543 < 0.6.
# The look-alike pair of the shared photos (tools/lookalike.py: the nearest different-people pair, 0.565
# with the default embedder), and another photo of B than the probe.
A_PHOTO = "facenet_pytorch/data/test_images_aligned/angelina_jolie/1.png"
B_PROBE = "facenet_pytorch/data/test_images_aligned/kate_siegel/1.png"
B_OTHER = "facenet_pytorch/data/test_images/kate_siegel/1.jpg"
A_OTHERS = ["deepface/img2.jpg", "deepface/img4.jpg", "deepface/img5.jpg"]  # the same actress, another repo


def cli(*args: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "streamer", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=120)  # fmt: skip


def test_a_person_whose_negatives_are_nearer_is_skipped_for_the_next(tmp_path):
    with Gallery(tmp_path / "g.db") as g:
        g.add("Ann", np.array([[0.0, 0.0]]), EMB)
        g.add("Bea", np.array([[3.0, 0.0]]), EMB)
        matcher = Matcher(g, EMB, "euclidean", threshold=2.5)
        query = np.array([[1.0, 0.0], [-0.5, 0.0]])
        assert [m.name for m in matcher.match(query)] == ["Ann", "Ann"]
        g.reject("Ann", np.array([[1.2, 0.0]]), EMB)
        # Nearer to Ann's negative (0.2) than to Ann (1.0): Bea (2.0) instead. The other query is still Ann's.
        got = matcher.match(query)
        assert [m.name for m in got] == ["Bea", "Ann"] and got[0].distance == pytest.approx(2.0)
        g.reject("Bea", np.array([[1.1, 0.0]]), EMB)
        assert matcher.match(query)[0].name is None
        assert [(p.name, p.faces, p.negatives) for p in g.people()] == [("Ann", 1, 1), ("Bea", 1, 1)]


def test_reject_needs_an_enrolled_person_and_skips_the_same_photo_twice(tmp_path):
    from streamer.errors import GalleryError

    with Gallery(tmp_path / "g.db") as g:
        with pytest.raises(GalleryError, match="enrol them before"):
            g.reject("Nobody", np.ones((1, 2)), EMB)
        g.add("Ann", np.zeros((1, 2)), EMB)
        assert g.reject("Ann", np.ones((1, 2)), EMB, ["x.jpg"], ["h1"]).added == 1
        again = g.reject("Ann", np.ones((1, 2)), EMB, ["x.jpg"], ["h1"])
        assert again.added == 0 and again.duplicates == ("x.jpg",)


def _version_1_gallery(path: Path) -> Path:
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE people (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, created_at TEXT NOT NULL,"
        " metadata TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(metadata)));"
        "CREATE TABLE faces (id INTEGER PRIMARY KEY, person_id INTEGER NOT NULL REFERENCES people(id) ON DELETE CASCADE,"
        " embedder_id TEXT NOT NULL, dim INTEGER NOT NULL CHECK (dim > 0),"
        " vector BLOB NOT NULL CHECK (length(vector) = 4 * dim), source TEXT, created_at TEXT NOT NULL);"
        "CREATE INDEX faces_by_embedder ON faces(embedder_id, person_id);"
        "CREATE INDEX faces_by_person ON faces(person_id);"
        f"PRAGMA application_id = {APPLICATION_ID}; PRAGMA user_version = 1;"
    )
    conn.execute("INSERT INTO people (name, created_at) VALUES ('Ann', '2026-01-01T00:00:00+00:00')")
    conn.execute("INSERT INTO faces (person_id, embedder_id, dim, vector, created_at) VALUES (1, ?, 2, ?, 'x')",
                 (EMB, np.zeros(2, np.float32).tobytes()))
    conn.commit()
    conn.close()
    return path


def test_a_version_1_gallery_opened_read_only_by_a_reader_is_upgraded_once(tmp_path):
    """Fault: `streamer run` (a read-only reader) refused every gallery an older streamer wrote."""
    path = _version_1_gallery(tmp_path / "old.db")
    with Gallery(path, create=False, readonly=True) as g:
        names, vectors = g.matrix(EMB)
        assert list(names) == ["Ann"] and vectors.shape == (1, 2)
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 2


def test_a_version_1_gallery_is_migrated_and_remove_erases_negatives(tmp_path):
    path = _version_1_gallery(tmp_path / "old.db")
    marker = np.array([[1234.5678, -8765.4321]], np.float32)
    with Gallery(path) as g:
        assert [(p.name, p.faces, p.negatives) for p in g.people()] == [("Ann", 1, 0)]
        g.reject("Ann", marker, EMB)
        assert g.people()[0].negatives == 1
        assert marker.tobytes() in path.read_bytes()
        g.remove("Ann")
    assert marker.tobytes() not in path.read_bytes()  # deleting a person erases their negatives too


@pytest.fixture(scope="module")
def engine(model_dir, cache_dir):
    from streamer.config import load_settings
    from streamer.engine import FaceEngine

    settings = load_settings(overrides={"model_dir": str(model_dir), "models": {"cache_dir": str(cache_dir)}})
    with FaceEngine(settings) as engine:
        yield engine


def test_a_real_look_alike_stops_being_named_after_one_rejection(tmp_path, engine, media_dir):
    a, probe, other = media_dir / A_PHOTO, media_dir / B_PROBE, media_dir / B_OTHER
    a_others = [media_dir / name for name in A_OTHERS]
    with Gallery(tmp_path / "g.db") as g:
        engine.enroll(g, "Angelina Jolie", [a])
        before = engine.find(probe, g)
        assert [f.name for f in before] == ["Angelina Jolie"]  # the look-alike is named A
        assert before[0].distance < engine.embedder.spec.threshold
        assert engine.reject(g, "Angelina Jolie", [other]) == 1  # another photo of B than the probe
        assert [f.name for f in engine.find(probe, g)] == [None]
        for image in a_others:
            assert [f.name for f in engine.find(image, g)] == ["Angelina Jolie"]


def test_cli_reject_list_and_remove(tmp_path, media_dir):
    gallery = tmp_path / "people.db"
    assert cli("gallery", "add", "Angelina Jolie", media_dir / A_PHOTO, "--gallery", gallery).returncode == 0
    done = cli("gallery", "reject", "Angelina Jolie", media_dir / B_OTHER, "--gallery", gallery)
    assert done.returncode == 0 and "1 face(s) as not Angelina Jolie" in done.stderr, done.stderr
    listed = json.loads(cli("gallery", "list", "--gallery", gallery, "--json").stdout)
    assert [(p["name"], p["faces"], p["negatives"]) for p in listed] == [("Angelina Jolie", 1, 1)]
    found = json.loads(cli("find", media_dir / B_PROBE, "--gallery", gallery, "--json").stdout)
    assert [f["name"] for f in found] == [None]
    missing = cli("gallery", "reject", "Nobody", media_dir / B_OTHER, "--gallery", gallery)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr and len(missing.stderr.splitlines()) == 1
