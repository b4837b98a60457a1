"""YuNet (OpenCV Zoo, MIT): boxes plus 5 landmarks in scheme FIVE order, on one of two backends.

`onnxruntime` (default) runs the ONNX graph directly and decodes its 12 outputs in numpy exactly as
OpenCV's `FaceDetectorYN` does (modules/objdetect/src/face_detect.cpp, the 2023+ anchor-free heads):
on a 2-core CPU it is about twice as fast as OpenCV 5's DNN engine on the same graph. `opencv` keeps
`cv2.FaceDetectorYN` itself, the reference the onnxruntime path is tested against.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import cv2
import numpy as np

from streamer.detect.base import Detector, SizeCache
from streamer.errors import ModelError
from streamer.models.runtime import OnnxModel, RuntimeOptions
from streamer.types import Faces, LandmarkScheme

log = logging.getLogger(__name__)

Backend = Literal["onnxruntime", "opencv"]

_TOP_K = 5000
STRIDES = (8, 16, 32)
_ALIGN = 32  # the coarsest stride: FaceDetectorYN pads inputs bottom/right to a multiple of it
_HEADS = ("cls", "obj", "bbox", "kps")
_CHANNELS = {"cls": 1, "obj": 1, "bbox": 4, "kps": 10}
# The detector shares a small CPU with decoding and the face models; one thread is its fair share,
# and YuNet is small enough that more threads buy little (measured: ~7.6 ms at 640x384 on 1 thread).
DEFAULT_RUNTIME = RuntimeOptions(intra_op_threads=1)


@contextmanager
def _quiet_opencv() -> Iterator[None]:
    """Hide OpenCV 5's harmless 'setPreferableTarget ... new graph engine' warning while a net is built.

    The log level is process-wide, so it is lowered only for the few milliseconds of creation and
    put back exactly as it was.
    """
    logging_api = getattr(getattr(cv2, "utils", None), "logging", None)
    if logging_api is None:  # pragma: no cover - builds without cv2.utils.logging
        yield
        return
    previous = logging_api.getLogLevel()
    logging_api.setLogLevel(min(previous, logging_api.LOG_LEVEL_ERROR))
    try:
        yield
    finally:
        logging_api.setLogLevel(previous)


def _one_line(exc: cv2.error) -> str:
    return " ".join(str(getattr(exc, "err", exc)).replace(">", " ").split())


def _padded(size: int) -> int:
    return -(-size // _ALIGN) * _ALIGN


@dataclass(frozen=True)
class _Grid:
    """Every output location of one input size, all strides in the network's order (stride 8's row-major
    grid, then 16's, then 32's): its column, row and stride, so that the heads of all strides, joined end
    to end, decode in one pass."""

    cols: np.ndarray  # (N,) float32
    rows: np.ndarray  # (N,) float32
    strides: np.ndarray  # (N,) float32


def grids(padded_width: int, padded_height: int) -> _Grid:
    cols, rows, strides = [], [], []
    for stride in STRIDES:
        width, height = padded_width // stride, padded_height // stride
        r, c = np.divmod(np.arange(height * width), width)
        cols.append(c)
        rows.append(r)
        strides.append(np.full(height * width, stride))
    return _Grid(*(np.concatenate(parts).astype(np.float32) for parts in (cols, rows, strides)))


def to_blob(images: list[np.ndarray], width: int, height: int) -> np.ndarray:
    """What FaceDetectorYN feeds the net: each BGR image zero-padded bottom/right to `width` x
    `height` (pixel coordinates stay unchanged, so nothing maps back), as raw 0..255 float32 NCHW.

    Equal to `cv2.dnn.blobFromImages` with its defaults (no scale, mean or channel swap) on the
    padded images, which OpenCV 5 takes ~3.5 ms to build at 640x384; per-channel copies take ~0.15.
    """
    blob = np.empty((len(images), 3, height, width), np.float32)
    for row, image in enumerate(images):
        padded = cv2.copyMakeBorder(
            image, 0, height - image.shape[0], 0, width - image.shape[1],
            cv2.BORDER_CONSTANT, value=(0, 0, 0),
        )
        for channel, plane in enumerate(cv2.split(padded)):
            blob[row, channel] = plane
    return blob


class YuNetDetector(Detector):
    name = "yunet"
    scheme = LandmarkScheme.FIVE
    region_align = STRIDES[-1]

    def __init__(
        self,
        model_path: Path,
        *,
        backend: Backend = "onnxruntime",
        runtime: RuntimeOptions | None = None,
        **options: Any,
    ) -> None:
        """`options`: the `Detector` ones (score_threshold, nms_threshold, max_side, min_face)."""
        super().__init__(model_path, **options)
        if backend not in get_args(Backend):
            raise ValueError(f"yunet: backend must be one of {get_args(Backend)}, got {backend!r}")
        if runtime is not None and backend == "opencv":
            raise ValueError(
                "yunet: runtime options apply to the onnxruntime backend only, got backend='opencv'"
            )
        self.backend: Backend = backend
        self.model: OnnxModel | None = None
        # Per input size: a FaceDetectorYN (opencv; the first run at a new size re-plans the network)
        # or the decoding grids (onnxruntime). Either way a fixed-size video builds it once.
        self._by_size: SizeCache[object]
        if backend == "opencv":
            self._by_size = SizeCache(self._build)
            # Fail now, with a clear error, if the file is not a YuNet model (a wrong ONNX file loads
            # fine and only breaks at the first detect).
            try:
                self._build((64, 64)).detect(np.zeros((64, 64, 3), np.uint8))
            except cv2.error as exc:
                raise ModelError(
                    f"yunet: {self.model_path} does not run as a YuNet model: {_one_line(exc)}"
                ) from exc
        else:
            self.model = OnnxModel(self.model_path, runtime or DEFAULT_RUNTIME, name=self.name)
            # Region detection (streamer.track.processor) feeds crops of many sizes: the bench clip's tracks
            # give 23 padded sizes, which thrashed an 8-entry cache (grids rebuilt ~2% of the detect time).
            # Grids are small (~13 kB at 192x288), so keep plenty.
            self._by_size = SizeCache(self._build_grids, capacity=64)
            self._output_index = self._check_outputs()

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, backend={self.backend!r})"

    # -- opencv backend -----------------------------------------------------------------------------
    def _build(self, size: Hashable) -> cv2.FaceDetectorYN:
        assert isinstance(size, tuple)
        try:
            with _quiet_opencv():
                return cv2.FaceDetectorYN.create(
                    str(self.model_path), "", size, self.score_threshold, self.nms_threshold, _TOP_K
                )
        except cv2.error as exc:
            raise ModelError(
                f"yunet: cannot load {self.model_path} as a YuNet ONNX model: {_one_line(exc)}"
            ) from exc

    def _detect_opencv(self, image: np.ndarray) -> Faces:
        height, width = image.shape[:2]
        _, rows = self._by_size.get((width, height)).detect(image)  # type: ignore[attr-defined]
        if rows is None or len(rows) == 0:
            return Faces.empty(self.scheme)
        # Each row: x, y, w, h, then (x, y) of right eye, left eye, nose, right and left mouth
        # corner (subject's right = image left, the FIVE order), then the score.
        xywh = rows[:, 0:4]
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        return Faces(
            boxes=boxes,
            scores=rows[:, 14],
            landmarks=rows[:, 4:14].reshape(-1, 5, 2),
            scheme=self.scheme,
        )

    # -- onnxruntime backend ------------------------------------------------------------------------
    @staticmethod
    def _build_grids(size: Hashable) -> _Grid:
        assert isinstance(size, tuple)
        return grids(*size)

    def _check_outputs(self) -> dict[tuple[str, int], int]:
        """Output index per (head, stride); ModelError naming the file unless it has YuNet's 12 heads
        with the shapes a probe input must give."""
        assert self.model is not None
        names = {name: i for i, name in enumerate(self.model.output_names)}
        wanted = [(head, stride) for head in _HEADS for stride in STRIDES]
        missing = [f"{head}_{stride}" for head, stride in wanted if f"{head}_{stride}" not in names]
        if missing:
            raise ModelError(
                f"yunet: {self.model_path} is not a YuNet model: outputs {missing} missing "
                f"(it has {self.model.output_names})"
            )
        index = {(head, stride): names[f"{head}_{stride}"] for head, stride in wanted}
        probe = 2 * _ALIGN
        try:
            outputs = self.model.run(np.zeros((1, 3, probe, probe), np.float32))
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidArgument types
            raise ModelError(
                f"yunet: {self.model_path} does not run on a 1x3x{probe}x{probe} input "
                f"({exc.__class__.__name__}): not a YuNet model?"
            ) from exc
        for (head, stride), i in index.items():
            expected = (1, (probe // stride) ** 2, _CHANNELS[head])
            if tuple(outputs[i].shape) != expected:
                raise ModelError(
                    f"yunet: {self.model_path} output {head}_{stride} has shape {tuple(outputs[i].shape)} "
                    f"for a {probe}x{probe} input, expected {expected}: not a YuNet model?"
                )
        return index

    def _detect_onnx(self, images: list[np.ndarray]) -> list[Faces]:
        """Images of one padded size go through the network together (a video's frames always do)."""
        if self.model is None:
            raise RuntimeError("yunet: detect called after close()")
        results: list[Faces] = [Faces.empty(self.scheme)] * len(images)
        groups: dict[tuple[int, int], list[int]] = {}
        for index, image in enumerate(images):
            height, width = image.shape[:2]
            groups.setdefault((_padded(width), _padded(height)), []).append(index)
        for (width, height), indices in groups.items():
            outputs = self.model.run(to_blob([images[i] for i in indices], width, height))
            grid = self._by_size.get((width, height))
            for row, i in enumerate(indices):
                results[i] = self._decode(outputs, row, grid)  # type: ignore[arg-type]
        return results

    def _decode(self, outputs: list[np.ndarray], row: int, grid: _Grid) -> Faces:
        index = self._output_index

        def joined(head: str) -> np.ndarray:
            return np.concatenate([outputs[index[(head, stride)]][row] for stride in STRIDES])

        # On a region most locations are nowhere near a face and the fixed cost of each array operation is
        # what decoding costs, so: the strides joined, a cheap superset (no clip or square root, the bar
        # lowered by a rounding's width), FaceDetectorYN's exact score on those few, one decode of all.
        cls, obj = joined("cls")[:, 0], joined("obj")[:, 0]
        threshold = self.score_threshold
        near = np.flatnonzero(cls * obj >= np.float32(threshold * threshold * (1.0 - 1e-5)))
        score = np.sqrt(np.clip(cls[near], 0.0, 1.0) * np.clip(obj[near], 0.0, 1.0))
        chosen = score >= threshold
        keep, scores = near[chosen], score[chosen]
        if keep.size == 0:
            return Faces.empty(self.scheme)
        s, cols, rows = grid.strides[keep], grid.cols[keep], grid.rows[keep]
        bbox = joined("bbox")[keep]
        w = np.exp(bbox[:, 2]) * s
        h = np.exp(bbox[:, 3]) * s
        x1 = (cols + bbox[:, 0]) * s - w / np.float32(2)
        y1 = (rows + bbox[:, 1]) * s - h / np.float32(2)
        xywh = np.stack([x1, y1, w, h], axis=1)
        points = (joined("kps")[keep].reshape(-1, 5, 2) + np.stack([cols, rows], axis=1)[:, None, :]) * s[:, None, None]
        if len(scores) > 1:
            # FaceDetectorYN suppresses on integer rectangles (Rect2i of truncated x, y, w, h) and
            # only when more than one candidate passed; matching that keeps the two backends equal.
            rects = np.trunc(xywh).astype(np.float64)
            chosen = cv2.dnn.NMSBoxes(
                rects.tolist(), scores.tolist(), self.score_threshold, self.nms_threshold, top_k=_TOP_K
            )
            chosen = np.asarray(chosen, np.int64).reshape(-1)
            xywh, points, scores = xywh[chosen], points[chosen], scores[chosen]
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        # Shapes are the decoder's own; only the dtypes are made sure of (float32 throughout already).
        return Faces._of(boxes.astype(np.float32, copy=False), scores.astype(np.float32, copy=False),
                         points.astype(np.float32, copy=False), self.scheme, np.full(len(scores), -1, np.int64))

    # -- the Detector hooks -------------------------------------------------------------------------
    def _detect(self, image: np.ndarray) -> Faces:
        if self.backend == "opencv":
            return self._detect_opencv(image)
        return self._detect_onnx([image])[0]

    def _detect_batch(self, images: list[np.ndarray]) -> list[Faces]:
        if self.backend == "opencv":
            return [self._detect_opencv(np.ascontiguousarray(image)) for image in images]
        return self._detect_onnx(images)

    def close(self) -> None:
        self._by_size.clear()
        if self.backend == "onnxruntime":
            self.model = None  # drops the onnxruntime session and its arena
