"""The gallery: enrolled people and their face embeddings in one embedded SQLite file.

Every embedding is tagged with the id of the embedder that produced it and searches only ever look at one
embedder id, so switching models never compares vectors from two different spaces.

Privacy is part of the file format:
- `remove` really erases vectors: `secure_delete` zeroes freed content, the rollback journal (never WAL) is
  deleted when each transaction ends so no old page copies stay beside the file, and the file is then
  rebuilt (`VACUUM INTO` a fresh file renamed over it: readers keep reading meanwhile, where an in-place
  VACUUM would lock them out for as long as it runs, half a minute at 500k faces). (Blocks the file system
  freed are beyond our reach; use encrypted storage for that.)
- Only file names of enrolment images are kept, never the images.

Writes are all-or-nothing: inputs are validated before the file is touched and each call is one transaction.

Readers follow the path, not only the open file: `refresh` notices a file replaced under the same name
(`mv new.db people.db`, the way to swap a gallery atomically) and reopens it, so a person removed that way
stops being matched. A read-only Gallery never writes: SQLite's `mode=ro`, and where the directory cannot
be written either (no room for WAL side files) `immutable=1`, whose changes are then found by the file's
size and mtime.
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
SCHEMA_VERSION = 2
BUSY_TIMEOUT_S = 5.0
_CHUNK_ROWS = 2048  # rows copied per step when loading a matrix: the GIL is never held for long
_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_READONLY, _SQLITE_CANTOPEN = 5, 6, 8, 14

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


# Version 2: a content hash per face (re-enrolling the same photo adds nothing) and negative examples
# ("this is not NAME"), which go with their person on remove like the faces do.
_SCHEMA_V2 = (
    "ALTER TABLE faces ADD COLUMN sha256 TEXT",
    "CREATE UNIQUE INDEX faces_by_hash ON faces(person_id, embedder_id, sha256) WHERE sha256 IS NOT NULL",
    """CREATE TABLE negatives (
        id          INTEGER PRIMARY KEY,
        person_id   INTEGER NOT NULL REFERENCES people(id) ON DELETE CASCADE,
        embedder_id TEXT NOT NULL,
        dim         INTEGER NOT NULL CHECK (dim > 0),
        vector      BLOB NOT NULL CHECK (length(vector) = 4 * dim),
        source      TEXT,
        sha256      TEXT,
        created_at  TEXT NOT NULL
    )""",
    "CREATE INDEX negatives_by_embedder ON negatives(embedder_id, person_id)",
    "CREATE UNIQUE INDEX negatives_by_hash ON negatives(person_id, embedder_id, sha256) WHERE sha256 IS NOT NULL",
)


def _create_v2(conn: sqlite3.Connection) -> None:
    for statement in _SCHEMA_V2:
        conn.execute(statement)


# MIGRATIONS[v] upgrades a file from schema version v to v + 1 inside the open transaction.
# Version 0 is a blank file; later versions append a step here and bump SCHEMA_VERSION.
Migration = Callable[[sqlite3.Connection], None]
MIGRATIONS: dict[int, Migration] = {0: _create_v1, 1: _create_v2}


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
    negatives: int = 0  # "this is not NAME" examples, over the same embedder ids as `faces`


@dataclass(frozen=True)
class Enrolled:
    """What one `Gallery.enrol` entry did: the person as stored, faces added, and the sources of those
    skipped because the same content (sha256) was already enrolled for that person and embedder."""

    person: Person
    added: int
    duplicates: tuple[str | None, ...] = ()


@dataclass(frozen=True, eq=False)
class Snapshot:
    """Every face of one embedder, read in one transaction: rows grouped by person, people sorted by name.

    version: `Gallery.refresh()`'s token for the state read; people: one name per group;
    starts: (P,) first row of each person's group in `vectors` (M, D) float32 (fresh, owned by the caller).
    """

    version: tuple[int, int]
    people: tuple[str, ...]
    starts: np.ndarray
    vectors: np.ndarray
    # Negative examples, grouped like the faces: one name per group, (G,) group starts, (K, D) vectors.
    negative_people: tuple[str, ...] = ()
    negative_starts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.intp))
    negatives: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))

    @property
    def names(self) -> list[str]:
        """One name per row of `vectors`."""
        ends = [*self.starts.tolist()[1:], len(self.vectors)]
        return [name for name, start, end in zip(self.people, self.starts.tolist(), ends) for _ in range(end - start)]


_FileId = tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns


def _file_id(path: Path) -> _FileId | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _primary_code(exc: sqlite3.Error) -> int:
    return getattr(exc, "sqlite_errorcode", 0) & 0xFF


@dataclass(frozen=True)
class _Entry:
    """One validated enrolment: a clean name, float32 (N, D) vectors and one source per row."""

    name: str
    vectors: np.ndarray
    sources: tuple[str | None, ...]
    hashes: tuple[str | None, ...]


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


def _check_strings(what: str, noun: str, name: str, values: Sequence[str] | None,
                   count: int) -> tuple[str | None, ...]:
    if values is None:
        return (None,) * count
    if isinstance(values, str | bytes) or len(values) != count:
        got = "a single string" if isinstance(values, str | bytes) else f"{len(values)}"
        raise ValueError(f"{what} for {name!r}: expected {count} {noun}, got {got}")
    if not all(v is None or isinstance(v, str) for v in values):
        raise ValueError(f"{what} for {name!r}: expected strings")
    return tuple(values)


def _check_entry(name: object, embeddings: object, sources: Sequence[str] | None = None,
                 hashes: Sequence[str] | None = None) -> _Entry:
    """`hashes`: one sha256 (hex) of each face's source content; a hash already stored for this person
    and embedder makes that row a duplicate, skipped."""
    cleaned = clean_name(name)
    vectors = _check_vectors(cleaned, embeddings)
    checked = _check_strings("sources", "file names", cleaned, sources, len(vectors))
    digests = _check_strings("hashes", "sha256 digests", cleaned, hashes, len(vectors))
    return _Entry(cleaned, vectors, checked, digests)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Gallery:
    """People and their embeddings in one SQLite file.

    create:         make the file when it does not exist (otherwise a missing file is a GalleryError)
    readonly:       never write: SQLite's `mode=ro` (plus `immutable=1` where the directory is read-only
                    too); every write raises GalleryError
    busy_timeout_s: how long a statement waits for another process's lock before GalleryError

    Safe to share between threads (one connection behind a lock). Several processes may open the same
    file; `refresh` (which `matrix` and `snapshot` call) notices their commits through
    `PRAGMA data_version`, and a file replaced under the same path by reopening it.
    """

    def __init__(self, path: Path | str, *, create: bool = True, readonly: bool = False,
                 busy_timeout_s: float = BUSY_TIMEOUT_S) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self._busy_timeout_s = float(busy_timeout_s)
        self._lock = threading.RLock()
        self._matrices: dict[str, tuple[list[str], np.ndarray]] = {}
        self._data_version: int | None = None
        self._generation = 0  # bumped on every own write and reopen: part of `refresh`'s token
        self._immutable = False
        self._closed = False
        self._conn = None  # set by _open below; None only while opening
        self._check_path(create=create and not readonly)
        self._conn, self._file = self._open(create=create and not readonly)

    # ----------------------------------------------------------------- opening

    def _check_path(self, *, create: bool) -> None:
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

    def _connect(self, *, create: bool, immutable: bool = False) -> sqlite3.Connection:
        mode = "ro" if self.readonly else ("rwc" if create else "rw")
        uri = f"file:{quote(str(self.path.resolve()))}?mode={mode}" + ("&immutable=1" if immutable else "")
        try:
            conn = sqlite3.connect(
                uri, uri=True, timeout=self._busy_timeout_s, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise GalleryError(f"cannot open gallery {self.path}: {exc}") from None
        return conn

    def _open(self, *, create: bool) -> tuple[sqlite3.Connection, _FileId]:
        """A prepared connection to the file now at `path`, and that file's identity (taken before opening:
        a file swapped in meanwhile then differs from it, and the next `refresh` reopens once more)."""
        before = _file_id(self.path)
        conn = self._connect(create=create)
        try:
            self._immutable = False
            self._prepare(conn)
        except _NeedsImmutable as exc:
            conn.close()
            # mode=ro alone cannot read a WAL file in a directory where its -shm cannot be made. With no
            # writer able to work there either, immutable is safe, except over an interrupted write.
            journal = self.path.with_name(self.path.name + "-journal")
            if journal.exists():
                raise GalleryError(
                    f"gallery {self.path}: an interrupted write left {journal.name}, which only a writable "
                    "open can roll back; open the gallery where it can be written once"
                ) from None
            conn = self._connect(create=False, immutable=True)
            try:
                self._immutable = True
                self._prepare(conn)
            except GalleryError:
                conn.close()
                raise
            except BaseException:
                conn.close()
                raise GalleryError(f"cannot open gallery {self.path} read-only: {exc.cause}") from None
            log.info("gallery %s: read-only directory, opened immutable (changes are seen when the file is)",
                     self.path)
        except BaseException:
            conn.close()
            raise
        return conn, before or _file_id(self.path) or (0, 0, 0, 0)

    def _open_error(self, exc: sqlite3.Error) -> GalleryError:
        code = _primary_code(exc)
        if code in (_SQLITE_BUSY, _SQLITE_LOCKED):
            return GalleryError(f"gallery {self.path} is locked by another process ({exc}); try again when it is done")
        if isinstance(exc, sqlite3.OperationalError):
            if self.readonly and code in (_SQLITE_READONLY, _SQLITE_CANTOPEN) and not self._immutable \
                    and not os.access(self.path.parent, os.W_OK):
                return _NeedsImmutable(exc)
            return GalleryError(f"cannot open gallery {self.path}: {exc}")
        return GalleryError(f"{self.path} is not a gallery file ({exc})")

    def _prepare(self, conn: sqlite3.Connection) -> None:
        try:
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA secure_delete = ON")
            # Reading the header is the first real access: a JPEG or text file fails here.
            application_id = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise self._open_error(exc) from None
        if application_id != APPLICATION_ID and (application_id != 0 or tables or version):
            raise GalleryError(f"{self.path} is an SQLite database but not a streamer gallery")
        if version > SCHEMA_VERSION:
            raise GalleryError(
                f"gallery {self.path} has schema version {version}; this streamer reads up to {SCHEMA_VERSION}"
            )
        if self.readonly:
            if 1 <= version < SCHEMA_VERSION and not self._immutable and os.access(self.path, os.W_OK) \
                    and os.access(self.path.parent, os.W_OK):
                # A gallery from an older streamer, opened by `run`, `find` or `list`: upgrade it once (the
                # steps add tables and columns, no vector is rewritten) rather than refuse every reader.
                Gallery(self.path, create=False).close()
                version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version < SCHEMA_VERSION:
                raise GalleryError(
                    f"gallery {self.path} is empty or was written by an older streamer (schema {version}) and "
                    f"cannot be upgraded by this user: run `streamer gallery list --gallery {self.path}` once "
                    "as a user who may write it"
                )
        else:
            try:
                conn.execute("PRAGMA journal_mode = DELETE").fetchall()
            except sqlite3.Error as exc:
                raise self._open_error(exc) from None
            if version < SCHEMA_VERSION:
                self._migrate(conn, version)
        try:
            self._data_version = int(conn.execute("PRAGMA data_version").fetchone()[0])
        except sqlite3.Error as exc:
            raise self._open_error(exc) from None

    def _migrate(self, conn: sqlite3.Connection, version: int) -> None:
        with self._transaction(conn):
            for step in range(version, SCHEMA_VERSION):
                log.info("gallery %s: migrating schema %d -> %d", self.path, step, step + 1)
                MIGRATIONS[step](conn)
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def busy_timeout_s(self) -> float:
        return self._busy_timeout_s

    @busy_timeout_s.setter
    def busy_timeout_s(self, seconds: float) -> None:
        """Applies to the open connection and to any reopened later."""
        with self._lock:
            self._busy_timeout_s = float(seconds)
            self._conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_s * 1000)}")

    def refresh(self) -> tuple[int, int]:
        """Follow the path, then return a token that changes whenever what this Gallery reads may have.

        A file replaced under the same path (another inode; for an immutable open also another size or
        mtime) is reopened, and the old connection closed; if the new file cannot be opened the old one
        stays in use and GalleryError says why. GalleryError too while another process holds the file
        locked for longer than `busy_timeout_s`.
        """
        with self._lock:
            self._follow_path()
            try:
                version = int(self._conn.execute("PRAGMA data_version").fetchone()[0])
            except sqlite3.Error as exc:
                raise self._read_error(exc) from None
            if version != self._data_version:
                self._matrices.clear()
                self._data_version = version
            return self._generation, version

    def _follow_path(self) -> None:
        now = _file_id(self.path)
        if now is None:
            raise GalleryError(f"gallery {self.path} no longer exists (moved or deleted)")
        if now[:2] == self._file[:2] and not (self._immutable and now != self._file):
            return
        immutable = self._immutable
        try:
            conn, file = self._open(create=False)
        except BaseException:
            self._immutable = immutable
            raise
        old, self._conn, self._file = self._conn, conn, file
        old.close()
        self._matrices.clear()
        self._generation += 1
        log.info("gallery %s: the file was replaced; reopened it", self.path)

    # ---------------------------------------------------------------- plumbing

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: commit on success, roll back (file unchanged) on any error."""
        if self.readonly:
            raise GalleryError(f"gallery {self.path} is open read-only")
        with self._lock:
            # A file rebuilt by another writer's `remove` (or swapped in by hand) is the gallery now:
            # writing to the one still open would be lost.
            self._follow_path()
            try:
                with self._transaction(self._conn) as conn:
                    yield conn
            finally:
                self._matrices.clear()
                self._generation += 1  # data_version only counts other connections' commits

    @contextmanager
    def _transaction(self, conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
        try:
            conn.execute("BEGIN IMMEDIATE")
            if conn is self._conn and (_file_id(self.path) or (0, 0))[:2] != self._file[:2]:
                # Renamed while we waited for the lock (another writer's rebuild): write to the new file.
                conn.execute("ROLLBACK")
                self._follow_path()
                conn = self._conn
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

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return self._conn.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise self._read_error(exc) from None

    def _read_error(self, exc: sqlite3.Error) -> GalleryError:
        if _primary_code(exc) in (_SQLITE_BUSY, _SQLITE_LOCKED):
            return GalleryError(f"cannot read gallery {self.path}: locked by another process ({exc})")
        return GalleryError(f"cannot read gallery {self.path}: {exc}")

    def close(self) -> None:
        was_closed, self._closed = self._closed, True
        if self.readonly and not was_closed:
            try:
                self._conn.interrupt()  # a long read on another thread (a matcher's reload) ends now
            except sqlite3.Error:
                pass
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
        hashes: Sequence[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Person:
        """Enrol `embeddings` (N, D) for `name`, creating the person if new; all-or-nothing.

        `sources` holds one file name per row (kept for listings; never the image), `hashes` one sha256 of
        each row's source (rows already stored under that hash are skipped). `metadata` is merged into the
        person's JSON metadata.
        """
        return self.add_many([(name, embeddings, sources, hashes)], embedder_id, metadata=metadata)[0]

    def add_many(
        self,
        entries: Sequence[tuple[Any, ...]],
        embedder_id: str,
        *,
        metadata: Mapping[str, Any] | None = None,
    ) -> list[Person]:
        """Enrol several people (a folder import) in ONE transaction: either every entry lands or none does.

        Each entry is (name, embeddings, sources[, hashes]); see `enrol`. Returns one Person per entry.
        """
        return [e.person for e in self.enrol(entries, embedder_id, metadata=metadata)]

    def enrol(
        self,
        entries: Sequence[tuple[Any, ...]],
        embedder_id: str,
        *,
        metadata: Mapping[str, Any] | None = None,
    ) -> list[Enrolled]:
        """Enrol several people in ONE transaction: either every entry lands or none does.

        Each entry is (name, embeddings (N, D), sources or None[, hashes or None]): one file name per row
        (kept for listings; never the image) and one sha256 of each row's source content. A row whose hash
        is already stored for that person and embedder (or repeats within the call) is skipped and reported
        in `Enrolled.duplicates`, so re-importing the same photos adds nothing. Bad shapes, dtypes or values
        raise ValueError and bad names GalleryError, all before the file is touched.
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
            self._check_dim(conn, embedder_id, dims)
            done = []
            for entry in checked:
                person_id, added, duplicates = Gallery._insert(conn, entry, embedder_id, now, meta_json)
                done.append(Enrolled(self._person(conn, person_id), added, duplicates))
            return done

    def _check_dim(self, conn: sqlite3.Connection, embedder_id: str, dims: set[int]) -> None:
        stored = self._embedder_dim(conn, embedder_id)
        if stored is not None and stored not in dims:
            raise GalleryError(
                f"gallery holds {stored}-D embeddings for embedder {embedder_id!r}, "
                f"refusing {dims.pop()}-D ones (a different model under the same id?)"
            )

    @staticmethod
    def _embedder_dim(conn: sqlite3.Connection, embedder_id: str) -> int | None:
        row = conn.execute("SELECT dim FROM faces WHERE embedder_id = ? LIMIT 1", (embedder_id,)).fetchone()
        if row is None:
            row = conn.execute("SELECT dim FROM negatives WHERE embedder_id = ? LIMIT 1", (embedder_id,)).fetchone()
        return None if row is None else int(row[0])

    @staticmethod
    def _insert_rows(conn: sqlite3.Connection, table: str, person_id: int, entry: _Entry, embedder_id: str,
                     now: str) -> tuple[int, tuple[str | None, ...]]:
        """Insert one entry's rows into `faces` or `negatives`; (rows added, sources of duplicates)."""
        dim = entry.vectors.shape[1]
        added, duplicates = 0, []
        for row, source, digest in zip(entry.vectors, entry.sources, entry.hashes):
            cursor = conn.execute(
                f"INSERT OR IGNORE INTO {table} (person_id, embedder_id, dim, vector, source, sha256, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (person_id, embedder_id, dim, row.tobytes(), source, digest, now),
            )
            if cursor.rowcount:
                added += 1
            else:
                duplicates.append(source)
        return added, tuple(duplicates)

    @staticmethod
    def _insert(
        conn: sqlite3.Connection, entry: _Entry, embedder_id: str, now: str, meta_json: str | None
    ) -> tuple[int, int, tuple[str | None, ...]]:
        conn.execute(
            "INSERT INTO people (name, created_at, metadata) VALUES (?, ?, coalesce(?, '{}')) "
            "ON CONFLICT (name) DO UPDATE SET metadata = json_patch(metadata, coalesce(?, '{}'))",
            (entry.name, now, meta_json, meta_json),
        )
        person_id = int(conn.execute("SELECT id FROM people WHERE name = ?", (entry.name,)).fetchone()[0])
        added, duplicates = Gallery._insert_rows(conn, "faces", person_id, entry, embedder_id, now)
        return person_id, added, duplicates

    def reject(
        self,
        name: str,
        embeddings: np.ndarray,
        embedder_id: str,
        sources: Sequence[str] | None = None,
        hashes: Sequence[str] | None = None,
    ) -> Enrolled:
        """Record faces that are NOT `name` (negative examples); the person must be enrolled already.

        A matcher then never names this person for a face nearer to these than to the person's own faces.
        Duplicates (same sha256) are skipped as in `enrol`; `Enrolled.added` counts the negatives added.
        """
        embedder_id = _check_embedder_id(embedder_id)
        entry = _check_entry(name, embeddings, sources, hashes)
        with self._write() as conn:
            row = conn.execute("SELECT id FROM people WHERE name = ?", (entry.name,)).fetchone()
            if row is None:
                raise GalleryError(
                    f"no person named {entry.name!r} in gallery {self.path}: enrol them before rejecting faces"
                )
            self._check_dim(conn, embedder_id, {entry.vectors.shape[1]})
            added, duplicates = self._insert_rows(conn, "negatives", int(row[0]), entry, embedder_id, _now())
            return Enrolled(self._person(conn, int(row[0])), added, duplicates)

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
        """Delete a person and erase their vectors (faces and negative examples) from the file; returns how
        many faces were erased."""
        cleaned = clean_name(name)
        with self._write() as conn:
            row = conn.execute(
                "SELECT p.id, (SELECT count(*) FROM faces f WHERE f.person_id = p.id), "
                "(SELECT count(*) FROM negatives n WHERE n.person_id = p.id) FROM people p WHERE p.name = ?",
                (cleaned,),
            ).fetchone()
            if row is None:
                raise GalleryError(f"no person named {cleaned!r} in gallery {self.path}")
            # Faces and negatives go by ON DELETE CASCADE.
            conn.execute("DELETE FROM people WHERE id = ?", (row[0],))
        self._vacuum()
        log.info("gallery %s: removed %r and erased %d embeddings and %d negative examples", self.path, cleaned,
                 row[1], row[2])
        return int(row[1])

    def _vacuum(self) -> None:
        """Rebuild the file from its live content only.

        secure_delete already zeroed the freed cells; rebuilding also drops the freed pages and any
        fragments left in unused page space, so nothing of the person survives in the file. The copy is
        made while a second connection holds the write lock (other writers wait, readers do not) and then
        renamed over the file; writers that waited notice the rename (see `_write`) and use the new file.
        """
        with self._lock:
            target = self.path.resolve()  # a symlinked gallery keeps its link
            try:
                if os.stat(target).st_nlink > 1:  # a rename would split the hard links: rebuild in place
                    self._conn.execute("VACUUM")
                    return
            except (OSError, sqlite3.Error) as exc:
                raise GalleryError(f"gallery {self.path}: removed, but VACUUM failed: {exc}") from None
            fresh = target.with_name(f".{target.name}.vacuum-{os.getpid()}")
            guard = self._connect(create=False)
            try:
                guard.execute("BEGIN IMMEDIATE")
                if (_file_id(self.path) or (0, 0))[:2] != self._file[:2]:
                    raise GalleryError(f"gallery {self.path}: removed, but the file was replaced meanwhile")
                fresh.unlink(missing_ok=True)
                self._conn.execute("VACUUM INTO ?", (str(fresh),))
                st = os.stat(target)
                os.chmod(fresh, st.st_mode & 0o7777)
                if os.geteuid() == 0:
                    os.chown(fresh, st.st_uid, st.st_gid)
                with open(fresh, "rb+") as f:
                    os.fsync(f.fileno())
                os.replace(fresh, target)
                _fsync_dir(target.parent)
            except (OSError, sqlite3.Error) as exc:
                raise GalleryError(f"gallery {self.path}: removed, but rebuilding the file failed: {exc}") from None
            finally:
                fresh.unlink(missing_ok=True)
                if guard.in_transaction:
                    guard.execute("ROLLBACK")
                guard.close()
            self._follow_path()

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
        negatives = dict(self._read(
            "SELECT p.name, count(*) FROM people p JOIN negatives n ON n.person_id = p.id "
            "WHERE ?1 IS NULL OR n.embedder_id = ?1 GROUP BY p.id",
            (embedder_id,),
        ))
        # Grouped here rather than with group_concat, which would split ids that contain its separator.
        per_person: dict[str, dict[str, int]] = {}
        for name, eid, count in rows:
            ids = per_person.setdefault(name, {})
            if eid is not None:
                ids[eid] = int(count)
        return [
            PersonSummary(name, sum(ids.values()), tuple(ids), int(negatives.get(name, 0)))
            for name, ids in per_person.items()
            if embedder_id is None or ids
        ]

    def embedders(self) -> dict[str, int]:
        """Embedder ids present in the gallery and their vector dimension."""
        return {eid: int(dim) for eid, dim in self._read("SELECT DISTINCT embedder_id, dim FROM faces")}

    def __len__(self) -> int:
        return int(self._read("SELECT count(*) FROM people")[0][0])

    def names(self) -> frozenset[str]:
        """Everyone enrolled, by name only: a quick read even for a large gallery (the name index alone)."""
        with self._lock:
            self.refresh()
            return frozenset(r[0] for r in self._read("SELECT name FROM people"))

    def __contains__(self, name: object) -> bool:
        try:
            cleaned = clean_name(name)
        except GalleryError:
            return False
        return bool(self._read("SELECT 1 FROM people WHERE name = ?", (cleaned,)))

    def matrix(self, embedder_id: str) -> tuple[list[str], np.ndarray]:
        """Every face of one embedder: (names, one per row; vectors (M, D) float32, read-only).

        Rows are grouped by person (sorted by name). Cached until this object or any other connection
        (another Gallery, another process) changes the file, or the file is replaced; the returned objects
        are the cached ones, so an unchanged identity means an unchanged gallery. Empty gallery: ([], (0, 0)).
        """
        with self._lock:
            self.refresh()
            cached = self._matrices.get(embedder_id)
            if cached is not None:
                return cached
            snapshot = self.snapshot(embedder_id)
            vectors = snapshot.vectors
            vectors.setflags(write=False)  # the cache is shared: nobody may edit it in place
            result = (snapshot.names, vectors)
            self._matrices[embedder_id] = result
            return result

    def snapshot(self, embedder_id: str) -> Snapshot:
        """Every face of one embedder, fresh (never cached) and consistent (one read transaction).

        Built to be called off the hot path on large galleries: rows are copied in small steps, so a
        thread that loads 500k faces leaves the others running, and nothing is sorted but by index.
        """
        with self._lock:
            self.refresh()
            conn = self._conn
            cursor = None
            try:
                conn.execute("BEGIN")  # DEFERRED: a shared lock, for a consistent count, rows and version
                version = int(conn.execute("PRAGMA data_version").fetchone()[0])
                # CROSS JOIN fixes the join order: people by the name index, then each one's faces by
                # index, so rows arrive grouped and in name order without a sort of the vectors. The
                # groups come from the two indexes alone; the vector rows then carry nothing else.
                groups = conn.execute(
                    "SELECT p.name, count(*) FROM people p CROSS JOIN faces f ON f.person_id = p.id "
                    "WHERE f.embedder_id = ? GROUP BY p.name ORDER BY p.name",
                    (embedder_id,),
                ).fetchall()
                dim = self._embedder_dim(conn, embedder_id)
                if not groups or dim is None:
                    empty = np.zeros((0, 0), dtype=np.float32)
                    return Snapshot((self._generation, version), (), np.zeros(0, np.intp), empty)
                sizes = np.fromiter((n for _, n in groups), dtype=np.intp, count=len(groups))
                starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.intp)
                count = int(sizes.sum())
                vectors = np.empty((count, int(dim)), dtype=np.float32)
                # Each blob straight into its row: no joined copy of the whole chunk on the way.
                out, step, row = memoryview(vectors).cast("B"), 4 * int(dim), 0
                cursor = conn.execute(
                    "SELECT f.vector FROM people p CROSS JOIN faces f ON f.person_id = p.id "
                    "WHERE f.embedder_id = ? ORDER BY p.name, f.id",
                    (embedder_id,),
                )
                while chunk := cursor.fetchmany(_CHUNK_ROWS):
                    if row + len(chunk) > count:
                        raise GalleryError(f"gallery {self.path} changed during a read (more rows than counted)")
                    try:
                        for (blob,) in chunk:
                            out[row * step:(row + 1) * step] = blob
                            row += 1
                    except ValueError:  # a blob of another length
                        raise GalleryError(
                            f"gallery {self.path}: embedder {embedder_id!r} has vectors of mixed length"
                        ) from None
                if row != count:
                    raise GalleryError(f"gallery {self.path} changed during a read (fewer rows than counted)")
                negative_people, negative_starts, negatives = self._negatives(conn, embedder_id, int(dim))
                return Snapshot((self._generation, version), tuple(name for name, _ in groups), starts, vectors,
                                negative_people, negative_starts, negatives)
            except sqlite3.Error as exc:
                raise self._read_error(exc) from None
            finally:
                if cursor is not None:
                    cursor.close()
                if not self._closed and conn.in_transaction:
                    try:
                        conn.execute("COMMIT")  # ends the read; nothing was written
                    except sqlite3.Error:
                        pass


    def _negatives(self, conn: sqlite3.Connection, embedder_id: str,
                   dim: int) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
        """Negative examples of one embedder grouped by person (name order), inside the snapshot's read.
        Few per person, so read in one go."""
        rows = conn.execute(
            "SELECT p.name, n.vector FROM people p CROSS JOIN negatives n ON n.person_id = p.id "
            "WHERE n.embedder_id = ? ORDER BY p.name, n.id",
            (embedder_id,),
        ).fetchall()
        if not rows:
            return (), np.zeros(0, np.intp), np.zeros((0, dim), np.float32)
        if any(len(blob) != 4 * dim for _, blob in rows):
            raise GalleryError(f"gallery {self.path}: embedder {embedder_id!r} has vectors of mixed length")
        vectors = np.frombuffer(b"".join(blob for _, blob in rows), dtype=np.float32).reshape(len(rows), dim).copy()
        people, starts = [], []
        for i, (name, _) in enumerate(rows):
            if not people or people[-1] != name:
                people.append(name)
                starts.append(i)
        return tuple(people), np.asarray(starts, dtype=np.intp), vectors


class _NeedsImmutable(GalleryError):
    """mode=ro could not read the file in a read-only directory; carries SQLite's reason."""

    def __init__(self, cause: sqlite3.Error) -> None:
        super().__init__(str(cause))
        self.cause = cause


__all__ = [
    "Enrolled", "Gallery", "GalleryError", "Person", "PersonSummary", "Snapshot", "clean_name", "APPLICATION_ID", "SCHEMA_VERSION",
]
