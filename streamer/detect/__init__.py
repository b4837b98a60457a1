"""Face detectors behind one interface (`Detector.detect`), chosen by name through `create_detector`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from streamer.detect.base import Detector, check_image, shrink
from streamer.detect.blazeface import BlazeFaceDetector
from streamer.detect.scrfd import SCRFD2_5GDetector, SCRFD500MDetector, SCRFDDetector
from streamer.detect.yunet import YuNetDetector
from streamer.errors import ConfigError
from streamer.models.runtime import RuntimeOptions

if TYPE_CHECKING:
    from streamer.config import DetectorSettings
    from streamer.models.registry import ModelRegistry

DETECTORS: dict[str, type[Detector]] = {
    cls.name: cls for cls in (YuNetDetector, BlazeFaceDetector, SCRFD500MDetector, SCRFD2_5GDetector)
}


def create_detector(
    settings: DetectorSettings, registry: ModelRegistry, runtime: RuntimeOptions | None = None
) -> Detector:
    """The detector named in `settings`, loaded from the file the registry resolves for that name.

    A missing, corrupt or licence-blocked model raises the registry's ModelError unchanged.
    `runtime` (device, threads) applies to the onnxruntime-based detectors (SCRFD, and YuNet on its
    default onnxruntime backend, which otherwise runs on 1 thread); `settings.backend` picks YuNet's.
    """
    try:
        cls = DETECTORS[settings.name]
    except KeyError:
        raise ConfigError(
            f"setting detector.name: unknown detector {settings.name!r}; known: {', '.join(DETECTORS)}"
        ) from None
    path = registry.resolve(settings.name)
    options = dict(
        score_threshold=settings.score_threshold,
        nms_threshold=settings.nms_threshold,
        max_side=settings.max_side,
        min_face=settings.min_face,
    )
    if cls is YuNetDetector:
        # getattr: settings from before DetectorSettings had a backend field still work.
        backend = getattr(settings, "backend", "onnxruntime")
        if backend == "onnxruntime":
            return YuNetDetector(path, backend=backend, runtime=runtime, **options)
        return YuNetDetector(path, backend=backend, **options)
    if issubclass(cls, SCRFDDetector) and runtime is not None:
        return cls(path, runtime=runtime, **options)
    return cls(path, **options)


__all__ = [
    "DETECTORS",
    "BlazeFaceDetector",
    "Detector",
    "SCRFD2_5GDetector",
    "SCRFD500MDetector",
    "SCRFDDetector",
    "YuNetDetector",
    "check_image",
    "create_detector",
    "shrink",
]
