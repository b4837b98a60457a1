"""SCRFD (InsightFace model zoo; NON-COMMERCIAL weights, opt-in through the registry) on onnxruntime.

The network is anchor-free in effect: at each location of the stride 8, 16 and 32 grids it predicts
(for 2 anchors) a score, distances from the location to the four box sides and offsets of the five
landmarks, all in units of the stride. Exports differ in output names and in whether outputs have a
batch dimension, so outputs are recognised by their shape (anchor count x 1 / 4 / 10), never by name.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from streamer.detect.base import Detector, SizeCache
from streamer.errors import ModelError
from streamer.models.runtime import OnnxModel, RuntimeOptions
from streamer.types import Faces, LandmarkScheme

log = logging.getLogger(__name__)

STRIDES = (8, 16, 32)
ANCHORS_PER_LOCATION = 2
_ALIGN = 32  # the coarsest stride: inputs are padded to a multiple of it
_MEAN = 127.5
_STD = 128.0
_SCORE, _BOX, _KPS = 1, 4, 10  # channels of each head's output


def _padded(size: int) -> int:
    return -(-size // _ALIGN) * _ALIGN


def anchor_centers(width: int, height: int) -> dict[int, np.ndarray]:
    """Pixel centres of every anchor, per stride, in the network's output order (row-major, anchors
    of one location adjacent)."""
    centers = {}
    for stride in STRIDES:
        ys, xs = np.mgrid[: height // stride, : width // stride]
        grid = np.stack([xs, ys], axis=-1).reshape(-1, 2).astype(np.float32) * stride
        centers[stride] = np.repeat(grid, ANCHORS_PER_LOCATION, axis=0)
    return centers


class SCRFDDetector(Detector):
    """Shared by both SCRFD sizes; the subclasses only name which registry model they are."""

    name = "scrfd"
    scheme = LandmarkScheme.FIVE
    region_align = STRIDES[-1]

    def __init__(self, model_path: Path, *, runtime: RuntimeOptions | None = None, **options: Any) -> None:
        """`options`: the `Detector` ones (score_threshold, nms_threshold, max_side, min_face)."""
        super().__init__(model_path, **options)
        self.model = OnnxModel(self.model_path, runtime or RuntimeOptions(), name=self.name)
        self.model.check_input((3, _ALIGN, _ALIGN))
        self._anchors: SizeCache[dict[int, np.ndarray]] = SizeCache(self._build_anchors)
        # Fail now, naming the file, if its outputs are not the 3 strides x (score, box, keypoints).
        probe = _ALIGN * 2
        self._split(self.model.run(np.zeros((1, 3, probe, probe), np.float32)), 1, probe, probe)

    @staticmethod
    def _build_anchors(size: Hashable) -> dict[int, np.ndarray]:
        assert isinstance(size, tuple)
        return anchor_centers(*size)

    # -- batching -------------------------------------------------------------------------------
    def _detect(self, image: np.ndarray) -> Faces:
        return self._detect_batch([image])[0]

    def _detect_batch(self, images: list[np.ndarray]) -> list[Faces]:
        """Images of one padded size go through the network together (a video's frames always do)."""
        results: list[Faces | None] = [None] * len(images)
        groups: dict[tuple[int, int], list[int]] = {}
        for index, image in enumerate(images):
            height, width = image.shape[:2]
            groups.setdefault((_padded(width), _padded(height)), []).append(index)
        for (width, height), indices in groups.items():
            padded = [
                cv2.copyMakeBorder(
                    images[i], 0, height - images[i].shape[0], 0, width - images[i].shape[1],
                    cv2.BORDER_CONSTANT, value=(0, 0, 0),
                )
                for i in indices
            ]
            # Padding right/bottom keeps pixel coordinates unchanged: no mapping back is needed.
            blob = cv2.dnn.blobFromImages(
                padded, 1.0 / _STD, (width, height), (_MEAN, _MEAN, _MEAN), swapRB=True
            )
            heads = self._split(self.model.run(blob), len(indices), width, height)
            centers = self._anchors.get((width, height))
            for row, i in enumerate(indices):
                results[i] = self._decode(heads, row, centers)
        return [faces if faces is not None else Faces.empty(self.scheme) for faces in results]

    # -- decoding -------------------------------------------------------------------------------
    def _split(
        self, outputs: list[np.ndarray], batch: int, width: int, height: int
    ) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per stride: scores (B, N), box distances (B, N, 4), keypoint offsets (B, N, 10)."""
        by_shape: dict[tuple[int, int], np.ndarray] = {}
        for output in outputs:
            channels = output.shape[-1]
            # Exports without a batch dimension give (B*N, C) after per-image runs are concatenated.
            by_shape[(output.size // (batch * channels), channels)] = output.reshape(batch, -1, channels)
        heads = {}
        for stride in STRIDES:
            count = (height // stride) * (width // stride) * ANCHORS_PER_LOCATION
            try:
                heads[stride] = (
                    by_shape[(count, _SCORE)][..., 0],
                    by_shape[(count, _BOX)],
                    by_shape[(count, _KPS)],
                )
            except KeyError:
                shapes = [tuple(o.shape) for o in outputs]
                raise ModelError(
                    f"{self.name}: {self.model_path} is not an SCRFD model with keypoints: expected, per "
                    f"stride 8/16/32, outputs of {ANCHORS_PER_LOCATION} anchors x 1, 4 and 10 values; "
                    f"got output shapes {shapes} for a {width}x{height} input"
                ) from None
        return heads

    def _decode(
        self,
        heads: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]],
        row: int,
        centers: dict[int, np.ndarray],
    ) -> Faces:
        boxes, scores, points = [], [], []
        for stride, (score, distance, offset) in heads.items():
            keep = np.flatnonzero(score[row] >= self.score_threshold)
            if keep.size == 0:
                continue
            center = centers[stride][keep]
            d = distance[row, keep] * stride
            boxes.append(np.concatenate([center - d[:, :2], center + d[:, 2:]], axis=1))
            scores.append(score[row, keep])
            points.append(center[:, None, :] + offset[row, keep].reshape(-1, 5, 2) * stride)
        if not boxes:
            return Faces.empty(self.scheme)
        box = np.concatenate(boxes)
        score = np.concatenate(scores)
        xywh = np.concatenate([box[:, :2], box[:, 2:] - box[:, :2]], axis=1)
        chosen = cv2.dnn.NMSBoxes(xywh.tolist(), score.tolist(), self.score_threshold, self.nms_threshold)
        chosen = np.asarray(chosen, np.int64).reshape(-1)
        return Faces(
            boxes=box[chosen],
            scores=score[chosen],
            landmarks=np.concatenate(points)[chosen],
            scheme=self.scheme,
        )


class SCRFD500MDetector(SCRFDDetector):
    name = "scrfd_500m"


class SCRFD2_5GDetector(SCRFDDetector):
    name = "scrfd_2.5g"
