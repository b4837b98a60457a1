"""streamer: real-time face analytics for video streams, and DeepFace-style calls on images.

    import streamer
    streamer.verify("a.jpg", "b.jpg")         # VerifyResult(verified, distance, threshold, model, model_id, ...)
    streamer.analyze("group.jpg")             # [AnalyzedFace(box, detection_score, attributes), ...]
    streamer.find("group.jpg", "people.db")   # [FoundFace(box, detection_score, name, score, distance), ...]
    streamer.represent("face.jpg")            # (Faces, embeddings)

    from streamer import FaceEngine, Gallery
    engine = FaceEngine()                     # or FaceEngine(load_settings(...))
    with Gallery("people.db") as gallery:     # created if missing
        engine.enroll(gallery, "Ada", ["ada1.jpg", "ada2.jpg"])
        faces = engine.find("group.jpg", gallery)

`name` is the matched person (None: unknown) and `score` the match confidence in [0, 1], as in the
published `identity` events; `detection_score` is the detector's confidence.

The module-level calls use one default `FaceEngine` built from the environment (STREAMER_... variables)
on first use. Importing this package loads no model and no native library.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from streamer.engine import FaceEngine, ImageInput
    from streamer.match.gallery import Gallery

__version__ = "0.1.0"
__all__ = ["FaceEngine", "Gallery", "analyze", "default_engine", "detect", "find", "represent", "verify"]

_engine: FaceEngine | None = None


def __getattr__(name: str) -> Any:
    # Lazy, so `import streamer` stays free of OpenCV, onnxruntime and numpy-heavy imports.
    if name == "FaceEngine":
        from streamer.engine import FaceEngine

        return FaceEngine
    if name == "Gallery":
        from streamer.match.gallery import Gallery

        return Gallery
    raise AttributeError(f"module 'streamer' has no attribute {name!r}")


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


def find(image: ImageInput, gallery: str | Path | Gallery):
    """`gallery` is the path of an existing gallery file or an open `Gallery`."""
    return default_engine().find(image, gallery)
