"""What a newcomer meets at the command line: exit codes, field names, help, one-line usage errors.

Real CLI on real photos: `streamer.cli.main([...])` in this process (one model load per call), or the
`streamer` command in a subprocess where the process's own exit status and stderr are the point.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from streamer.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
SINGLE_VERIFY_KEYS = {"verified", "distance", "threshold", "model", "model_id", "detector", "metric", "facial_areas"}


@pytest.fixture
def run(model_dir, monkeypatch, capsys):
    """`streamer ARGS...` in this process: (exit status, stdout, stderr lines)."""
    monkeypatch.setenv("STREAMER_MODEL_DIR", str(model_dir))

    def call(*args: str) -> tuple[int, str, list[str]]:
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, [line for line in err.splitlines() if line.strip()]

    return call


def subprocess_cli(*args: str, model_dir: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if model_dir is not None:
        env["STREAMER_MODEL_DIR"] = str(model_dir)
    return subprocess.run([sys.executable, "-m", "streamer", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def assert_one_line_error(err: list[str] | str, *needles: str) -> str:
    lines = err.strip().splitlines() if isinstance(err, str) else err
    assert len(lines) == 1 and lines[0].startswith("streamer: error: "), lines
    assert "Traceback" not in lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def blank(tmp_path) -> Path:
    import cv2
    import numpy as np

    path = tmp_path / "blank.png"
    cv2.imwrite(str(path), np.full((200, 200, 3), 127, np.uint8))
    return path


# -- verify: exit status like cmp/diff ---------------------------------------------------------------
@pytest.mark.parametrize(
    "second, status, says",
    [
        ("deepface/img2.jpg", 0, "same person: distance"),
        ("deepface/img13.jpg", 1, "different people: distance"),
        ("{missing}", 2, "no such file"),
        ("{blank}", 3, "no face found"),
    ],
)
def test_verify_exit_status(run, media_dir, tmp_path, blank, second, status, says):
    second = second.format(missing=tmp_path / "missing.jpg", blank=blank)
    code, out, err = run("verify", media_dir / "deepface/img1.jpg", media_dir / second)
    assert code == status
    if status <= 1:  # a verdict: on stdout, nothing on stderr
        assert out.startswith(says) and "(threshold 0.6, dlib_resnet)" in out and err == []
    else:
        assert out == ""
        assert_one_line_error(err, says)


def test_verify_exit_status_of_the_process(media_dir, model_dir):
    """What a shell script sees (`streamer verify a b && ...`), not just main()'s return value."""
    different = subprocess_cli("verify", str(media_dir / "deepface/img1.jpg"), str(media_dir / "deepface/img13.jpg"),
                               model_dir=model_dir)
    assert different.returncode == 1 and different.stdout.startswith("different people"), different.stderr


