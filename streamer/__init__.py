"""streamer: real-time face analytics for video streams, and DeepFace-style calls on images.

    import streamer
    streamer.verify("a.jpg", "b.jpg")                # VerifyResult(verified=..., distance=..., ...)
    streamer.analyze("group.jpg")                    # [AnalyzedFace(box, score, attributes), ...]
    streamer.find("group.jpg", gallery="people.db")  # [FoundFace(box, match, match_score, ...), ...]
    streamer.represent("face.jpg")                   # (Faces, embeddings)

These use one default `FaceEngine` built from the environment (STREAMER_... variables) on first use;
build your own `streamer.engine.FaceEngine(settings)` for anything else. Importing this package loads
no model and no native library.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from streamer.engine import FaceEngine, ImageInput

__version__ = "0.1.0"
__all__ = ["analyze", "default_engine", "detect", "find", "represent", "verify"]

_engine: FaceEngine | None = None


def default_engine() -> FaceEngine:
    global _engine
    if _engine is None:
        from streamer.engine import FaceEngine

        _engine = FaceEngine()
    return _engine


def detect(image: ImageInput):
    return default_engine().detect(image)


def represent(image: ImageInput):
    return default_engine().represent(image)


def verify(image_a: ImageInput, image_b: ImageInput):
    return default_engine().verify(image_a, image_b)


def analyze(image: ImageInput):
    return default_engine().analyze(image)


def find(image: ImageInput, gallery: str | Path | Any):
    """`gallery` is a path to a gallery file or an open `streamer.match.gallery.Gallery`."""
    engine = default_engine()
    if isinstance(gallery, (str, Path)):
        opened = engine.open_gallery(gallery)
        try:
            return engine.find(image, opened)
        finally:
            opened.close()
    return engine.find(image, gallery)
