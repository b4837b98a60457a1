"""The gallery: enrolled people and their face embeddings in one embedded SQLite file.

Every embedding is tagged with the id of the embedder that produced it and searches only ever look at one
embedder id, so switching models never compares vectors from two different spaces.

Privacy is part of the file format:
- `remove` really erases vectors: `secure_delete` zeroes freed content, the rollback journal (never WAL) is
  deleted when each transaction ends so no old page copies stay beside the file, and a VACUUM afterwards
  rebuilds the file. (Blocks the file system freed are beyond our reach; use encrypted storage for that.)
- Only file names of enrolment images are kept, never the images.

Writes are all-or-nothing: inputs are validated before the file is touched and each call is one transaction.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import unicodedata
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from streamer.errors import GalleryError

log = logging.getLogger(__name__)

# "STRG": marks a file as a streamer gallery, so another SQLite database is refused instead of altered.
APPLICATION_ID = 0x53545247
SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 5.0

# One statement each: executescript() would COMMIT the surrounding migration transaction.
_SCHEMA_V1 = (
    """CREATE TABLE people (
        id         INTEGER PRIMARY KEY,
        name       TEXT NOT NULL UNIQUE,
        created_at TEXT NOT NULL,
        metadata   TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(metadata))
    )""",
    """CREATE TABLE faces (
        id          INTEGER PRIMARY KEY,
        person_id   INTEGER NOT NULL REFERENCES people(id) ON DELETE CASCADE,
        embedder_id TEXT NOT NULL,
        dim         INTEGER NOT NULL CHECK (dim > 0),
        vector      BLOB NOT NULL CHECK (length(vector) = 4 * dim),
        source      TEXT,
        created_at  TEXT NOT NULL
    )""",
    "CREATE INDEX faces_by_embedder ON faces(embedder_id, person_id)",
    "CREATE INDEX faces_by_person ON faces(person_id)",
)


def _create_v1(conn: sqlite3.Connection) -> None:
    for statement in _SCHEMA_V1:
        conn.execute(statement)


# MIGRATIONS[v] upgrades a file from schema version v to v + 1 inside the open transaction.
# Version 0 is a blank file; later versions append a step here and bump SCHEMA_VERSION.
Migration = Callable[[sqlite3.Connection], None]
MIGRATIONS: dict[int, Migration] = {0: _create_v1}


@dataclass(frozen=True)
class Person:
    """One enrolled person as stored; `faces` counts embeddings over all embedder ids."""

    id: int
    name: str
    created_at: datetime
    faces: int
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PersonSummary:
    """A row of `Gallery.people`: how many faces a person has, and from which embedders."""

    name: str
    faces: int
    embedder_ids: tuple[str, ...]


@dataclass(frozen=True)
class _Entry:
    """One validated enrolment: a clean name, float32 (N, D) vectors and one source per row."""

    name: str
    vectors: np.ndarray
    sources: tuple[str | None, ...]


def clean_name(name: object) -> str:
    """The stored form of a person's name: NFC-normalised (macOS folder names arrive as NFD), trimmed, one line."""
    if not isinstance(name, str):
        raise GalleryError(f"person name must be text, got {type(name).__name__}")
    cleaned = unicodedata.normalize("NFC", name).strip()
    if not cleaned:
        raise GalleryError("person name is empty")
    if any(unicodedata.category(c) == "Cc" for c in cleaned):
        raise GalleryError(f"person name {cleaned!r} contains control characters")
    return cleaned


def _check_embedder_id(embedder_id: object) -> str:
    if not isinstance(embedder_id, str) or not embedder_id.strip():
        raise ValueError(f"embedder_id: expected a non-empty string, got {embedder_id!r}")
    return embedder_id


def _check_vectors(name: str, embeddings: object) -> np.ndarray:
    if not isinstance(embeddings, np.ndarray):
        raise ValueError(f"embeddings for {name!r}: expected a numpy array, got {type(embeddings).__name__}")
    if embeddings.ndim != 2 or embeddings.shape[0] == 0 or embeddings.shape[1] == 0:
        raise ValueError(f"embeddings for {name!r}: expected shape (N>=1, D>=1), got {embeddings.shape}")
    if not np.issubdtype(embeddings.dtype, np.floating):
        raise ValueError(f"embeddings for {name!r}: expected a float dtype, got {embeddings.dtype}")
    with np.errstate(over="ignore"):  # overflow is reported below as a ValueError, not a warning
        vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
    # Checked after the cast: a float64 value beyond float32's range would be stored as inf.
    if not np.isfinite(vectors).all():
        raise ValueError(f"embeddings for {name!r}: contain NaN or infinite values (or exceed float32 range)")
    return vectors