def test_verify_pairs_lines_carry_the_single_verify_fields(run, media_dir, tmp_path, blank):
    img1, img2, img13 = (str(media_dir / f"deepface/{n}.jpg") for n in ("img1", "img2", "img13"))
    code, out, _ = run("verify", img1, img2, "--json")
    single = json.loads(out)
    assert code == 0 and set(single) == SINGLE_VERIFY_KEYS

    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"file_a,file_b\n{img1},{img2}\n{img1},{img13}\n")
    code, out, err = run("verify", "--pairs", pairs, "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and err == []  # a "different" pair is a result, not a failure
    assert [set(r) for r in rows] == [SINGLE_VERIFY_KEYS | {"file_a", "file_b"}] * 2
    assert {k: rows[0][k] for k in SINGLE_VERIFY_KEYS} == single
    assert rows[0]["verified"] is True and rows[1]["verified"] is False
    assert rows[1]["facial_areas"]["img_a"] == single["facial_areas"]["img_a"]

    with_error = tmp_path / "with-error.csv"
    with_error.write_text(f"file_a,file_b\n{img1},{img2}\n{img1},{blank}\n{img1},{img13}\n")
    code, out, err = run("verify", "--pairs", with_error, "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 2 and len(rows) == 3  # every pair is still reported
    assert rows[1]["verified"] is None and "no face" in rows[1]["error"] and rows[1]["model"] == "dlib_resnet"
    assert set(rows[1]) == SINGLE_VERIFY_KEYS | {"file_a", "file_b", "error"}
    assert_one_line_error(err, "1 of 3 pairs")

    code, out, err = run("verify", "--pairs", with_error)  # text: the single verify's line after the files
    lines = out.splitlines()
    assert code == 2 and len(lines) == 3
    assert lines[0].startswith(f"{img1}\t{img2}\tsame person: distance")
    assert lines[1].startswith(f"{img1}\t{blank}\terror: ") and "\tdifferent people: " in lines[2]


# -- one name per thing: find --json, FoundFace, the events --------------------------------------------
def test_find_and_events_use_the_same_names(run, media_dir, tmp_path):
    from streamer.engine import AnalyzedFace, FoundFace
    from streamer.publish.events import Identity

    gallery = tmp_path / "people.db"
    assert run("gallery", "add", "obama", media_dir / "face_recognition/examples/obama.jpg", "--gallery", gallery)[0] == 0
    code, out, _ = run("find", media_dir / "face_recognition/examples/obama2.jpg", "--gallery", gallery, "--json")
    found = json.loads(out)
    assert code == 0 and [f["name"] for f in found] == ["obama"]
    fields = [f.name for f in dataclasses.fields(FoundFace)]
    assert all(list(f) == fields for f in found)  # JSON keys = FoundFace fields
    shared = {"name", "score", "distance"}
    assert shared <= set(fields) and shared <= set(Identity.model_fields)  # the identity event's names
    for f in found:
        assert 0.5 < f["score"] <= 1 and f["distance"] < 0.6 and 0.5 < f["detection_score"] <= 1
    assert "detection_score" in {f.name for f in dataclasses.fields(AnalyzedFace)}

    # The detector's confidence is `detection_score` everywhere; a bare `score` is a match score only.
    photo = media_dir / "deepface/img1.jpg"
    for command in ("detect", "represent", "analyze"):
        code, out, _ = run(command, photo, "--json")
        faces = json.loads(out)
        assert code == 0 and faces and all("detection_score" in f and "score" not in f for f in faces), command


def test_models_are_reported_by_the_name_the_user_gave(run, media_dir):
    photo, other = media_dir / "deepface/img1.jpg", media_dir / "deepface/img2.jpg"
    code, _, err = run("represent", photo, "--embedder", "mobilefacenet")
    assert code == 2
    assert_one_line_error(err, "non-commercial", "--allow-noncommercial")

    code, out, _ = run("represent", photo, "--embedder", "mobilefacenet", "--allow-noncommercial", "--json")
    faces = json.loads(out)
    assert code == 0 and faces
    assert {f["model"] for f in faces} == {"mobilefacenet"}
    (model_id,) = {f["model_id"] for f in faces}
    assert model_id.startswith("arcface:") and all(len(f["embedding"]) == 128 for f in faces)

    code, out, _ = run("verify", photo, other, "--embedder", "mobilefacenet", "--allow-noncommercial", "--json")
    result = json.loads(out)
    assert code == 0 and result["model"] == "mobilefacenet" and result["model_id"] == model_id
    assert result["metric"] == "cosine"

    code, out, _ = run("represent", photo)
    assert code == 0 and "(dlib_resnet, dlib_resnet_v1)" in out


def test_arcface_model_flag(run, media_dir, model_dir, tmp_path):
    photo = media_dir / "deepface/img1.jpg"
    code, _, err = run("represent", photo, "--embedder", "arcface")
    assert code == 2
    assert_one_line_error(err, "--arcface-model", "models.paths.arcface")
    code, _, err = run("represent", photo, "--arcface-model", tmp_path / "nope.onnx")
    assert code == 2
    assert_one_line_error(err, "file not found", "--arcface-model")

    # The flag alone selects the ArcFace adapter for that file (its id is the file's sha256 prefix).
    code, out, _ = run("represent", photo, "--arcface-model", model_dir / "mobilefacenet.onnx", "--json")
    faces = json.loads(out)
    assert code == 0 and faces and {f["model"] for f in faces} == {"arcface"}
    assert all(f["model_id"].startswith("arcface:") for f in faces)


# -- help and version ----------------------------------------------------------------------------------
def test_version(run):
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    code, out, err = run("--version")
    assert code == 0 and out.strip() == f"streamer {version}" and err == []


def _leaf_commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(path, parser) of every subcommand, nested ones included."""
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subparsers:
        yield path, parser
        return
    for name, child in subparsers[0].choices.items():
        yield path + (name,), child
        yield from _leaf_commands(child, path + (name,))


def test_every_command_help_has_an_example_defaults_and_help_for_every_argument(run):
    commands = list(_leaf_commands(build_parser()))
    assert len(commands) >= 20
    for path, parser in commands:
        code, text, err = run(*path, "--help")
        assert code == 0 and err == [], path
        flat = " ".join(text.split())
        assert f"example: streamer {' '.join(path)}" in flat, path
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help, f"{' '.join(path)}: {action.option_strings or action.dest} has no help text"
            default = action.default
            if default not in (None, False, argparse.SUPPRESS) and action.nargs != 0:
                assert f"(default: {default})" in flat, (path, action.dest)
            if action.option_strings and default is None and action.dest in {
                "detector", "embedder", "threshold", "device", "publish", "bind", "count", "timeout", "frames",
            }:
                assert "default:" in " ".join(action.help.split()), (path, action.dest)


def test_every_help_example_parses():
    """The examples in the help are commands the parser accepts, for the command they illustrate."""
    import shlex

    parser = build_parser()
    examples = [(path, sub.epilog) for path, sub in _leaf_commands(parser)] + [((), parser.epilog)]
    checked = 0
    for path, epilog in examples:
        for line in epilog.split("example:\n", 1)[1].splitlines():
            words = shlex.split(line, comments=True)
            words = words[: next((i for i, w in enumerate(words) if w in ("&&", ">", "|")), len(words))]
            assert words[0] == "streamer" and tuple(words[1 : 1 + len(path)]) == path, line
            args = parser.parse_args(words[1:])
            assert callable(args.func), line
            checked += 1
    assert checked > len(examples)


def test_help_lists_every_detector_and_embedder():
    from typing import get_args

    from streamer.config import DetectorSettings
    from streamer.infer.embedders import EMBEDDER_NAMES

    verify = dict(_leaf_commands(build_parser()))[("verify",)]
    helps = {a.dest: " ".join(a.help.split()) for a in verify._actions}
    assert all(name in helps["detector"] for name in get_args(DetectorSettings.model_fields["name"].annotation))
    assert all(name in helps["embedder"] for name in EMBEDDER_NAMES)


@pytest.mark.parametrize("action", ["list", "remove", "rename"])
def test_gallery_commands_that_embed_nothing_take_no_model_options(run, tmp_path, action):
    code, text, _ = run("gallery", action, "--help")
    assert code == 0
    for flag in ("--detector", "--embedder", "--threshold", "--device", "--model-dir", "--arcface-model"):
        assert flag not in text, (action, flag)
    positional = {"list": [], "remove": ["Ada"], "rename": ["Ada", "Ada L"]}[action]
    code, out, err = run("gallery", action, *positional, "--gallery", tmp_path / "g.db", "--detector", "yunet")
    assert code == 2 and out == ""
    assert_one_line_error(err, "unrecognized arguments: --detector", f"streamer gallery {action} --help")
    assert not (tmp_path / "g.db").exists()


# -- usage errors: one line, exit 2, from the process and from main() -----------------------------------
@pytest.mark.parametrize(
    "args, needle",
    [
        (["subscribe", "--count", "-1"], "--count"),
        (["subscribe", "--count", "0"], "--count"),
        (["subscribe", "--count", "many"], "--count"),
        (["subscribe", "--timeout", "-1"], "--timeout"),
        (["bench", "clip.mp4", "--frames", "0"], "--frames"),
    ],
)
def test_bad_numbers_are_one_line_with_a_remedy(args, needle):
    # Before: --count -1 ended in a ValueError traceback, and --count 0 connected and printed nothing.
    done = subprocess_cli(*args, timeout=30)
    assert done.returncode == 2 and done.stdout == ""
    line = assert_one_line_error(done.stderr, needle, "leave it out" if needle == "--timeout" else f"leave {needle} out")
    assert f"`streamer {args[0]} --help`" in line


@pytest.mark.parametrize(
    "args, needle",
    [
        ([], "COMMAND"),
        (["nosuch"], "invalid choice"),
        (["verify", "--bogus"], "unrecognized arguments: --bogus"),
        (["gallery"], "ACTION"),
        (["find", "photo.jpg"], "--gallery"),
    ],
)
def test_main_returns_2_on_usage_errors(run, args, needle):
    code, out, err = run(*args)
    assert code == 2 and out == ""
    assert_one_line_error(err, needle, "--help")


def test_help_returns_0_from_main(run):
    code, out, err = run("--help")
    assert code == 0 and "usage: streamer" in out and err == []


def test_verify_arguments_that_do_not_go_together(run, media_dir, tmp_path):
    img = media_dir / "deepface/img1.jpg"
    for args, needle in [((img,), "two images"), ((img, img, "--pairs", tmp_path / "p.csv"), "not both"),
                         ((img, img, "--root", tmp_path), "--root")]:
        code, out, err = run("verify", *args)
        assert code == 2 and out == ""
        assert_one_line_error(err, needle)
    empty = tmp_path / "empty.csv"
    empty.write_text("file_a,file_b\n")
    code, _, err = run("verify", "--pairs", empty)
    assert code == 2
    assert_one_line_error(err, "no pairs")


def test_stream_id_with_a_path_separator_is_a_setting_error(media_dir, model_dir, tmp_path):
    # Before: with --output and two sources the id went into the file name and the detect worker died on
    # a ValueError traceback, five times, then "keeps crashing" (exit 1).
    clip = media_dir / "face_recognition/examples/short_hamilton_clip.mp4"
    for bad in ("a/b", "a\\\\b"):
        config = tmp_path / "cams.yaml"
        config.write_text(f'sources:\n  - url: {clip}\n    id: "{bad}"\n    max_frames: 3\n'
                          f"  - url: {clip}\n    id: cam2\n    max_frames: 3\n")
        done = subprocess_cli("run", "--config", str(config), "--output", str(tmp_path / "out.mp4"), "-q",
                              model_dir=model_dir, timeout=60)
        assert done.returncode == 2, done.stderr
        assert_one_line_error(done.stderr, "stream id")
        assert not list(tmp_path.glob("*.mp4"))
