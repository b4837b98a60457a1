"""Stable ids for strangers: online clustering of unknown tracks, across every stream of a run.

An unknown track's identity event carries the track's quality-weighted mean embedding (internally: the
publisher strips it unless `publish.include_embeddings`). The supervisor hands each such event to one
`StrangerBook`, which answers with an id like `u-17`:

- the nearest cluster wins when its distance is below `recognition.stranger_distance_ratio` x the
  embedder's calibrated threshold (in the embedder's own metric). A cluster's distance is the smaller of
  the distance to its quality-weighted centroid and to its nearest kept face, so a stranger seen once
  from a poor angle and once frontally still joins up through either.
- the ratio is below 1 on purpose: a false merge (two strangers under one id) is worse than a split (one
  stranger under two ids, which `gallery promote` of both repairs), so joining needs more similarity
  than naming a known person does.
- a cluster that holds a track still live in the same stream is never joined: two faces in one frame
  are two people. (Two cameras may see one person at once, so other streams do not count.)
- else a new cluster gets the next id from the book's counter (`u-1`, `u-2`, ...; ids are never reused
  within a book, nor across runs with persistence on).

Clusters not seen for `recognition.unknown_ttl_s` expire; at most `recognition.max_strangers` are kept
(the least recently seen goes first). Each keeps its `recognition.stranger_faces` best faces (track
embedding + quality, and the JPEG crop when the event came with one, in memory only) for
`promote_vectors`, what `streamer gallery promote` and the web console enrol.

Nothing is written anywhere unless `recognition.strangers_file` is set: then clusters (embeddings and
numbers, never crops) live in that SQLite file (mode 0600) too, so ids survive a restart and `gallery
promote` works without a running pipeline. Thread-safe: the supervisor's loop assigns while the admin
channel's thread reads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import numpy as np

from streamer.errors import ConfigError
from streamer.lru import LruDict
from streamer.match.distance import Metric, check_metric, l2_normalise, pairwise
from streamer.track.bytetrack import IdCounter

if TYPE_CHECKING:
    from streamer.config import RecognitionSettings
    from streamer.infer.embedders import EmbedderSpec

log = logging.getLogger(__name__)

PREFIX = "u-"
MAX_CROP_BYTES = 256 * 1024  # a face crop bigger than this is not kept (memory is bounded per cluster)
_MAX_TRACKS = 10_000  # (stream, track) -> cluster for tracks still live; bounded in case ends are missed


def stranger_number(stranger_id: str) -> int:
    """17 for "u-17"; ValueError for anything else."""
    if not isinstance(stranger_id, str) or not stranger_id.startswith(PREFIX) or not stranger_id[2:].isdigit():
        raise ValueError(f"stranger id: expected u-<number> (e.g. u-17), got {stranger_id!r}")
    number = int(stranger_id[2:])
    if number < 1 or stranger_id[2] == "0":
        raise ValueError(f"stranger id: expected u-<number> (e.g. u-17), got {stranger_id!r}")
    return number


@dataclass(frozen=True, eq=False)
class StrangerFace:
    """One of a cluster's best faces: a track's mean embedding, its quality, where and when it was seen."""

    embedding: np.ndarray  # (D,) float32
    quality: float
    stream: str
    seen_at: float  # time.time()
    crop: bytes | None = None  # JPEG, memory only


@dataclass(frozen=True)
class StrangerSummary:
    """What the console lists about a cluster."""

    id: str
    first_seen: float
    last_seen: float
    tracks: int  # tracks assigned to it in all
    streams: tuple[str, ...]
    faces: int
    best_quality: float
    has_crop: bool


@dataclass(eq=False)
class _Cluster:
    number: int
    total: np.ndarray  # quality-weighted sum of the tracks' embeddings
    weight: float
    first_seen: float
    last_seen: float
    tracks: int = 0
    streams: set[str] = field(default_factory=set)
    faces: list[StrangerFace] = field(default_factory=list)  # best first
    live: set[tuple[str, int]] = field(default_factory=set)  # tracks of it not ended yet

    @property
    def id(self) -> str:
        return f"{PREFIX}{self.number}"

    @property
    def centroid(self) -> np.ndarray:
        return (self.total / max(self.weight, 1e-12)).astype(np.float32)


@dataclass(frozen=True)
class _Assigned:
    cluster: int  # its number
    embedding: np.ndarray  # the contribution last made by the track (removed if it sends a newer one)
    weight: float


class StrangerBook:
    def __init__(
        self,
        metric: Metric,
        threshold: float,
        *,
        embedder_id: str,
        ttl_s: float = 86_400.0,
        max_clusters: int = 1000,
        faces_per_cluster: int = 5,
        store: StrangerStore | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`threshold`: the join distance itself (already the embedder's threshold x the ratio)."""
        self.metric = check_metric(metric)
        if not threshold > 0:
            raise ValueError(f"StrangerBook: threshold must be > 0, got {threshold}")
        if not ttl_s > 0:
            raise ValueError(f"StrangerBook: ttl_s must be > 0, got {ttl_s}")
        if max_clusters < 1 or faces_per_cluster < 1:
            raise ValueError(f"StrangerBook: max_clusters and faces_per_cluster must be >= 1, got "
                             f"{max_clusters} and {faces_per_cluster}")
        self.threshold = float(threshold)
        self.embedder_id = embedder_id
        self.ttl_s = float(ttl_s)
        self.max_clusters = int(max_clusters)
        self.faces_per_cluster = int(faces_per_cluster)
        self.clock = clock
        self.store = store
        self._lock = threading.RLock()
        self._clusters: OrderedDict[int, _Cluster] = OrderedDict()  # least recently seen first
        self._tracks: LruDict[tuple[str, int], _Assigned] = LruDict(_MAX_TRACKS)
        self.counter = IdCounter(1)
        self.assigned = 0  # tracks given an id (new or returning)
        self.created = 0  # clusters made
        if store is not None:
            clusters, next_number = store.load(embedder_id)
            for cluster in sorted(clusters, key=lambda c: c.last_seen):
                self._clusters[cluster.number] = cluster
            self.counter = IdCounter(max(next_number, 1))
            self.expire()

    @classmethod
    def from_settings(cls, settings: RecognitionSettings, spec: EmbedderSpec) -> StrangerBook:
        store = None if settings.strangers_file is None else StrangerStore(settings.strangers_file)
        return cls(spec.metric, spec.threshold * settings.stranger_distance_ratio, embedder_id=spec.id,
                   ttl_s=settings.unknown_ttl_s, max_clusters=settings.max_strangers,
                   faces_per_cluster=settings.stranger_faces, store=store)

    def __len__(self) -> int:
        with self._lock:
            return len(self._clusters)

    # -- the supervisor's one call ------------------------------------------------------------------------
    def observe(self, event: Any, crop: bytes | None = None) -> Any:
        """`event` with `stranger` set when it is an unknown identity with an embedding; a `track.ended`
        frees its track (its cluster may be joined by a later track of that stream); anything else as is."""
        kind = getattr(event, "kind", None)
        if kind == "track.ended":
            self.track_ended(event.stream, event.track)
        elif kind == "identity" and event.name is None and event.embedding is not None:
            quality = event.quality if event.quality is not None else 1.0
            try:
                stranger = self.assign(event.stream, event.track, event.embedding, quality, crop)
            except ValueError as exc:  # e.g. an embedding of another length: a bug, never fatal for the run
                log.warning("no stranger id for %s track %d: %s", event.stream, event.track, exc)
                return event
            return event.model_copy(update={"stranger": stranger})
        elif kind == "identity" and event.name is not None:
            self.track_named(event.stream, event.track)
        return event

    # -- clustering ----------------------------------------------------------------------------------------
    def assign(self, stream: str, track: int, embedding: Sequence[float] | np.ndarray, quality: float = 1.0,
               crop: bytes | None = None) -> str:
        """The stranger id of `track` of `stream`, whose (mean) embedding is `embedding`."""
        vector = np.asarray(embedding, np.float32).reshape(-1)
        if not len(vector) or not np.all(np.isfinite(vector)):
            raise ValueError("embedding: expected a non-empty finite vector")
        if self.metric == "cosine":
            vector = l2_normalise(vector[None])[0]
        quality = float(min(max(quality, 1e-3), 1.0))  # a zero weight would make no centroid
        key = (stream, int(track))
        now = self.clock()
        with self._lock:
            self._expire(now)
            previous = self._tracks.get(key)
            cluster = None if previous is None else self._clusters.get(previous.cluster)
            if cluster is not None and len(cluster.total) != len(vector):
                raise ValueError(f"embedding: expected {len(cluster.total)} values, got {len(vector)}")
            if cluster is not None:  # the same track again (e.g. named, then unknown): replace its share
                cluster.total = cluster.total - previous.weight * previous.embedding
                cluster.weight = max(cluster.weight - previous.weight, 0.0)
            else:
                cluster = self._nearest(vector, stream, key)
                if cluster is None:
                    cluster = self._new(vector, now)
                cluster.tracks += 1
            cluster.total = cluster.total + quality * vector
            cluster.weight += quality
            cluster.last_seen = now
            cluster.streams.add(stream)
            cluster.live.add(key)
            self._keep_face(cluster, StrangerFace(vector.copy(), quality, stream, now,
                                                  crop if crop is not None and len(crop) <= MAX_CROP_BYTES else None))
            self._clusters.move_to_end(cluster.number)
            self._tracks.set(key, _Assigned(cluster.number, vector, quality))
            self.assigned += 1
            while len(self._clusters) > self.max_clusters:
                number, _ = self._clusters.popitem(last=False)
                self._forget_tracks(number)
                if self.store is not None:
                    self.store.delete(number)
            if self.store is not None:
                self.store.save(cluster, self.counter.peek, self.embedder_id)
            return cluster.id

    def _nearest(self, vector: np.ndarray, stream: str, key: tuple[str, int]) -> _Cluster | None:
        """The nearest joinable cluster under the threshold, or None. One matrix product over every
        cluster's centroid and kept faces (a few thousand rows at most)."""
        candidates = [
            c for c in self._clusters.values()
            # One of its tracks is in this stream now: the same person cannot be twice in one frame. (A key
            # the bounded track map lost is stale: its end was never seen.)
            if not any(other[0] == stream and other != key and other in self._tracks for other in c.live)
        ]  # fmt: skip
        if not candidates:
            return None
        rows, owners = [], []
        for index, cluster in enumerate(candidates):
            if len(cluster.total) != len(vector):
                raise ValueError(f"embedding: expected {len(cluster.total)} values, got {len(vector)}")
            rows.append(cluster.centroid)
            rows.extend(face.embedding for face in cluster.faces)
            owners.extend([index] * (1 + len(cluster.faces)))
        distances = pairwise(vector[None], np.stack(rows), self.metric)[0]
        best = int(np.argmin(distances))
        return candidates[owners[best]] if distances[best] < self.threshold else None

    def _new(self, vector: np.ndarray, now: float) -> _Cluster:
        cluster = _Cluster(self.counter.next(), np.zeros_like(vector), 0.0, now, now)
        self._clusters[cluster.number] = cluster
        self.created += 1
        return cluster

    def _keep_face(self, cluster: _Cluster, face: StrangerFace) -> None:
        faces = [*cluster.faces, face]
        faces.sort(key=lambda f: -f.quality)  # stable: of equal quality the earlier stays
        cluster.faces = faces[: self.faces_per_cluster]

    def track_ended(self, stream: str, track: int) -> None:
        key = (stream, int(track))
        with self._lock:
            assigned = self._tracks.pop(key, None)
            if assigned is not None and assigned.cluster in self._clusters:
                self._clusters[assigned.cluster].live.discard(key)

    def track_named(self, stream: str, track: int) -> None:
        """A track once unknown was named after all: it no longer speaks for its cluster's liveness."""
        self.track_ended(stream, track)

    def _forget_tracks(self, number: int) -> None:
        for key in [k for k, a in self._tracks.items() if a.cluster == number]:
            self._tracks.pop(key, None)

    # -- expiry --------------------------------------------------------------------------------------------
    def expire(self, now: float | None = None) -> int:
        with self._lock:
            return self._expire(self.clock() if now is None else now)

    def _expire(self, now: float) -> int:
        gone = [n for n, c in self._clusters.items() if now - c.last_seen > self.ttl_s and not c.live]
        for number in gone:
            del self._clusters[number]
            self._forget_tracks(number)
            if self.store is not None:
                self.store.delete(number)
        return len(gone)

    # -- for the console and `gallery promote` --------------------------------------------------------
    def clusters(self) -> list[StrangerSummary]:
        """Every cluster, the most recently seen first."""
        with self._lock:
            self._expire(self.clock())
            return [self._summary(c) for c in reversed(self._clusters.values())]

    def summary(self, stranger_id: str) -> StrangerSummary | None:
        with self._lock:
            cluster = self._get(stranger_id)
            return None if cluster is None else self._summary(cluster)

    def best_faces(self, stranger_id: str) -> list[StrangerFace]:
        """The cluster's best faces, best first; [] for an unknown (or expired) id."""
        with self._lock:
            cluster = self._get(stranger_id)
            return [] if cluster is None else list(cluster.faces)

    def promote_vectors(self, stranger_id: str) -> np.ndarray:
        """(N, D) float32 embeddings to enrol for this stranger (its best faces, best first); (0, 0) when
        the id is unknown or expired."""
        faces = self.best_faces(stranger_id)
        if not faces:
            return np.zeros((0, 0), np.float32)
        return np.stack([f.embedding for f in faces]).astype(np.float32)

    def forget(self, stranger_id: str) -> bool:
        """Drop a cluster (promoted, or the operator says so); its id is not reused."""
        with self._lock:
            cluster = self._get(stranger_id)
            if cluster is None:
                return False
            del self._clusters[cluster.number]
            self._forget_tracks(cluster.number)
            if self.store is not None:
                self.store.delete(cluster.number)
            return True

    def _get(self, stranger_id: str) -> _Cluster | None:
        try:
            number = stranger_number(stranger_id)
        except ValueError:
            return None
        cluster = self._clusters.get(number)
        if cluster is not None and self.clock() - cluster.last_seen > self.ttl_s and not cluster.live:
            return None
        return cluster

    @staticmethod
    def _summary(cluster: _Cluster) -> StrangerSummary:
        return StrangerSummary(cluster.id, cluster.first_seen, cluster.last_seen, cluster.tracks,
                               tuple(sorted(cluster.streams)), len(cluster.faces),
                               max((f.quality for f in cluster.faces), default=0.0),
                               any(f.crop is not None for f in cluster.faces))

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