def _check_entry(name: object, embeddings: object, sources: Sequence[str] | None) -> _Entry:
    cleaned = clean_name(name)
    vectors = _check_vectors(cleaned, embeddings)
    if sources is None:
        checked: tuple[str | None, ...] = (None,) * len(vectors)
    else:
        if isinstance(sources, str | bytes) or len(sources) != len(vectors):
            got = "a single string" if isinstance(sources, str | bytes) else f"{len(sources)}"
            raise ValueError(f"sources for {cleaned!r}: expected {len(vectors)} file names, got {got}")
        if not all(isinstance(s, str) for s in sources):
            raise ValueError(f"sources for {cleaned!r}: expected strings")
        checked = tuple(sources)
    return _Entry(cleaned, vectors, checked)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Gallery:
    """People and their embeddings in one SQLite file.

    create:   make the file when it does not exist (otherwise a missing file is a GalleryError)
    readonly: open with SQLite's `mode=ro`; every write raises GalleryError

    Safe to share between threads (one connection behind a lock). Several processes may open the same
    file; `matrix` notices their commits through `PRAGMA data_version`.
    """

    def __init__(self, path: Path | str, *, create: bool = True, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self._lock = threading.RLock()
        self._matrices: dict[str, tuple[list[str], np.ndarray]] = {}
        self._data_version: int | None = None
        self._conn = self._connect(create=create and not readonly)
        try:
            self._prepare()
        except BaseException:
            self._conn.close()
            raise

    # ----------------------------------------------------------------- opening

    def _connect(self, *, create: bool) -> sqlite3.Connection:
        path = self.path
        try:
            exists = path.exists()
            parent_is_dir = path.parent.is_dir()
            path.parent.stat()  # is_dir() hides a permission problem as "missing"
        except PermissionError:
            raise GalleryError(f"gallery {path}: directory {path.parent} is not accessible") from None
        except OSError:
            pass  # a missing parent is reported below
        if path.is_dir():
            raise GalleryError(f"gallery {path} is a directory, not a file")
        if not exists:
            if not create:
                raise GalleryError(f"gallery {path} does not exist")
            if not parent_is_dir:
                raise GalleryError(f"cannot create gallery {path}: directory {path.parent} does not exist")
        # A rollback journal is written next to the file, so writing needs the directory too.
        if not self.readonly:
            if exists and not os.access(path, os.W_OK):
                raise GalleryError(f"gallery {path} is not writable")
            if not os.access(path.parent, os.W_OK | os.X_OK):
                raise GalleryError(f"gallery {path}: directory {path.parent} is not writable")
        mode = "ro" if self.readonly else ("rwc" if create else "rw")
        uri = f"file:{quote(str(path.resolve()))}?mode={mode}"
        try:
            conn = sqlite3.connect(
                uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise GalleryError(f"cannot open gallery {path}: {exc}") from None
        return conn

    def _prepare(self) -> None:
        conn = self._conn
        try:
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA secure_delete = ON")
            # Reading the header is the first real access: a JPEG or text file fails here.
            application_id = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise GalleryError(f"{self.path} is not a gallery file ({exc})") from None
        if application_id != APPLICATION_ID and (application_id != 0 or tables or version):
            raise GalleryError(f"{self.path} is an SQLite database but not a streamer gallery")
        if version > SCHEMA_VERSION:
            raise GalleryError(
                f"gallery {self.path} has schema version {version}; this streamer reads up to {SCHEMA_VERSION}"
            )
        if self.readonly:
            if version < SCHEMA_VERSION:
                raise GalleryError(
                    f"gallery {self.path} is empty or needs an upgrade (schema {version}); open it writable"
                )
        else:
            self._execute_pragma("PRAGMA journal_mode = DELETE")
            if version < SCHEMA_VERSION:
                self._migrate(version)
        self._data_version = self._read_data_version()

    def _execute_pragma(self, sql: str) -> None:
        try:
            self._conn.execute(sql).fetchall()
        except sqlite3.Error as exc:
            raise GalleryError(f"gallery {self.path}: {exc}") from None

    def _migrate(self, version: int) -> None:
        with self._write():
            for step in range(version, SCHEMA_VERSION):
                log.info("gallery %s: migrating schema %d -> %d", self.path, step, step + 1)
                MIGRATIONS[step](self._conn)
            self._conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # ---------------------------------------------------------------- plumbing

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: commit on success, roll back (file unchanged) on any error."""
        if self.readonly:
            raise GalleryError(f"gallery {self.path} is open read-only")
        with self._lock:
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise GalleryError(f"cannot write gallery {self.path}: {exc}") from None
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise GalleryError(f"cannot write gallery {self.path}: {exc}") from None
                raise
            finally:
                self._matrices.clear()

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return self._conn.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise GalleryError(f"cannot read gallery {self.path}: {exc}") from None

    def _read_data_version(self) -> int:
        return int(self._read("PRAGMA data_version")[0][0])

    def close(self) -> None:
        with self._lock:
            self._conn.close()
            self._matrices.clear()

    def __enter__(self) -> Gallery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Gallery({str(self.path)!r}, readonly={self.readonly})"

    # ------------------------------------------------------------------ writes

    def add(
        self,
        name: str,
        embeddings: np.ndarray,
        embedder_id: str,
        sources: Sequence[str] | None = None,
        *,
        metadata: Mapping[str, Any] | None = None,
    ) -> Person:
        """Enrol `embeddings` (N, D) for `name`, creating the person if new; all-or-nothing.

        `sources` holds one file name per row (kept for listings; never the image). `metadata` is merged
        into the person's JSON metadata.
        """
        return self.add_many([(name, embeddings, sources)], embedder_id, metadata=metadata)[0]

    def add_many(
        self,
        entries: Sequence[tuple[str, np.ndarray, Sequence[str] | None]],
        embedder_id: str,
        *,
        metadata: Mapping[str, Any] | None = None,
    ) -> list[Person]:
        """Enrol several people (a folder import) in ONE transaction: either every entry lands or none does.

        Returns one Person per entry, in order. Bad shapes, dtypes or values raise ValueError and bad names
        GalleryError, all before the file is touched.
        """
        embedder_id = _check_embedder_id(embedder_id)
        checked = [_check_entry(*entry) for entry in entries]
        dims = {e.vectors.shape[1] for e in checked}
        if len(dims) > 1:
            raise ValueError(f"embeddings for one embedder must share one dimension, got {sorted(dims)}")
        meta_json = None
        if metadata is not None:
            try:
                meta_json = json.dumps(dict(metadata), ensure_ascii=False, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"metadata: expected JSON-serialisable values ({exc})") from None
        if not checked:
            return []
        now = _now()
        with self._write() as conn:
            stored = self._embedder_dim(conn, embedder_id)
            if stored is not None and stored not in dims:
                raise GalleryError(
                    f"gallery holds {stored}-D embeddings for embedder {embedder_id!r}, "
                    f"refusing {dims.pop()}-D ones (a different model under the same id?)"
                )
            person_ids = [self._insert(conn, entry, embedder_id, now, meta_json) for entry in checked]
            return [self._person(conn, pid) for pid in person_ids]

    @staticmethod
    def _embedder_dim(conn: sqlite3.Connection, embedder_id: str) -> int | None:
        row = conn.execute("SELECT dim FROM faces WHERE embedder_id = ? LIMIT 1", (embedder_id,)).fetchone()
        return None if row is None else int(row[0])

    @staticmethod
    def _insert(
        conn: sqlite3.Connection, entry: _Entry, embedder_id: str, now: str, meta_json: str | None
    ) -> int:
        conn.execute(
            "INSERT INTO people (name, created_at, metadata) VALUES (?, ?, coalesce(?, '{}')) "
            "ON CONFLICT (name) DO UPDATE SET metadata = json_patch(metadata, coalesce(?, '{}'))",
            (entry.name, now, meta_json, meta_json),
        )
        person_id = conn.execute("SELECT id FROM people WHERE name = ?", (entry.name,)).fetchone()[0]
        dim = entry.vectors.shape[1]
        conn.executemany(
            "INSERT INTO faces (person_id, embedder_id, dim, vector, source, created_at) VALUES (?, ?, ?, ?, ?, ?)",
            [
                (person_id, embedder_id, dim, row.tobytes(), source, now)
                for row, source in zip(entry.vectors, entry.sources)
            ],
        )
        return int(person_id)

    def rename(self, old: str, new: str) -> Person:
        """Give a person a new name; the old name must exist and the new one must be free."""
        old_name, new_name = clean_name(old), clean_name(new)
        with self._write() as conn:
            row = conn.execute("SELECT id FROM people WHERE name = ?", (old_name,)).fetchone()
            if row is None:
                raise GalleryError(f"no person named {old_name!r} in gallery {self.path}")
            if new_name != old_name:
                if conn.execute("SELECT 1 FROM people WHERE name = ?", (new_name,)).fetchone():
                    raise GalleryError(f"cannot rename {old_name!r}: {new_name!r} already exists")
                conn.execute("UPDATE people SET name = ? WHERE id = ?", (new_name, row[0]))
            return self._person(conn, row[0])

    def remove(self, name: str) -> int:
        """Delete a person and erase their vectors from the file; returns how many faces were erased."""
        cleaned = clean_name(name)
        with self._write() as conn:
            row = conn.execute(
                "SELECT p.id, count(f.id) FROM people p LEFT JOIN faces f ON f.person_id = p.id "
                "WHERE p.name = ? GROUP BY p.id",
                (cleaned,),
            ).fetchone()
            if row is None:
                raise GalleryError(f"no person named {cleaned!r} in gallery {self.path}")
            conn.execute("DELETE FROM people WHERE id = ?", (row[0],))  # faces go by ON DELETE CASCADE
        self._vacuum()
        log.info("gallery %s: removed %r and erased %d embeddings", self.path, cleaned, row[1])
        return int(row[1])

    def _vacuum(self) -> None:
        # secure_delete already zeroed the freed cells; VACUUM also drops the freed pages and any
        # fragments left in unused page space, so nothing of the person survives in the file.
        with self._lock:
            try:
                self._conn.execute("VACUUM")
            except sqlite3.Error as exc:
                raise GalleryError(f"gallery {self.path}: removed, but VACUUM failed: {exc}") from None

    # ------------------------------------------------------------------- reads

    @staticmethod
    def _person(conn: sqlite3.Connection, person_id: int) -> Person:
        pid, name, created_at, metadata, faces = conn.execute(
            "SELECT p.id, p.name, p.created_at, p.metadata, "
            "(SELECT count(*) FROM faces f WHERE f.person_id = p.id) FROM people p WHERE p.id = ?",
            (person_id,),
        ).fetchone()
        return Person(int(pid), name, datetime.fromisoformat(created_at), int(faces), json.loads(metadata))

    def person(self, name: str) -> Person:
        """One person by name; GalleryError when unknown."""
        cleaned = clean_name(name)
        with self._lock:
            row = self._read("SELECT id FROM people WHERE name = ?", (cleaned,))
            if not row:
                raise GalleryError(f"no person named {cleaned!r} in gallery {self.path}")
            return self._person(self._conn, row[0][0])

    def people(self, embedder_id: str | None = None) -> list[PersonSummary]:
        """Everyone, sorted by name; with `embedder_id`, only people with faces from it (and only those counted)."""
        rows = self._read(
            "SELECT p.name, f.embedder_id, count(f.id) "
            "FROM people p LEFT JOIN faces f ON f.person_id = p.id AND (?1 IS NULL OR f.embedder_id = ?1) "
            "GROUP BY p.id, f.embedder_id ORDER BY p.name, f.embedder_id",
            (embedder_id,),
        )
        # Grouped here rather than with group_concat, which would split ids that contain its separator.
        per_person: dict[str, dict[str, int]] = {}
        for name, eid, count in rows:
            ids = per_person.setdefault(name, {})
            if eid is not None:
                ids[eid] = int(count)
        return [
            PersonSummary(name, sum(ids.values()), tuple(ids))
            for name, ids in per_person.items()
            if embedder_id is None or ids
        ]

    def embedders(self) -> dict[str, int]:
        """Embedder ids present in the gallery and their vector dimension."""
        return {eid: int(dim) for eid, dim in self._read("SELECT DISTINCT embedder_id, dim FROM faces")}

    def __len__(self) -> int:
        return int(self._read("SELECT count(*) FROM people")[0][0])

    def __contains__(self, name: object) -> bool:
        try:
            cleaned = clean_name(name)
        except GalleryError:
            return False
        return bool(self._read("SELECT 1 FROM people WHERE name = ?", (cleaned,)))

    def matrix(self, embedder_id: str) -> tuple[list[str], np.ndarray]:
        """Every face of one embedder: (names, one per row; vectors (M, D) float32, read-only).

        Rows are grouped by person (sorted by name). Cached until this object or any other connection
        (another Gallery, another process) changes the file; the returned objects are the cached ones, so
        an unchanged identity means an unchanged gallery. Empty gallery: ([], (0, 0) array).
        """
        with self._lock:
            version = self._read_data_version()
            if version != self._data_version:
                self._matrices.clear()
                self._data_version = version
            cached = self._matrices.get(embedder_id)
            if cached is not None:
                return cached
            rows = self._read(
                "SELECT p.name, f.dim, f.vector FROM faces f JOIN people p ON p.id = f.person_id "
                "WHERE f.embedder_id = ? ORDER BY p.name, f.id",
                (embedder_id,),
            )
            names = [r[0] for r in rows]
            if rows:
                dim = int(rows[0][1])
                vectors = np.frombuffer(b"".join(r[2] for r in rows), dtype=np.float32).reshape(len(rows), dim)
            else:
                vectors = np.zeros((0, 0), dtype=np.float32)
            vectors.setflags(write=False)  # the cache is shared: nobody may edit it in place
            result = (names, vectors)
            self._matrices[embedder_id] = result
            return result


__all__ = ["Gallery", "GalleryError", "Person", "PersonSummary", "clean_name", "APPLICATION_ID", "SCHEMA_VERSION"]
