"""The models the inference worker runs on each batch: the embedder and the enabled attribute heads,
one onnxruntime session each, one `session.run` per model per batch."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from streamer.infer.attributes import prepare_function
from streamer.types import Faces


class InferenceModels:
    def __init__(self, embedder, heads: Mapping[str, object]) -> None:  # noqa: ANN001
        self.embedder = embedder
        self.heads = dict(heads)
        self.device = embedder.model.device
        self._warm_up()

    @classmethod
    def load(cls, factory) -> InferenceModels:  # noqa: ANN001 - a ModelFactory
        return cls(factory.embedder(), factory.heads())

    @property
    def chip_size(self) -> int:
        return self.embedder.spec.chip_size

    def _warm_up(self) -> None:
        """First runs allocate and plan; do them now, not on the first real faces (latency)."""
        image = np.zeros((160, 160, 3), np.uint8)
        faces = Faces(boxes=[[40, 40, 120, 120]], scores=[1.0],
                      landmarks=[[[60, 70], [100, 70], [80, 90], [65, 105], [95, 105]]])
        self.run({"chips": self.embedder.spec.prepare(image, faces),
                  **{name: prepare_function(name)(image, faces) for name in self.heads}})

    def run(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """{"embedding": (N, D), "<head>": values} for {"chips": ..., "<head>": crops}."""
        out: dict[str, np.ndarray] = {}
        chips = arrays.get("chips")
        if chips is not None:
            out["embedding"] = self.embedder.embed(chips).astype(np.float32, copy=False)
        for name, head in self.heads.items():
            if name in arrays:
                out.update({k: np.asarray(v, np.float32) for k, v in head.predict_arrays(arrays[name]).items()})
        return out
