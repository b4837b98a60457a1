"""Face embedders: aligned chip in, identity vector out, plus the metric that compares two vectors.

Two parts, because two processes use them:
- `EmbedderSpec` (no onnxruntime session): the chip template, colour order, normalisation, metric and
  calibrated threshold. The detect worker uses it to align chips (`prepare`); the matcher uses its
  `distances`. Building one never creates a session.
- `Embedder(spec, OnnxModel)`: checks the session against the spec once, then `embed(chips)` runs one
  batch per call.

Implementations: `DlibResNetEmbedder` (default; dlib's ResNet converted to ONNX, raw 128-D descriptors,
Euclidean distance, threshold 0.6 read from the model file) and `ArcFaceEmbedder` (any ArcFace-family
ONNX model: 112x112 ArcFace-aligned RGB chips, (x-127.5)/128, NCHW, L2-normalised output, cosine
distance). `create_embedder` / `embedder_spec` resolve names through the model registry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np

from streamer.errors import ConfigError, ModelError
from streamer.infer.align import (
    ARCFACE_112,
    DLIB_150,
    ChipTemplate,
    align_faces,
    redetect_landmarks,
)
from streamer.match.distance import METRICS, Metric, pairwise
from streamer.models.registry import ModelRegistry
from streamer.models.runtime import OnnxModel, RuntimeOptions
from streamer.types import Faces

# A generic starting point for ArcFace-family models, NOT calibrated for any particular one: cosine
# distance 0.6 = cosine similarity 0.4, the usual ballpark for ArcFace-trained 112x112 models. Calibrate
# it on your own same/different pairs (setting embedder.threshold). For reference, mobilefacenet.onnx
# separated the shared celebrity pairs best at about 0.596, which is optimistic for real cameras.
ARCFACE_DEFAULT_THRESHOLD = 0.6

EMBEDDER_NAMES = ("dlib_resnet", "mobilefacenet", "arcface")


@dataclass(frozen=True, eq=False)
class EmbedderSpec:
    """How an embedder wants its chips and how its vectors are compared; usable without a session.

    threshold: a distance in `metric`; two faces are the same person when their distance is below it.
    dim: length of the vectors; None when the model file does not declare it (an `Embedder` always
    knows it: it runs the session once at load). mean/std: the network sees (pixel - mean) / std in `color` order and
    `layout`. l2_normalize: unit-length output (needed for the cosine metric to be a plain dot product).
    """

    id: str
    template: ChipTemplate
    metric: Metric
    threshold: float
    dim: int | None
    color: Literal["rgb", "bgr"] = "rgb"
    layout: Literal["nhwc", "nchw"] = "nchw"
    mean: float = 0.0
    std: float = 1.0
    l2_normalize: bool = False
    # Embed each chip and its mirror image in the same batch and average the two vectors (L2-normalised
    # again where the metric wants unit vectors), at the cost of a doubled batch. OFF by default because
    # it did not help dlib's ResNet (trained with mirrored copies, so nearly mirror-invariant already):
    # on the shared 719 pairs ROC AUC 0.99993 -> 0.99994 clean, 0.99629 -> 0.99594 on degraded copies,
    # and since averaging shrinks every distance (same pairs 0.389 -> 0.367 on average) the shipped
    # threshold then accepts 6 different pairs instead of 4 (tools/degrade_pairs.py; numbers in issue 11).
    # The id does NOT change with it: the mean of two descriptors of one face stays in the same space,
    # close to either (dlib: Euclidean 0.09 on average, 0.17 at most, from the plain descriptor, against a
    # threshold of 0.6), so galleries enrolled with or without it remain comparable and refusing them at
    # start would only force a pointless re-enrolment.
    flip_average: bool = False

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"EmbedderSpec {self.id}: metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if not self.threshold > 0 or (self.metric == "cosine" and self.threshold > 2):
            limit = "(0, 2]" if self.metric == "cosine" else "> 0"
            raise ValueError(f"EmbedderSpec {self.id}: {self.metric} threshold must be {limit}, got {self.threshold}")
        if self.dim is not None and self.dim < 1:
            raise ValueError(f"EmbedderSpec {self.id}: dim must be >= 1, got {self.dim}")
        if self.color not in ("rgb", "bgr") or self.layout not in ("nhwc", "nchw"):
            raise ValueError(
                f"EmbedderSpec {self.id}: color rgb|bgr and layout nhwc|nchw, got {self.color}/{self.layout}"
            )
        if not self.std > 0:
            raise ValueError(f"EmbedderSpec {self.id}: std must be > 0, got {self.std}")

    @property
    def chip_size(self) -> int:
        return self.template.size

    @property
    def input_sample_shape(self) -> tuple[int, int, int]:
        """Shape of one network input sample (without the batch axis)."""
        s = self.template.size
        return (s, s, 3) if self.layout == "nhwc" else (3, s, s)

    def with_threshold(self, threshold: float | None) -> EmbedderSpec:
        return self if threshold is None else replace(self, threshold=float(threshold))

    def with_flip_average(self, flip_average: bool | None) -> EmbedderSpec:
        return self if flip_average is None else replace(self, flip_average=bool(flip_average))

    # -- chips ----------------------------------------------------------------------------------
    def prepare(
        self, image_bgr: np.ndarray, faces: Faces, redetect: Callable[[np.ndarray], Faces] | None = None
    ) -> np.ndarray:
        """Aligned chips (N, S, S, 3) uint8 BGR, ready to ship to the process that embeds them.

        redetect: the detector's `detect`, to find each face's landmarks again on a view cut with the first
        alignment before cutting (`streamer.infer.align.redetect_landmarks`: better chips of tilted faces, one more
        detector run per face)."""
        if redetect is not None:
            faces = redetect_landmarks(image_bgr, faces, self.template, redetect)
        return align_faces(image_bgr, faces, self.template)

    def to_input(self, chips: np.ndarray) -> np.ndarray:
        """The network's float32 input batch for chips from `prepare`."""
        s = self.template.size
        if chips.ndim != 4 or chips.shape[1:] != (s, s, 3) or chips.dtype != np.uint8:
            raise ValueError(
                f"embedder {self.id}: expected uint8 chips (N, {s}, {s}, 3), got {chips.dtype} {chips.shape}"
            )
        x = chips[..., ::-1] if self.color == "rgb" else chips  # chips are BGR
        x = x.astype(np.float32)
        if self.mean != 0.0 or self.std != 1.0:
            x -= np.float32(self.mean)
            x *= np.float32(1.0 / self.std)
        if self.layout == "nchw":
            x = x.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(x)

    # -- comparing vectors -------------------------------------------------------------------------
    def distances(self, queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
        """(M, K) float32 distances between M query vectors and K gallery vectors."""
        q = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        g = np.atleast_2d(np.asarray(gallery, dtype=np.float32))
        if q.shape[1] != g.shape[1] or (self.dim is not None and q.shape[1] != self.dim):
            raise ValueError(f"embedder {self.id}: expected {self.dim}-D vectors, got {q.shape} and {g.shape}")
        return pairwise(q, g, self.metric)

    def distance(self, a: np.ndarray, b: np.ndarray) -> float:
        return float(self.distances(np.reshape(a, (1, -1)), np.reshape(b, (1, -1)))[0, 0])


class Embedder:
    """An EmbedderSpec bound to an onnxruntime session (checked against each other once, here)."""

    def __init__(self, spec: EmbedderSpec, model: OnnxModel) -> None:
        self.model = model
        if len(model.input_shape) != 4:
            raise ModelError(
                f"embedder {spec.id}: model {model.path} has a rank-{len(model.input_shape)} input "
                f"{model.input_shape}, expected a batch of images {('N', *spec.input_sample_shape)}"
            )
        model.check_input(spec.input_sample_shape)
        # One blank chip through the session: proves the spec's input is accepted, gives the vector
        # length where the file leaves it symbolic, and pays onnxruntime's slow first run at load time.
        blank = np.zeros((1, spec.chip_size, spec.chip_size, 3), np.uint8)
        try:
            probe = model.run(spec.to_input(blank))[0]
        except Exception as exc:  # onnxruntime raises its own types for shape/type mismatches
            raise ModelError(f"embedder {spec.id}: model {model.path} rejects its declared input: {exc}") from exc
        dim = int(np.prod(probe.shape[1:]))
        if spec.dim is not None and dim != spec.dim:
            raise ModelError(f"embedder {spec.id}: model {model.path} gives {dim}-D vectors, spec says {spec.dim}")
        self.spec = spec if spec.dim == dim else replace(spec, dim=dim)

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def dim(self) -> int:
        assert self.spec.dim is not None  # resolved at construction
        return self.spec.dim

    def prepare(
        self, image_bgr: np.ndarray, faces: Faces, redetect: Callable[[np.ndarray], Faces] | None = None
    ) -> np.ndarray:
        return self.spec.prepare(image_bgr, faces, redetect)

    def embed(self, chips: np.ndarray) -> np.ndarray:
        """(N, D) float32 vectors for N chips from `prepare` (any N, 0 included).

        With `spec.flip_average` the chips and their mirror images go through the session as one batch
        of 2N (one `session.run`), and each face's vector is the mean of its two.
        """
        n = len(chips)
        if n == 0:
            self.spec.to_input(chips)  # still checks the shape and type
            return np.zeros((0, self.dim), np.float32)
        if self.spec.flip_average:
            chips = np.concatenate([chips, chips[:, :, ::-1]], axis=0)
        batch = self.spec.to_input(chips)
        vectors = np.asarray(self.model.run(batch)[0], dtype=np.float32).reshape(len(batch), -1)
        if self.spec.flip_average:
            if self.spec.l2_normalize:  # average directions, not lengths
                vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
            vectors = (vectors[:n] + vectors[n:]) * np.float32(0.5)
        if self.spec.l2_normalize:
            vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return vectors

    def distances(self, queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
        return self.spec.distances(queries, gallery)

    def distance(self, a: np.ndarray, b: np.ndarray) -> float:
        return self.spec.distance(a, b)


# -- dlib ResNet ----------------------------------------------------------------------------------


def _dlib_spec(threshold: float) -> EmbedderSpec:
    from streamer.models.convert.dlib_resnet import MODEL_ID

    # The converted graph normalises internally ((v - channel mean) / 256), so it takes raw RGB 0..255.
    return EmbedderSpec(
        id=MODEL_ID,
        template=DLIB_150,
        metric="euclidean",
        threshold=threshold,
        dim=128,
        color="rgb",
        layout="nhwc",
        mean=0.0,
        std=1.0,
        l2_normalize=False,  # dlib's threshold is calibrated on the raw descriptors
    )


class DlibResNetEmbedder(Embedder):
    """dlib's face recognition ResNet v1: raw 128-D descriptors, Euclidean distance, threshold from the file."""

    def __init__(self, model: OnnxModel, threshold: float | None = None, flip_average: bool | None = None) -> None:
        from streamer.models.convert.dlib_resnet import (
            META_MODEL,
            META_THRESHOLD,
            MODEL_ID,
        )

        meta = model.session.get_modelmeta().custom_metadata_map
        if meta.get(META_MODEL) != MODEL_ID or META_THRESHOLD not in meta:
            raise ModelError(f"{model.path} is not a dlib ResNet converted by streamer (no {META_THRESHOLD} metadata)")
        spec = _dlib_spec(float(meta[META_THRESHOLD])).with_threshold(threshold).with_flip_average(flip_average)
        super().__init__(spec, model)

    @staticmethod
    def spec_for(onnx_path: Path, threshold: float | None = None, flip_average: bool | None = None) -> EmbedderSpec:
        from streamer.models.convert.dlib_resnet import read_threshold

        return _dlib_spec(read_threshold(Path(onnx_path))).with_threshold(threshold).with_flip_average(flip_average)


# -- ArcFace family -------------------------------------------------------------------------------


def _arcface_dim(input_shape: Sequence, output_shape: Sequence, where: str) -> int | None:
    """Check an ArcFace-style model's declared geometry; return its output length if declared."""
    size = ARCFACE_112.size
    if len(input_shape) != 4:
        raise ModelError(f"{where}: input shape {tuple(input_shape)} is not a batch of images [N,3,{size},{size}]")
    channels, height, width = input_shape[1:]
    fixed = [d for d in (height, width) if isinstance(d, int)]
    if channels != 3 or any(d != size for d in fixed):
        raise ModelError(
            f"{where}: input shape {tuple(input_shape)}, expected [N,3,{size},{size}] "
            "(an ArcFace-family model taking NCHW RGB 112x112 chips)"
        )
    if len(output_shape) != 2:
        raise ModelError(f"{where}: output shape {tuple(output_shape)}, expected [N, D] vectors")
    dim = output_shape[-1]
    return dim if isinstance(dim, int) and dim > 0 else None  # often symbolic in PyTorch exports


def _arcface_spec(model_id: str, dim: int | None, threshold: float | None) -> EmbedderSpec:
    return EmbedderSpec(
        id=model_id,
        template=ARCFACE_112,
        metric="cosine",
        threshold=ARCFACE_DEFAULT_THRESHOLD if threshold is None else float(threshold),
        dim=dim,
        color="rgb",
        layout="nchw",
        mean=127.5,
        std=128.0,
        l2_normalize=True,
    )


def _file_id(path: Path) -> str:
    from streamer.models.registry import sha256_of

    return f"arcface:{sha256_of(path)[:12]}"


class ArcFaceEmbedder(Embedder):
    """Adapter for ArcFace-family ONNX models (insightface w600k/glint, MobileFaceNet exports, ...).

    The id is "arcface:<sha256 prefix of the file>" so vectors of different models never mix.
    """

    def __init__(self, model: OnnxModel, threshold: float | None = None, flip_average: bool | None = None) -> None:
        where = f"ArcFace model {model.path}"
        dim = _arcface_dim(model.input_shape, model.session.get_outputs()[0].shape, where)
        super().__init__(_arcface_spec(_file_id(model.path), dim, threshold).with_flip_average(flip_average), model)

    @staticmethod
    def spec_for(onnx_path: Path, threshold: float | None = None, flip_average: bool | None = None) -> EmbedderSpec:
        """The spec read from the file's declared graph inputs/outputs, without a session."""
        import onnx

        path = Path(onnx_path)
        try:
            graph = onnx.load(str(path), load_external_data=False).graph
        except Exception as exc:  # protobuf raises its own DecodeError types
            raise ModelError(f"cannot read ArcFace model {path}: not an ONNX file ({exc.__class__.__name__})") from exc
        initializers = {init.name for init in graph.initializer}
        inputs = [i for i in graph.input if i.name not in initializers]

        def dims(value) -> list:
            return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]

        if not inputs or not graph.output:
            raise ModelError(f"ArcFace model {path} declares no input or output")
        dim = _arcface_dim(dims(inputs[0]), dims(graph.output[0]), f"ArcFace model {path}")
        return _arcface_spec(_file_id(path), dim, threshold).with_flip_average(flip_average)


# -- by name --------------------------------------------------------------------------------------


def embedder_path(name: str, registry: ModelRegistry) -> Path:
    """The ONNX file a named embedder loads (resolved, converted if needed)."""
    if name not in EMBEDDER_NAMES:
        raise ConfigError(
            f"setting embedder.name: unknown embedder {name!r}; choose one of {', '.join(EMBEDDER_NAMES)}"
        )
    if name == "arcface":
        path = registry.paths.get("arcface")
        if path is None:
            raise ConfigError(
                "setting embedder.name=arcface needs the model file: pass --arcface-model PATH "
                "or set models.paths.arcface (STREAMER_MODELS__PATHS__ARCFACE=/path/to/model.onnx)"
            )
        if not Path(path).is_file():
            raise ModelError(
                f"model arcface: file not found: {path} (give an ArcFace-family .onnx file with "
                "--arcface-model PATH or setting models.paths.arcface)"
            )
        return Path(path)
    return registry.resolve(name)


def embedder_spec(
    name: str, registry: ModelRegistry, threshold: float | None = None, flip_average: bool | None = None
) -> EmbedderSpec:
    """The spec of a named embedder without creating a session (for the process that aligns chips).
    flip_average None: the spec's default (off; setting embedder.flip_average)."""
    path = embedder_path(name, registry)
    with _threshold_errors():
        if name == "dlib_resnet":
            return DlibResNetEmbedder.spec_for(path, threshold, flip_average)
        return ArcFaceEmbedder.spec_for(path, threshold, flip_average)


def create_embedder(
    name: str,
    registry: ModelRegistry,
    runtime_options: RuntimeOptions = RuntimeOptions(),
    threshold: float | None = None,
    flip_average: bool | None = None,
) -> Embedder:
    """A ready embedder by name: "dlib_resnet" (default), "mobilefacenet", or "arcface" (models.paths.arcface)."""
    path = embedder_path(name, registry)
    model = OnnxModel(path, runtime_options, name=name)
    with _threshold_errors():
        if name == "dlib_resnet":
            return DlibResNetEmbedder(model, threshold, flip_average)
        return ArcFaceEmbedder(model, threshold, flip_average)


@contextmanager
def _threshold_errors() -> Iterator[None]:
    """A bad threshold override is the user's setting: report it as one."""
    try:
        yield
    except ValueError as exc:
        raise ConfigError(f"setting embedder.threshold: {exc}") from None
