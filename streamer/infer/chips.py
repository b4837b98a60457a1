"""What the detect worker cuts out of a frame for the inference worker: one array per model.

Chip preparation needs no session (alignment templates and crop rules only), so it runs where the
frame is and only pixels cross to the process that holds the models.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from streamer.infer.attributes import prepare_function
from streamer.infer.embedders import EmbedderSpec
from streamer.types import Faces


class ChipPreparer:
    """`prepare(image, faces)` -> {"chips": (N,S,S,3) uint8, "<head>": crops for that head, ...}."""

    def __init__(
        self, spec: EmbedderSpec, heads: Sequence[str], redetect: Callable[[np.ndarray], Faces] | None = None
    ) -> None:
        """redetect: the frame detector's `detect`, to align embedder chips on landmarks found again on a
        view of each face cut with its first alignment (EmbedderSpec.prepare); None: the frame's landmarks."""
        self.spec = spec
        self.heads = tuple(heads)
        self.redetect = redetect
        self._prepare_head = {name: prepare_function(name) for name in self.heads}

    @property
    def chip_size(self) -> int:
        return self.spec.chip_size

    def prepare(self, image: np.ndarray, faces: Faces) -> dict[str, np.ndarray]:
        arrays = {"chips": self.spec.prepare(image, faces, self.redetect)}
        for name, prepare in self._prepare_head.items():
            arrays[name] = prepare(image, faces)
        return arrays
