"""Who is this face: nearest enrolled person by one matrix product against the gallery per batch.

Distances
Euclidean or cosine, as defined in `streamer.match.distance` (the same numbers the engine's verify
gives). A person's distance is the minimum over that person's faces.

Score
`score = max(0, 1 - distance / (2 * threshold))`: a similarity in [0, 1] that is 1 for identical vectors,
exactly 0.5 at the threshold (so score > 0.5 <=> recognised) and 0 at twice the threshold or beyond. It
is monotone in the distance and comparable across embedders, unlike the raw distance; it is not a
probability.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from streamer.match.distance import METRICS, Metric, PreparedGallery, check_metric, pairwise, prepare_gallery
from streamer.match.gallery import Gallery

__all__ = ["METRICS", "Match", "Matcher", "Metric"]


@dataclass(frozen=True)
class Match:
    """The best person for one query; `name` is None when nobody is closer than the threshold.

    distance is math.inf (and score 0) when the gallery holds nobody for this embedder.
    """

    name: str | None
    distance: float
    score: float

    @property
    def known(self) -> bool:
        return self.name is not None


@dataclass(frozen=True)
class _Index:
    """The gallery matrix prepared for one metric: faces grouped by person, norms precomputed."""

    source: np.ndarray  # the gallery's cached matrix this was built from (identity = freshness)
    people: tuple[str, ...]  # one per group, in group order
    starts: np.ndarray  # (P,) first column of each person's faces in `faces`
    faces: PreparedGallery  # (M, D) rows grouped by person, ready for `pairwise`

    @property
    def dim(self) -> int:
        return self.faces.vectors.shape[1]


class Matcher:
    """Matches query embeddings (N, D) against everyone enrolled for one embedder id."""

    def __init__(self, gallery: Gallery, embedder_id: str, metric: Metric, threshold: float) -> None:
        if not isinstance(embedder_id, str) or not embedder_id:
            raise ValueError(f"embedder_id: expected a non-empty string, got {embedder_id!r}")
        check_metric(metric)
        if not (isinstance(threshold, int | float) and math.isfinite(threshold) and threshold > 0):
            raise ValueError(f"threshold: expected a finite number > 0, got {threshold!r}")
        if metric == "cosine" and threshold > 2:
            raise ValueError(f"threshold: cosine distances lie in [0, 2], got {threshold}")
        self.gallery = gallery
        self.embedder_id = embedder_id
        self.metric: Metric = metric
        self.threshold = float(threshold)
        self._index: _Index | None = None

    def __repr__(self) -> str:
        return f"Matcher({self.gallery!r}, {self.embedder_id!r}, {self.metric!r}, threshold={self.threshold})"

    def score(self, distance: float | np.ndarray) -> float | np.ndarray:
        """Similarity in [0, 1]; 0.5 exactly at the threshold (see module docstring)."""
        return np.maximum(0.0, 1.0 - np.asarray(distance, dtype=np.float64) / (2.0 * self.threshold))

    def _current_index(self) -> _Index:
        names, vectors = self.gallery.matrix(self.embedder_id)
        index = self._index
        if index is not None and index.source is vectors:
            return index
        # The gallery already groups rows by person; a stable sort keeps this correct if it ever did not.
        labels, inverse = np.unique(np.asarray(names, dtype=object), return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        starts = np.searchsorted(inverse[order], np.arange(len(labels)))
        index = _Index(
            source=vectors,
            people=tuple(str(x) for x in labels),
            starts=starts.astype(np.intp),
            faces=prepare_gallery(vectors[order], self.metric),
        )
        self._index = index
        return index

    def _check_queries(self, queries: np.ndarray, index: _Index) -> np.ndarray:
        if not isinstance(queries, np.ndarray) or queries.ndim != 2:
            shape = getattr(queries, "shape", type(queries).__name__)
            raise ValueError(f"queries: expected an array of shape (N, D), got {shape}")
        if not np.issubdtype(queries.dtype, np.floating):
            raise ValueError(f"queries: expected a float dtype, got {queries.dtype}")
        dim = index.dim
        if len(index.people) and queries.shape[1] != dim:
            raise ValueError(
                f"queries: expected dimension {dim} (gallery, embedder {self.embedder_id!r}), got {queries.shape[1]}"
            )
        q = np.asarray(queries, dtype=np.float32)
        if not np.isfinite(q).all():
            raise ValueError("queries: contain NaN or infinite values")
        return q

    def distances(self, queries: np.ndarray) -> tuple[tuple[str, ...], np.ndarray]:
        """(people, (N, P) distance from every query to every person): one matrix product for the batch."""
        index = self._current_index()
        q = self._check_queries(queries, index)
        if not index.people or not len(q):
            return index.people, np.full((len(q), len(index.people)), np.inf, dtype=np.float32)
        per_face = pairwise(q, index.faces, self.metric)
        return index.people, np.minimum.reduceat(per_face, index.starts, axis=1)

    def match(self, queries: np.ndarray) -> list[Match]:
        """The best person for each query row; unknown (name None) when the best distance >= threshold."""
        people, dist = self.distances(queries)
        if not people:
            return [Match(None, math.inf, 0.0) for _ in range(len(dist))]
        best = np.argmin(dist, axis=1)
        best_dist = dist[np.arange(len(dist)), best].astype(np.float64)
        scores = self.score(best_dist)
        return [
            Match(people[j] if d < self.threshold else None, float(d), float(s))
            for j, d, s in zip(best.tolist(), best_dist.tolist(), scores.tolist())
        ]

    def top_k(self, query: np.ndarray, k: int = 5) -> list[Match]:
        """The k nearest people to one query (D,) or (1, D), nearest first, for find-style listings.

        Unlike `match`, names are given even beyond the threshold; `score < 0.5` marks those.
        """
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k: expected an integer >= 1, got {k!r}")
        q = np.asarray(query)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or len(q) != 1:
            raise ValueError(f"query: expected shape (D,) or (1, D), got {np.shape(query)}")
        people, dist = self.distances(q)
        row = dist[0].astype(np.float64)
        k = min(k, len(people))
        nearest = np.argsort(row, kind="stable")[:k]
        scores = self.score(row[nearest])
        return [Match(people[j], float(row[j]), float(s)) for j, s in zip(nearest.tolist(), scores.tolist())]


def open_matcher(path, spec) -> tuple[Gallery | None, Matcher | None]:  # noqa: ANN001
    """The gallery at `path` (read-only, never created) and a matcher for embedder `spec`; (None, None)
    without a gallery: every face is then unknown."""
    if path is None:
        return None, None
    from pathlib import Path

    gallery = Gallery(Path(path), create=False, readonly=True)
    return gallery, Matcher(gallery, spec.id, spec.metric, spec.threshold)
