"""User mistakes the CLI reports at once, in one line: a missing video file, a GIF in an import folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import cv2

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "streamer", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=cwd)  # fmt: skip


def test_a_missing_video_file_is_reported_before_any_model_loads(tmp_path):
    started = time.monotonic()
    done = cli("run", tmp_path / "no-such-clip.mp4", "--quiet")
    elapsed = time.monotonic() - started
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0
    assert len(lines) == 1 and "no-such-clip.mp4 does not exist" in lines[0] and "check the path" in lines[0], lines
    # Before: the workers started and loaded the detector and embedder first (about 7 s here). Python start-up
    # and imports alone are well under this.
    assert elapsed < 5, elapsed


def test_a_missing_file_in_the_config_is_reported_the_same_way(tmp_path):
    config = tmp_path / "site.yaml"
    config.write_text(f"sources:\n  - url: {tmp_path / 'gone.mp4'}\n    id: door\n")
    done = cli("run", "--config", config, "--quiet")
    assert done.returncode != 0
    assert "gone.mp4 does not exist" in done.stderr and "Traceback" not in done.stderr


def test_gallery_import_accepts_what_gallery_add_accepts(tmp_path, media_dir):
    photo = cv2.imread(str(media_dir / "face_recognition/examples/obama.jpg"))
    people = tmp_path / "people" / "Barack Obama"
    people.mkdir(parents=True)
    assert cv2.imwrite(str(people / "portrait.gif"), photo)  # a GIF, as phones and web pages still give
    gallery = tmp_path / "people.db"
    added = cli("gallery", "add", "Solo", people / "portrait.gif", "--gallery", tmp_path / "solo.db")
    assert added.returncode == 0, added.stderr
    imported = cli("gallery", "import", tmp_path / "people", "--gallery", gallery)
    assert imported.returncode == 0, imported.stderr  # before: "portrait.gif: not an image file"
    listed = cli("gallery", "list", "--gallery", gallery, "--json")
    assert [p["name"] for p in json.loads(listed.stdout)] == ["Barack Obama"]


def test_a_text_file_among_the_photos_is_still_refused_by_content(tmp_path, media_dir):
    person = tmp_path / "people" / "Barack Obama"
    person.mkdir(parents=True)
    (person / "notes.jpg").write_text("not a photo, whatever the suffix says")
    done = cli("gallery", "import", tmp_path / "people", "--gallery", tmp_path / "people.db")
    assert done.returncode != 0 and "notes.jpg: not an image file" in done.stderr
    assert not (tmp_path / "people.db").exists() or "Barack" not in cli(
        "gallery", "list", "--gallery", tmp_path / "people.db").stdout