def enrol_stranger(gallery: Any, name: str, stranger_id: str, faces: Sequence[tuple[np.ndarray, str]],
                   embedder_id: str) -> Any:
    """Enrol a stranger's best faces ((embedding, stream) pairs) under `name`, new or enrolled, in `gallery`
    (an open Gallery or PgGallery); returns its `Enrolled`. What `streamer gallery promote` and the console's
    POST /api/v1/strangers/{id}/promote both do. The content hash of a face is the sha256 of its float32
    vector's bytes (the vector is all there is of it), so promoting the same stranger twice adds nothing."""
    if not faces:
        raise ValueError(f"stranger {stranger_id}: no faces to enrol")
    vectors = np.stack([np.asarray(v, np.float32).reshape(-1) for v, _ in faces])
    hashes = [hashlib.sha256(v.tobytes()).hexdigest() for v in vectors]
    sources = [f"stranger {stranger_id} ({stream})" for _, stream in faces]
    done, = gallery.enrol([(name, vectors, sources, hashes)], embedder_id)
    return done


# -- persistence (only with recognition.strangers_file) -------------------------------------------------
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS clusters (
    number INTEGER PRIMARY KEY, first_seen REAL NOT NULL, last_seen REAL NOT NULL, tracks INTEGER NOT NULL,
    streams TEXT NOT NULL, total BLOB NOT NULL, weight REAL NOT NULL, faces TEXT NOT NULL
);
"""


class StrangerStore:
    """Clusters in a SQLite file of this user only (0600). Crops are never written: memory only."""

    def __init__(self, path: Path | str, *, readonly: bool = False) -> None:
        self.path = Path(path).expanduser()
        self.readonly = readonly
        self._lock = threading.Lock()
        if readonly:
            if not self.path.is_file():
                raise ConfigError(f"recognition.strangers_file {self.path} does not exist")
            uri = f"file:{quote(str(self.path.resolve()))}?mode=ro"
        else:
            if not self.path.parent.is_dir():
                raise ConfigError(f"recognition.strangers_file {self.path}: directory {self.path.parent} does not "
                                  "exist")
            try:  # made 0600 before SQLite touches it (SQLite gives its journal the same mode)
                os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
                os.chmod(self.path, 0o600)
            except OSError as exc:
                raise ConfigError(f"recognition.strangers_file {self.path}: {exc.strerror}") from None
            uri = f"file:{quote(str(self.path.resolve()))}?mode=rw"
        try:
            self._conn = sqlite3.connect(uri, uri=True, timeout=2.0, isolation_level=None, check_same_thread=False)
            if not readonly:
                self._conn.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise ConfigError(f"recognition.strangers_file {self.path}: not a strangers file ({exc})") from None

    def load(self, embedder_id: str) -> tuple[list[_Cluster], int]:
        """The stored clusters and the next id number; ConfigError when they are another embedder's."""
        try:
            with self._lock:
                meta = dict(self._conn.execute("SELECT key, value FROM meta").fetchall())
                rows = self._conn.execute("SELECT number, first_seen, last_seen, tracks, streams, total, weight, "
                                          "faces FROM clusters").fetchall()
        except sqlite3.Error as exc:
            raise ConfigError(f"recognition.strangers_file {self.path}: not a strangers file ({exc})") from None
        stored = meta.get("embedder")
        if stored is not None and stored != embedder_id and rows:
            raise ConfigError(f"recognition.strangers_file {self.path} holds strangers seen with embedder {stored}, "
                              f"not {embedder_id}: use another file or delete this one")
        clusters = []
        for number, first, last, tracks, streams, total, weight, faces in rows:
            faces = [StrangerFace(np.frombuffer(bytes.fromhex(f["e"]), np.float32).copy(), float(f["q"]), f["s"],
                                  float(f["t"])) for f in json.loads(faces)]
            clusters.append(_Cluster(int(number), np.frombuffer(total, np.float32).copy(), float(weight), float(first),
                                     float(last), int(tracks), set(json.loads(streams)), faces))
        next_number = max([int(meta.get("next", 1))] + [c.number + 1 for c in clusters])
        return clusters, next_number

    def read(self, stranger_id: str) -> tuple[str | None, list[StrangerFace], float | None]:
        """(embedder id, best faces, last seen) of one stored cluster; ([], None) when it is not there."""
        number = stranger_number(stranger_id)
        try:
            with self._lock:
                meta = dict(self._conn.execute("SELECT key, value FROM meta").fetchall())
                row = self._conn.execute("SELECT faces, last_seen FROM clusters WHERE number = ?",
                                         (number,)).fetchone()
        except sqlite3.Error as exc:
            raise ConfigError(f"recognition.strangers_file {self.path}: not a strangers file ({exc})") from None
        if row is None:
            return meta.get("embedder"), [], None
        faces = [StrangerFace(np.frombuffer(bytes.fromhex(f["e"]), np.float32).copy(), float(f["q"]), f["s"],
                              float(f["t"])) for f in json.loads(row[0])]
        return meta.get("embedder"), faces, float(row[1])

    def save(self, cluster: _Cluster, next_number: int, embedder_id: str) -> None:
        faces = json.dumps([{"e": f.embedding.astype(np.float32).tobytes().hex(), "q": f.quality, "s": f.stream,
                             "t": f.seen_at} for f in cluster.faces])
        try:
            with self._lock:
                self._conn.execute("BEGIN")
                self._conn.execute("INSERT OR REPLACE INTO meta VALUES ('embedder', ?), ('next', ?)",
                                   (embedder_id, str(next_number)))
                self._conn.execute(
                    "INSERT OR REPLACE INTO clusters VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (cluster.number, cluster.first_seen, cluster.last_seen, cluster.tracks,
                     json.dumps(sorted(cluster.streams)), cluster.total.astype(np.float32).tobytes(), cluster.weight,
                     faces),
                )
                self._conn.execute("COMMIT")
        except sqlite3.Error as exc:  # the run goes on in memory; the file is a convenience
            self._rollback()
            log.warning("cannot write strangers to %s: %s", self.path, exc)

    def delete(self, number: int) -> None:
        try:
            with self._lock:
                self._conn.execute("DELETE FROM clusters WHERE number = ?", (number,))
        except sqlite3.Error as exc:
            log.warning("cannot update strangers in %s: %s", self.path, exc)

    def _rollback(self) -> None:
        try:
            self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    def close(self) -> None:
        with self._lock:
            self._conn.close()
