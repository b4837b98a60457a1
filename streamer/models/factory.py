"""The one place that turns settings into loaded models.

The engine (image calls), the detect worker (detector, chip preparation) and the inference worker
(embedder, attribute heads) all get their models here, so `runtime.device` and `runtime.threads`
reach every onnxruntime session, detectors included, and every model resolves through the same
registry rules. Nothing loads until asked for; `resolve_all` only locates files (and converts the
ones that need it), so `streamer run` can fail with one line before it spawns a worker.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from streamer.models.registry import ModelRegistry, sha256_of
from streamer.models.runtime import RuntimeOptions, cores

if TYPE_CHECKING:
    from streamer.config import Settings
    from streamer.detect.base import Detector
    from streamer.infer.attributes import AttributeHead
    from streamer.infer.embedders import Embedder, EmbedderSpec


class ModelFactory:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        models = settings.models
        self.registry = ModelRegistry(
            model_dir=settings.model_dir,
            cache_dir=models.cache_dir,
            paths=models.paths,
            allow_download=models.allow_download,
            allow_noncommercial=models.allow_noncommercial,
        )
        self.runtime = RuntimeOptions(device=settings.runtime.device, intra_op_threads=settings.runtime.threads)

    # -- without sessions ---------------------------------------------------------------------------
    def resolve_all(self, *, embedder: bool = True, heads: bool = True) -> None:
        """Locate (download or convert if allowed) every model a run needs; raises the registry's
        one-line ModelError / ConfigError for the first one that is missing."""
        self.registry.resolve(self.settings.detector.name)
        if embedder:
            self.embedder_spec  # noqa: B018 - resolves the embedder's file and reads its spec
        if heads:
            for name in self.settings.attributes.enabled:
                self.registry.resolve(name)

    @cached_property
    def embedder_path(self) -> Path:
        from streamer.infer.embedders import embedder_path

        return embedder_path(self.settings.embedder.name, self.registry)

    @cached_property
    def embedder_spec(self) -> EmbedderSpec:
        """How chips are aligned and vectors compared, read from the file without a session."""
        from streamer.infer.embedders import embedder_spec

        embedder = self.settings.embedder
        return embedder_spec(embedder.name, self.registry, embedder.threshold, flip_average=embedder.flip_average)

    @cached_property
    def embedder_sha256(self) -> str:
        """The embedder file's hash: two hosts whose vectors are compared must run the same file."""
        return sha256_of(self.embedder_path)

    # -- with sessions ------------------------------------------------------------------------------
    def detector(self, *, for_tracking: bool = False) -> Detector:
        """A new detector. `for_tracking`: ByteTrack's second stage needs low-score detections, so
        detect down to the tracker's low bar (the tracker applies the high bar itself)."""
        from streamer.detect import create_detector

        settings = self.settings.detector
        if for_tracking:
            low = min(settings.score_threshold, self.settings.tracker.low_threshold)
            settings = settings.model_copy(update={"score_threshold": low})
        runtime = None
        if self._detector_takes_runtime(settings):
            # Detection shares its process with decoding: one thread unless the user asked for more.
            threads = self.settings.runtime.threads or 1
            runtime = RuntimeOptions(device=self.runtime.device, intra_op_threads=threads)
        return create_detector(settings, self.registry, runtime)

    @staticmethod
    def _detector_takes_runtime(settings) -> bool:  # noqa: ANN001
        # BlazeFace runs in MediaPipe and YuNet's OpenCV backend in cv2.dnn: neither takes onnxruntime options.
        if settings.name == "blazeface":
            return False
        return not (settings.name == "yunet" and settings.backend == "opencv")

    # Threads for the inference models when runtime.threads is 0, measured per face on the 2-core machine
    # (one dlib ResNet chip and the three attribute heads, `runtime.threads` 0 against 1): onnxruntime's
    # choice (2 threads) took 9.5 CPU-ms for a 5.5 ms embedding against 7.1 for 7.1 on one thread, and
    # 6.3 CPU-ms for 3.9 ms of attributes against 3.7 for 3.7. The heads are too small to split: one
    # thread, always. The embedder splits well where cores are spare, but with 2 cores a pipeline has none
    # (decoding and detection are using them), so there it runs on one thread too.
    def _inference_runtime(self, *, small: bool) -> RuntimeOptions:
        if self.settings.runtime.threads or not (small or cores() <= 2):
            return self.runtime
        return RuntimeOptions(device=self.runtime.device, intra_op_threads=1)

    def embedder(self) -> Embedder:
        from streamer.infer.embedders import create_embedder

        embedder = self.settings.embedder
        return create_embedder(embedder.name, self.registry, self._inference_runtime(small=False),
                               threshold=embedder.threshold, flip_average=embedder.flip_average)

    def head(self, name: str) -> AttributeHead:
        from streamer.infer.attributes import create_attribute_head

        return create_attribute_head(name, self.registry, self._inference_runtime(small=True))

    def heads(self) -> dict[str, AttributeHead]:
        return {name: self.head(name) for name in self.settings.attributes.enabled}
