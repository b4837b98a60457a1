"""The distances between face embeddings: one implementation for the engine, the CLI and the matcher.

- euclidean: ||a - b|| computed as sqrt(max(0, ||a||^2 + ||b||^2 - 2 a.b)) on the vectors as given
  (an embedder's threshold is calibrated on its own raw space, e.g. 0.6 for dlib's ResNet). The
  expansion turns the whole batch into one matrix product; max(0, .) absorbs the rounding that can
  make it slightly negative for (near-)identical vectors.
- cosine: 1 - a.b after L2-normalising both sides, clipped to [0, 2] (rounding can step just outside).

Everything is float32, like the embeddings: float64 would double the cost of the matcher's product for
differences (~1e-6) far below any threshold's resolution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, cast

import numpy as np

Metric = Literal["euclidean", "cosine"]
METRICS: tuple[Metric, ...] = ("euclidean", "cosine")

# Below this norm a vector counts as zero: it is left as zeros (cosine distance 1 to anything)
# instead of being blown up into noise.
_MIN_NORM = np.float32(1e-12)


def check_metric(metric: object) -> Metric:
    """`metric` itself when it names a known metric; ValueError listing the known ones otherwise."""
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {', '.join(METRICS)}, got {metric!r}")
    return cast(Metric, metric)


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    """(N, D) float32 rows scaled to unit length (zero rows stay zero)."""
    x = np.asarray(vectors, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), _MIN_NORM)


def squared_norms(vectors: np.ndarray) -> np.ndarray:
    """(N,) float32 ||row||^2."""
    x = np.asarray(vectors, dtype=np.float32)
    return np.einsum("ij,ij->i", x, x)


@dataclass(frozen=True, eq=False)
class PreparedGallery:
    """Gallery rows made ready for one metric once, for callers that query the same rows many times.

    vectors: (M, D) float32, C-contiguous; L2-normalised for cosine, as given for euclidean.
    sq_norms: (M,) float32 squared norms of `vectors` (euclidean only; empty for cosine).
    """

    metric: Metric
    vectors: np.ndarray
    sq_norms: np.ndarray

    def __len__(self) -> int:
        return len(self.vectors)


def prepare_gallery(gallery: np.ndarray, metric: Metric) -> PreparedGallery:
    """`gallery` (M, D) prepared for repeated `pairwise` queries with `metric`."""
    metric = check_metric(metric)
    g = _rows("gallery", gallery)
    if metric == "cosine":
        return PreparedGallery(metric, np.ascontiguousarray(l2_normalise(g)), np.zeros(0, np.float32))
    g = np.ascontiguousarray(g)
    return PreparedGallery(metric, g, squared_norms(g))


def pairwise(queries: np.ndarray, gallery: np.ndarray | PreparedGallery, metric: Metric) -> np.ndarray:
    """(N, M) float32 distances from each of N query rows to each of M gallery rows.

    `gallery` is raw (M, D) vectors or the result of `prepare_gallery` for the same metric. Rows must
    have the same length D; either side may be empty.
    """
    metric = check_metric(metric)
    q = _rows("queries", queries)
    prepared = gallery if isinstance(gallery, PreparedGallery) else prepare_gallery(gallery, metric)
    if prepared.metric != metric:
        raise ValueError(f"gallery: prepared for {prepared.metric}, asked for {metric} distances")
    g = prepared.vectors
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"queries and gallery: expected vectors of one length, got {q.shape} and {g.shape}")
    if len(q) == 0 or len(g) == 0:
        return np.zeros((len(q), len(g)), np.float32)
    if metric == "cosine":
        out = 1.0 - l2_normalise(q) @ g.T
        return np.clip(out, 0.0, 2.0, out=out)
    sq = squared_norms(q)[:, None] + prepared.sq_norms[None, :] - 2.0 * (q @ g.T)
    return np.sqrt(np.maximum(sq, 0.0, out=sq), out=sq)


def _rows(name: str, vectors: np.ndarray) -> np.ndarray:
    x = np.asarray(vectors, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected an array of shape (N, D), got {x.shape}")
    return x
