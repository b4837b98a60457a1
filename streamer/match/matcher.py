"""Who is this face: nearest enrolled person by one matrix product against the gallery per batch.

Distances
Euclidean or cosine, as defined in `streamer.match.distance` (the same numbers the engine's verify
gives). A person's distance is the minimum over that person's faces.

Negative examples
`streamer gallery reject NAME IMG...` stores faces that are not NAME. For each query and each person, the
nearest of that person's negatives is compared with the nearest of their own faces: when a negative is
nearer, that person is out for this query (distance inf) and the next nearest person is considered. So a
look-alike, once rejected, stops being named NAME while NAME's own photos, nearer to NAME's faces than to
the look-alike's, still are.

Score
`score = max(0, 1 - distance / (2 * threshold))`: a similarity in [0, 1] that is 1 for identical vectors,
exactly 0.5 at the threshold (so score > 0.5 <=> recognised) and 0 at twice the threshold or beyond. It
is monotone in the distance and comparable across embedders, unlike the raw distance; it is not a
probability.

Reloading
A matcher answers from an index built from one `Gallery.snapshot`. By default it checks the gallery on each
call (one stat and one PRAGMA) and rebuilds when it changed, which suits one-shot callers. With
`background=True` (what `open_matcher`, the pipeline's, uses) `match` never touches SQLite: a thread polls
the gallery every `poll_s`, builds the new index beside the old one and swaps it in whole, so the hot path
neither waits for a 500k-face reload nor for another process's lock. Before that reload starts, people
who are no longer in the gallery (removed, or missing from a file swapped in) stop being matched at once:
the load takes seconds at 500k faces, and a removal must not wait for it. Either way, when the gallery cannot
be read (locked past its busy timeout, replaced by something that is not a gallery, deleted) matching goes
on with the last good index, `status.stale` says so, and a warning is logged (rate limited) until it reads
again.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, replace

import numpy as np

from streamer.logutil import RateLimitedLog
from streamer.match.distance import (
    _MIN_NORM,
    METRICS,
    Metric,
    PreparedGallery,
    check_metric,
    pairwise,
    prepare_gallery,
)
from streamer.match.gallery import Gallery, GalleryError, Snapshot
from streamer.match.open import AnyGallery

__all__ = ["METRICS", "GalleryStatus", "Match", "Matcher", "Metric", "check_embedder", "open_matcher"]

log = logging.getLogger(__name__)

RELOAD_POLL_S = 0.25  # a replaced or edited gallery shows within this (plus its load time)
RELOAD_BUSY_TIMEOUT_S = 0.5  # a background poll waits no longer for a lock: it retries at the next one
STALE_WARNING_INTERVAL_S = 30.0


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
class GalleryStatus:
    """What the matcher answers from, for heartbeats and status events.

    stale: the latest attempt to re-read the gallery failed (`error` says why); answers come from the copy
    loaded at `loaded_at` (time.time()) until a read succeeds again. reloads counts loads after the first,
    failures the failed attempts (one per poll while the fault lasts).
    """

    stale: bool = False
    people: int = 0
    faces: int = 0
    loaded_at: float | None = None
    reloads: int = 0
    failures: int = 0
    error: str | None = None


@dataclass(frozen=True)
class _Index:
    """The gallery prepared for one metric: faces grouped by person, norms precomputed."""

    version: tuple[int, int]  # the gallery's refresh() token it was read at (equal = still current)
    people: tuple[str, ...]  # one per group, in group order
    starts: np.ndarray  # (P,) first column of each person's faces in `faces`
    faces: PreparedGallery  # (M, D) rows grouped by person, ready for `pairwise`
    shown: np.ndarray | None = None  # groups still matchable (None: all) while a reload is on its way
    shown_people: tuple[str, ...] = ()
    negatives: PreparedGallery | None = None  # (K, D) negative examples grouped by person, or None
    negative_starts: np.ndarray | None = None  # (G,) first row of each group in `negatives`
    negative_columns: np.ndarray | None = None  # (G,) the person (column of `people`) each group rejects

    @property
    def dim(self) -> int:
        return self.faces.vectors.shape[1]

    @property
    def matchable(self) -> tuple[str, ...]:
        return self.people if self.shown is None else self.shown_people

    def without(self, gone: set[str]) -> _Index:
        """This index with the groups of `gone` hidden: no copy of the faces."""
        shown = np.asarray([i for i, name in enumerate(self.people) if name not in gone], dtype=np.intp)
        return replace(self, shown=shown, shown_people=tuple(self.people[i] for i in shown.tolist()))


def _build_index(snapshot: Snapshot, metric: Metric) -> _Index:
    people, starts, vectors = snapshot.people, snapshot.starts, snapshot.vectors
    if len(set(people)) != len(people):  # the gallery groups rows by person; regroup if it ever did not
        names = np.asarray(snapshot.names, dtype=object)
        labels, inverse = np.unique(names, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        people = tuple(str(x) for x in labels)
        starts = np.searchsorted(inverse[order], np.arange(len(labels)))
        vectors = vectors[order]
    if metric == "cosine" and vectors.flags.writeable and vectors.flags.c_contiguous:
        # The snapshot's rows are ours: normalised in place, a large gallery is not held twice meanwhile.
        norms = np.sqrt(np.einsum("ij,ij->i", vectors, vectors))
        np.maximum(norms, _MIN_NORM, out=norms)
        vectors /= norms[:, None]
        faces = PreparedGallery("cosine", vectors, np.zeros(0, np.float32))
    else:
        faces = prepare_gallery(vectors, metric)
    index = _Index(snapshot.version, people, starts.astype(np.intp), faces)
    column = {name: i for i, name in enumerate(people)}
    # Negatives of people without faces for this embedder can never matter: dropped.
    keep = [g for g, name in enumerate(snapshot.negative_people) if name in column]
    if not keep or not len(snapshot.negatives):
        return index
    bounds = [*snapshot.negative_starts.tolist(), len(snapshot.negatives)]
    rows = np.concatenate([np.arange(bounds[g], bounds[g + 1]) for g in keep])
    sizes = np.asarray([bounds[g + 1] - bounds[g] for g in keep], dtype=np.intp)
    negative_starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.intp)
    columns = np.asarray([column[snapshot.negative_people[g]] for g in keep], dtype=np.intp)
    return replace(index, negatives=prepare_gallery(np.ascontiguousarray(snapshot.negatives[rows]), metric),
                   negative_starts=negative_starts, negative_columns=columns)


class Matcher:
    """Matches query embeddings (N, D) against everyone enrolled for one embedder id.

    background: keep the index current from a thread (see the module docstring); the first load happens
    here, so a gallery that cannot be read fails now. `close()` stops the thread, as does closing the gallery.
    """

    def __init__(self, gallery: Gallery, embedder_id: str, metric: Metric, threshold: float, *,
                 background: bool = False, poll_s: float = RELOAD_POLL_S) -> None:
        if not isinstance(embedder_id, str) or not embedder_id:
            raise ValueError(f"embedder_id: expected a non-empty string, got {embedder_id!r}")
        check_metric(metric)
        if not (isinstance(threshold, int | float) and math.isfinite(threshold) and threshold > 0):
            raise ValueError(f"threshold: expected a finite number > 0, got {threshold!r}")
        if metric == "cosine" and threshold > 2:
            raise ValueError(f"threshold: cosine distances lie in [0, 2], got {threshold}")
        if not (isinstance(poll_s, int | float) and poll_s > 0):
            raise ValueError(f"poll_s: expected a number > 0, got {poll_s!r}")
        self.gallery = gallery
        self.embedder_id = embedder_id
        self.metric: Metric = metric
        self.threshold = float(threshold)
        self.poll_s = float(poll_s)
        self._index: _Index | None = None
        self._status = GalleryStatus()
        self._stale_since: float | None = None
        self._warn = RateLimitedLog(log, STALE_WARNING_INTERVAL_S)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if background:
            self._load()
            self._thread = threading.Thread(target=self._poll, name="gallery-reload", daemon=True)
            self._thread.start()

    def __repr__(self) -> str:
        return f"Matcher({self.gallery!r}, {self.embedder_id!r}, {self.metric!r}, threshold={self.threshold})"

    @property
    def status(self) -> GalleryStatus:
        return self._status

    @property
    def stale(self) -> bool:
        return self._status.stale

    def close(self) -> None:
        """Stop the background thread (if any); the gallery stays open."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)

    def score(self, distance: float | np.ndarray) -> float | np.ndarray:
        """Similarity in [0, 1]; 0.5 exactly at the threshold (see module docstring)."""
        return np.maximum(0.0, 1.0 - np.asarray(distance, dtype=np.float64) / (2.0 * self.threshold))

    # --------------------------------------------------------------- reloading

    def _load(self) -> bool:
        """Bring the index up to date with the gallery; True when it was rebuilt. GalleryError when the
        gallery cannot be read (the index is then unchanged)."""
        version = self.gallery.refresh()
        current = self._index
        if current is not None and current.version == version:
            return False
        if current is not None and self._thread is not None:
            gone = set(current.matchable) - self.gallery.names()
            if gone:
                self._index = current = current.without(gone)
                self._status = replace(self._status, people=len(current.matchable))
                log.info("gallery %s: %d people gone, no longer matched; reloading the rest", self.gallery.path,
                         len(gone))
        snapshot = self.gallery.snapshot(self.embedder_id)
        index = _build_index(snapshot, self.metric)
        del snapshot
        self._index = index  # one reference swap: a concurrent match sees the old index or the new
        status = self._status
        self._status = replace(status, people=len(index.people), faces=len(index.faces), loaded_at=time.time(),
                               reloads=status.reloads + (current is not None))
        return True

    def _refresh(self) -> None:
        """One attempt at `_load` that never raises once an index exists: a failure marks the index stale."""
        try:
            self._load()
        except Exception as exc:  # noqa: BLE001 - on the reload thread whatever broke it, the old index answers
            if self._index is None or (self._thread is None and not isinstance(exc, GalleryError)):
                raise
            if self._stop.is_set() or self.gallery.closed:
                return
            self._mark_stale(exc)
            return
        if self._status.stale:
            lasted = time.monotonic() - (self._stale_since or time.monotonic())
            self._status = replace(self._status, stale=False, error=None)
            self._stale_since = None
            log.warning("gallery %s: readable again after %.1f s; %d people, %d faces", self.gallery.path,
                        lasted, self._status.people, self._status.faces)

    def _mark_stale(self, exc: Exception) -> None:
        reason = str(exc) if isinstance(exc, GalleryError) else f"{type(exc).__name__}: {exc}"
        status = self._status
        self._status = replace(status, stale=True, error=reason, failures=status.failures + 1)
        if self._stale_since is None:
            self._stale_since = time.monotonic()
        age = time.time() - status.loaded_at if status.loaded_at is not None else float("nan")
        self._warn.warning("stale", "%s; matching with the copy loaded %.0f s ago (%d people) and retrying",
                           reason, age, status.people)

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_s):
            if self.gallery.closed:
                return
            self._refresh()

    def _current_index(self) -> _Index:
        if self._thread is None:
            self._refresh()
        index = self._index
        assert index is not None  # the first load either succeeded or raised
        return index

    # ---------------------------------------------------------------- matching

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
        """(people, (N, P) distance from every query to every person): one matrix product for the batch.

        inf where a person's negative examples are nearer to the query than their faces (module docstring).
        """
        index = self._current_index()
        q = self._check_queries(queries, index)
        people = index.matchable
        if not people or not len(q):
            return people, np.full((len(q), len(people)), np.inf, dtype=np.float32)
        per_face = pairwise(q, index.faces, self.metric)
        dist = np.minimum.reduceat(per_face, index.starts, axis=1)
        if index.negatives is not None:
            # A person whose negatives are nearer than their own faces is out for that query.
            per_negative = pairwise(q, index.negatives, self.metric)
            nearest_negative = np.minimum.reduceat(per_negative, index.negative_starts, axis=1)
            columns = index.negative_columns
            rejected = nearest_negative < dist[:, columns]
            if rejected.any():
                dist = dist.copy() if not dist.flags.writeable else dist
                sub = dist[:, columns]
                sub[rejected] = np.inf
                dist[:, columns] = sub
        return people, dist if index.shown is None else dist[:, index.shown]

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


def _embedder_option(embedder_id: str) -> str:
    """The command-line option that selects the embedder which produced `embedder_id`."""
    if embedder_id.startswith("dlib_resnet"):
        return "--embedder dlib_resnet"
    if embedder_id.startswith("arcface:"):
        return (f"--embedder mobilefacenet, or --arcface-model FILE (the model whose sha256 starts "
                f"{embedder_id.split(':', 1)[1]})")
    return f"the embedder {embedder_id!r} names"


def check_embedder(gallery: AnyGallery, embedder_id: str) -> None:
    """GalleryError (one line, with the remedy) when the gallery holds faces, none of them from
    `embedder_id`: matching would then call everyone unknown without saying why. An empty gallery is fine."""
    enrolled = gallery.embedders()
    if not enrolled or embedder_id in enrolled:
        return
    names = ", ".join(sorted(enrolled))
    first = sorted(enrolled)[0]
    raise GalleryError(
        f"gallery {gallery.path} was enrolled with embedder {names}, but this run uses {embedder_id}: "
        f"re-enrol the people with this embedder (streamer gallery import/add) or run with {_embedder_option(first)}"
    )


def open_matcher(path, spec) -> tuple[AnyGallery | None, Matcher | None]:  # noqa: ANN001
    """The gallery at `path` (read-only, never created) and a background-reloading matcher for embedder
    `spec`; (None, None) without a gallery: every face is then unknown. A gallery enrolled only with other
    embedders is refused (`check_embedder`). `path`: a file, a postgresql:// URL, or the `gallery` settings
    section (`streamer.match.open.location`).

    Opening waits up to the gallery's usual busy timeout for another process's lock; after the first load
    the reload thread waits only briefly and retries instead, with the last good copy answering meanwhile.
    """
    from streamer.match.open import location, open_gallery

    if location(path) is None:
        return None, None
    gallery = open_gallery(path, create=False, readonly=True)
    try:
        check_embedder(gallery, spec.id)
        matcher = Matcher(gallery, spec.id, spec.metric, spec.threshold, background=True)
    except BaseException:
        gallery.close()
        raise
    gallery.busy_timeout_s = RELOAD_BUSY_TIMEOUT_S
    return gallery, matcher
