"""A gallery shared by many hosts: the same people and embeddings as `Gallery`, in one PostgreSQL database.

Same interface, same semantics and error messages as the SQLite `Gallery` (streamer.match.gallery); the
differences are where the data lives and how changes travel:

- Every write is one transaction that also bumps a generation counter (the `meta` row `generation`) and
  sends `NOTIFY streamer_gallery` with the new generation; notifications are delivered at commit. Each
  PgGallery keeps a second connection that LISTENs, and `refresh()` only drains that connection without
  blocking (no round trip, no query) so the Matcher's 0.25 s poll sees another host's enrolment or
  removal at its next tick. When the LISTEN connection is lost the counter row is read instead, until it
  is back; nothing sent meanwhile can be missed because the counter, not the notifications, is the truth.
- Each host keeps its own in-memory matrix (`snapshot`/`matrix`), read in one REPEATABLE READ transaction.
- `remove` deletes the person's rows (faces and negatives go by ON DELETE CASCADE) and then runs
  `VACUUM FULL` on the tables, which writes each into a fresh file and unlinks the old one: the dead tuples
  that still hold the vector's bytes after a DELETE are gone from the table's (and its TOAST table's)
  files. Vectors are stored uncompressed (STORAGE EXTERNAL) so that nothing about them is hidden from such
  a check. Out of reach, as blocks freed by a file system are for SQLite: the write-ahead log until its
  segments are recycled, and base backups or replicas; use encrypted storage and short WAL retention.
  VACUUM FULL holds an exclusive lock on each table while it runs: other hosts' reloads wait for it
  (milliseconds at thousands of faces, seconds at hundreds of thousands), matching never does.
- A hostile or broken server gets an error, never a hang: a connect timeout, a statement timeout and a
  lock timeout on every connection, TCP keepalives, and a `GalleryError` of one line with the remedy.
  The URL's password never appears in a message or a log line (`path` is the URL without it).

Tables live in their own schema (`streamer`), so a database shared with other applications is fine; the
schema is made on first use with create=True, versioned by the `meta` row `schema_version`.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

import numpy as np

from streamer.errors import GalleryError
from streamer.match.gallery import (
    Enrolled,
    Person,
    PersonSummary,
    Snapshot,
    _check_embedder_id,
    _check_entry,
    _Entry,
    clean_name,
)

log = logging.getLogger(__name__)

SCHEMA = "streamer"
SCHEMA_VERSION = 1
CHANNEL = "streamer_gallery"
CONNECT_TIMEOUT_S = 5
STATEMENT_TIMEOUT_S = 60.0  # a snapshot of 500k faces reads well within this
LOCK_TIMEOUT_S = 5.0  # the SQLite gallery's busy timeout, here for row and table locks
VACUUM_TIMEOUT_S = 600.0
VACUUM_LOCK_TIMEOUT_S = 60.0
SCHEMES = ("postgresql://", "postgres://")
SECURE_SSLMODES = ("require", "verify-ca", "verify-full")
_APP = "streamer-gallery"

_SCHEMA_V1 = (
    f"CREATE TABLE {SCHEMA}.meta (key text PRIMARY KEY, value bigint NOT NULL)",
    f"""CREATE TABLE {SCHEMA}.people (
        id         bigserial PRIMARY KEY,
        name       text NOT NULL UNIQUE,
        created_at timestamptz NOT NULL,
        metadata   jsonb NOT NULL DEFAULT '{{}}'::jsonb
    )""",
    f"""CREATE TABLE {SCHEMA}.faces (
        id          bigserial PRIMARY KEY,
        person_id   bigint NOT NULL REFERENCES {SCHEMA}.people(id) ON DELETE CASCADE,
        embedder_id text NOT NULL,
        dim         integer NOT NULL CHECK (dim > 0),
        vector      bytea NOT NULL CHECK (length(vector) = 4 * dim),
        source      text,
        sha256      text,
        created_at  timestamptz NOT NULL
    )""",
    f"CREATE INDEX faces_by_embedder ON {SCHEMA}.faces (embedder_id, person_id)",
    f"CREATE INDEX faces_by_person ON {SCHEMA}.faces (person_id)",
    f"CREATE UNIQUE INDEX faces_by_hash ON {SCHEMA}.faces (person_id, embedder_id, sha256) WHERE sha256 IS NOT NULL",
    f"""CREATE TABLE {SCHEMA}.negatives (
        id          bigserial PRIMARY KEY,
        person_id   bigint NOT NULL REFERENCES {SCHEMA}.people(id) ON DELETE CASCADE,
        embedder_id text NOT NULL,
        dim         integer NOT NULL CHECK (dim > 0),
        vector      bytea NOT NULL CHECK (length(vector) = 4 * dim),
        source      text,
        sha256      text,
        created_at  timestamptz NOT NULL
    )""",
    f"CREATE INDEX negatives_by_embedder ON {SCHEMA}.negatives (embedder_id, person_id)",
    f"CREATE INDEX negatives_by_person ON {SCHEMA}.negatives (person_id)",
    (f"CREATE UNIQUE INDEX negatives_by_hash ON {SCHEMA}.negatives (person_id, embedder_id, sha256) "
     "WHERE sha256 IS NOT NULL"),
    # Uncompressed, so a vector is either in the files byte for byte or not at all (see the docstring).
    f"ALTER TABLE {SCHEMA}.faces ALTER COLUMN vector SET STORAGE EXTERNAL",
    f"ALTER TABLE {SCHEMA}.negatives ALTER COLUMN vector SET STORAGE EXTERNAL",
    f"INSERT INTO {SCHEMA}.meta VALUES ('generation', 0)",
)

# MIGRATIONS[v] upgrades the schema from version v to v + 1 inside the open transaction (0: none yet).
MIGRATIONS: dict[int, tuple[str, ...]] = {0: _SCHEMA_V1}


def is_url(location: object) -> bool:
    return isinstance(location, str) and location.lower().startswith(SCHEMES)


def _secret(url: object) -> str:
    value = url.get_secret_value() if hasattr(url, "get_secret_value") else url
    if not isinstance(value, str):
        raise GalleryError(f"gallery URL: expected text, got {type(value).__name__}")
    return value


def _is_local(host: str) -> bool:
    if not host or host.startswith(("/", "@")) or host == "localhost":
        return True  # a Unix socket (or libpq's default, which is one)
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_url(url: object, setting: str = "gallery.url") -> dict[str, str]:
    """The URL's connection parameters; GalleryError (never echoing the password) when it is not a
    PostgreSQL URL, or names a server beyond loopback without TLS (sslmode require or verify-full)."""
    from psycopg import conninfo

    text = _secret(url)
    if not is_url(text):
        raise GalleryError(f"{setting}: expected a postgresql://USER@HOST/DB URL")
    try:
        params = conninfo.conninfo_to_dict(text)
    except Exception:  # noqa: BLE001 - libpq's parse message quotes the URL, password included
        raise GalleryError(f"{setting}: not a valid PostgreSQL URL (postgresql://USER:PASSWORD@HOST:PORT/DB)") from None
    params = {k: str(v) for k, v in params.items() if v is not None}
    for port in params.get("port", "5432").split(","):
        if not (port.isdigit() and 0 < int(port) < 65536):
            raise GalleryError(f"{setting}: port {port[:20]!r} is not a number from 1 to 65535")
    hosts = params.get("hostaddr") or params.get("host") or os.environ.get("PGHOST", "")
    sslmode = params.get("sslmode") or os.environ.get("PGSSLMODE", "prefer")
    remote = [h for h in hosts.split(",") if not _is_local(h)]
    if remote and sslmode not in SECURE_SSLMODES:
        raise GalleryError(
            f"{setting}: server {remote[0]} is beyond loopback, so faces would cross the network: use TLS, "
            "add ?sslmode=verify-full (or sslmode=require) to the URL"
        )
    return params


def redact(url: object) -> str:
    """The URL as shown in messages and logs: user, host, port and database, never the password."""
    try:
        params = parse_url(url)
    except GalleryError:
        return "postgresql://(unparsable URL)"
    user = params.get("user", "")
    host = params.get("host") or params.get("hostaddr") or ""
    port = params.get("port", "")
    where = f"{user}@" if user else ""
    where += f"[{host}]" if ":" in host and "," not in host else host
    where += f":{port}" if port else ""
    return f"postgresql://{where}/{params.get('dbname', '')}"


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # libpq: 'connection failed: connection to server at "h" (h), port p failed: REASON' then hints
    return lines[0] if lines else text


class PgGallery:
    """People and their embeddings in a PostgreSQL database (see the module docstring).

    url:      postgresql://USER[:PASSWORD]@HOST[:PORT]/DB[?sslmode=...] (a str or a pydantic SecretStr);
              the password may also come from PGPASSWORD or ~/.pgpass, libpq's own ways
    create:   make the schema when the database has none yet (else that is a GalleryError)
    readonly: never write (read-only transactions); every write raises GalleryError

    Safe to share between threads (one connection behind a lock, one more for LISTEN).
    """

    def __init__(self, url: object, *, create: bool = True, readonly: bool = False,
                 busy_timeout_s: float = LOCK_TIMEOUT_S, connect_timeout_s: float = CONNECT_TIMEOUT_S,
                 statement_timeout_s: float = STATEMENT_TIMEOUT_S) -> None:
        self._url = _secret(url)
        self._params = parse_url(self._url)
        self.path = redact(self._url)  # what messages call it: `gallery {path}` as for a file
        self.readonly = readonly
        self._busy_timeout_s = float(busy_timeout_s)
        self._connect_timeout_s = max(2, round(connect_timeout_s))  # libpq: whole seconds, at least 2
        self._statement_timeout_s = float(statement_timeout_s)
        self._lock = threading.RLock()
        self._matrices: dict[str, tuple[list[str], np.ndarray]] = {}
        self._closed = False
        self._listen = None
        self._listen_failed = False
        self._conn = self._connect()
        try:
            self._prepare(create=create and not readonly)
            self._start_listening()  # before reading the counter, so no change in between is missed
            self._generation = self._read_generation()
        except BaseException:
            self._conn.close()
            if self._listen is not None:
                self._listen.close()
            raise

    # ----------------------------------------------------------------- opening

    def _connect(self, *, autocommit: bool = True):
        import psycopg

        options = (f"-c statement_timeout={int(self._statement_timeout_s * 1000)} "
                   f"-c lock_timeout={int(self._busy_timeout_s * 1000)} "
                   "-c idle_in_transaction_session_timeout=60000")
        if self.readonly:
            options += " -c default_transaction_read_only=on"
        try:
            return psycopg.connect(
                self._url, autocommit=autocommit, connect_timeout=self._connect_timeout_s, options=options,
                application_name=_APP, keepalives=1, keepalives_idle=10, keepalives_interval=5, keepalives_count=3,
                tcp_user_timeout=int(self._statement_timeout_s * 1000),
            )
        except psycopg.Error as exc:
            raise self._connect_error(exc) from None

    def _connect_error(self, exc: BaseException) -> GalleryError:
        reason = _first_line(exc).removeprefix("connection failed: ")
        lowered = reason.lower()
        user = self._params.get("user", "")
        if "password authentication failed" in lowered or "no password supplied" in lowered \
                or "sasl" in lowered or "authentication failed" in lowered:
            return GalleryError(
                f"gallery {self.path}: the server refused user {user!r} ({reason.rsplit(':', 1)[-1].strip()}): "
                "check the user and password (in the URL, PGPASSWORD or ~/.pgpass)"
            )
        if "does not exist" in lowered and "database" in lowered:
            return GalleryError(
                f"gallery {self.path}: database {self._params.get('dbname', '')!r} does not exist: create it "
                "(createdb) or fix the URL"
            )
        if "timeout" in lowered or "timed out" in lowered:
            return GalleryError(
                f"gallery {self.path}: the server did not answer within {self._connect_timeout_s} s: "
                "is PostgreSQL running there and reachable?"
            )
        return GalleryError(f"cannot connect to gallery {self.path} ({reason}): is PostgreSQL running there?")

    def _error(self, exc: BaseException, doing: str = "read") -> GalleryError:
        import psycopg

        if isinstance(exc, psycopg.errors.QueryCanceled):
            return GalleryError(f"cannot {doing} gallery {self.path}: the server took too long ({_first_line(exc)})")
        if isinstance(exc, psycopg.errors.LockNotAvailable):
            return GalleryError(f"cannot {doing} gallery {self.path}: locked by another host ({_first_line(exc)}); "
                                "try again when it is done")
        if isinstance(exc, psycopg.errors.ReadOnlySqlTransaction):
            return GalleryError(f"gallery {self.path} is open read-only")
        if isinstance(exc, psycopg.errors.InsufficientPrivilege):
            return GalleryError(f"cannot {doing} gallery {self.path}: {_first_line(exc)}: grant the user access "
                                f"to schema {SCHEMA} (or connect as its owner)")
        if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
            return GalleryError(f"cannot {doing} gallery {self.path}: lost the server ({_first_line(exc)}); "
                                "is PostgreSQL running there?")
        return GalleryError(f"cannot {doing} gallery {self.path}: {_first_line(exc)}")

    def _reconnect_if_broken(self) -> None:
        if self._conn.closed or self._conn.broken:
            old, self._conn = self._conn, self._connect()
            try:
                old.close()
            except Exception:  # noqa: BLE001 - already broken
                pass

    def _schema_version(self, conn) -> int | None:
        if conn.execute("SELECT to_regclass(%s)", (f"{SCHEMA}.meta",)).fetchone()[0] is None:
            return None
        row = conn.execute(f"SELECT value FROM {SCHEMA}.meta WHERE key = 'schema_version'").fetchone()
        return 0 if row is None else int(row[0])

    def _prepare(self, *, create: bool) -> None:
        import psycopg

        try:
            version = self._schema_version(self._conn)
            if version is not None and version > SCHEMA_VERSION:
                raise GalleryError(f"gallery {self.path} has schema version {version}; this streamer reads up "
                                   f"to {SCHEMA_VERSION}")
            if version == SCHEMA_VERSION:
                return
            if version is None and not create:
                how = ("enrol someone first (streamer gallery add NAME PHOTO --gallery URL)" if self.readonly
                       else "open it with create=True")
                raise GalleryError(f"gallery {self.path} holds no streamer gallery yet (no schema {SCHEMA}): {how}")
            if self.readonly:
                raise GalleryError(
                    f"gallery {self.path} was written by an older streamer (schema {version}): run `streamer "
                    "gallery list --gallery URL` once as a user who may write it"
                )
            with self._conn.transaction():
                # Two hosts creating the schema at once: the second waits here, then finds it made.
                self._conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"{SCHEMA}.migrate",))
                self._conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
                version = self._schema_version(self._conn) or 0
                for step in range(version, SCHEMA_VERSION):
                    log.info("gallery %s: migrating schema %d -> %d", self.path, step, step + 1)
                    for statement in MIGRATIONS[step]:
                        self._conn.execute(statement)
                self._conn.execute(
                    f"INSERT INTO {SCHEMA}.meta VALUES ('schema_version', %s) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (SCHEMA_VERSION,))
        except psycopg.Error as exc:
            raise self._error(exc, "open") from None

    def _read_generation(self) -> int:
        import psycopg

        with self._lock:
            try:
                self._reconnect_if_broken()
                return int(self._conn.execute(f"SELECT value FROM {SCHEMA}.meta WHERE key = 'generation'")
                           .fetchone()[0])
            except psycopg.Error as exc:
                raise self._error(exc) from None

    def _start_listening(self) -> None:
        """A second connection that LISTENs; None (refresh reads the counter instead) when it cannot."""
        if self._listen is not None:
            return
        import psycopg

        try:
            conn = self._connect()
            conn.execute(f"LISTEN {CHANNEL}")
        except (GalleryError, psycopg.Error) as exc:
            # Said once per outage; meanwhile refresh() reads the counter (or fails, and the matcher says so).
            if not self._listen_failed:
                log.warning("gallery %s: cannot listen for changes (%s); reading the generation counter instead",
                            self.path, _first_line(exc))
            self._listen_failed = True
            self._listen = None
            return
        if self._listen_failed:
            log.info("gallery %s: listening for changes again", self.path)
        self._listen_failed = False
        self._listen = conn

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def busy_timeout_s(self) -> float:
        return self._busy_timeout_s

    @busy_timeout_s.setter
    def busy_timeout_s(self, seconds: float) -> None:
        """How long a statement waits for another host's lock (PostgreSQL's lock_timeout)."""
        import psycopg

        with self._lock:
            self._busy_timeout_s = float(seconds)
            try:
                self._conn.execute(f"SET lock_timeout = {int(self._busy_timeout_s * 1000)}")
            except psycopg.Error as exc:
                raise self._error(exc) from None

    def refresh(self) -> tuple[int, int]:
        """A token that changes whenever what this gallery reads may have: (0, generation).

        Cheap when nothing changed: drains the LISTEN connection without waiting (no query sent). When the
        LISTEN connection is lost the counter is read from the server, and listening starts again.
        """
        import psycopg

        with self._lock:
            listen = self._listen
            if listen is not None:
                latest = None
                try:
                    for note in listen.notifies(timeout=0):
                        if note.payload.isdigit():
                            latest = max(latest or 0, int(note.payload))
                except psycopg.Error:
                    log.warning("gallery %s: lost the LISTEN connection; reconnecting", self.path)
                    try:
                        listen.close()
                    except Exception:  # noqa: BLE001 - already broken
                        pass
                    self._listen = listen = None
                else:
                    if latest is not None and latest > self._generation:
                        self._generation = latest
                        self._matrices.clear()
                    return 0, self._generation
            # LISTEN first, then read the counter: nothing committed in between can be missed. GalleryError
            # while the server is gone (a matcher then answers from its last copy and says it is stale).
            self._start_listening()
            latest = self._read_generation()
            if latest != self._generation:
                self._generation = latest
                self._matrices.clear()
            return 0, self._generation

    # ---------------------------------------------------------------- plumbing

    @contextmanager
    def _write(self) -> Iterator[Any]:
        """One write transaction that bumps the generation and notifies every listener at commit."""
        import psycopg

        if self.readonly:
            raise GalleryError(f"gallery {self.path} is open read-only")
        with self._lock:
            generation = None
            try:
                self._reconnect_if_broken()
                with self._conn.transaction():
                    yield self._conn
                    generation = int(self._conn.execute(
                        f"UPDATE {SCHEMA}.meta SET value = value + 1 WHERE key = 'generation' RETURNING value"
                    ).fetchone()[0])
                    self._conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(generation)))
            except psycopg.Error as exc:
                raise self._error(exc, "write") from None
            finally:
                self._matrices.clear()
                if generation is not None:
                    self._generation = max(self._generation, generation)

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        import psycopg

        with self._lock:
            try:
                self._reconnect_if_broken()
                return self._conn.execute(sql, params).fetchall()
            except psycopg.Error as exc:
                raise self._error(exc) from None

    def close(self) -> None:
        was_closed, self._closed = self._closed, True
        if not was_closed:
            try:
                self._conn.cancel_safe(timeout=1)  # a long read on another thread (a matcher's reload) ends now
            except Exception:  # noqa: BLE001 - nothing running, or the server is gone
                pass
        with self._lock:
            self._conn.close()
            self._matrices.clear()
            if self._listen is not None:
                self._listen.close()
                self._listen = None

    def __enter__(self) -> PgGallery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PgGallery({self.path!r}, readonly={self.readonly})"

    # ------------------------------------------------------------------ writes

    def add(self, name: str, embeddings: np.ndarray, embedder_id: str, sources: Sequence[str] | None = None, *,
            hashes: Sequence[str] | None = None, metadata: Mapping[str, Any] | None = None) -> Person:
        """As `Gallery.add`."""
        return self.add_many([(name, embeddings, sources, hashes)], embedder_id, metadata=metadata)[0]

    def add_many(self, entries: Sequence[tuple[Any, ...]], embedder_id: str, *,
                 metadata: Mapping[str, Any] | None = None) -> list[Person]:
        """As `Gallery.add_many`: one transaction, every entry or none."""
        return [e.person for e in self.enrol(entries, embedder_id, metadata=metadata)]

    def enrol(self, entries: Sequence[tuple[Any, ...]], embedder_id: str, *,
              metadata: Mapping[str, Any] | None = None) -> list[Enrolled]:
        """As `Gallery.enrol`: one transaction; rows whose sha256 is stored for that person and embedder
        (or repeats within the call) are skipped and reported. Metadata is merged key by key (jsonb ||)."""
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
            # A folder import of thousands of people: a few statements in all, not a few per person.
            names = list(dict.fromkeys(entry.name for entry in checked))
            people = {
                name: (int(pid), created_at, metadata)
                for pid, name, created_at, metadata in conn.execute(
                    f"INSERT INTO {SCHEMA}.people AS p (name, created_at, metadata) "
                    "SELECT n, %(now)s, coalesce(%(meta)s::jsonb, '{}'::jsonb) FROM unnest(%(names)s::text[]) AS n "
                    "ON CONFLICT (name) DO UPDATE SET metadata = p.metadata || coalesce(%(meta)s::jsonb, '{}'::jsonb) "
                    "RETURNING id, name, created_at, metadata",
                    {"now": now, "meta": meta_json, "names": names},
                ).fetchall()
            }
            faces = dict(conn.execute(
                f"SELECT person_id, count(*) FROM {SCHEMA}.faces WHERE person_id = ANY(%s) GROUP BY person_id",
                ([pid for pid, _, _ in people.values()],),
            ).fetchall())
            inserted = self._insert_many(conn, "faces", [(people[e.name][0], e) for e in checked], embedder_id, now)
            done = []
            for entry, (added, duplicates) in zip(checked, inserted):
                pid, created_at, metadata = people[entry.name]
                faces[pid] = faces.get(pid, 0) + added  # as after this entry, like one transaction per entry
                done.append(Enrolled(Person(pid, entry.name, created_at, int(faces[pid]), metadata), added,
                                     duplicates))
            return done

    def _check_dim(self, conn, embedder_id: str, dims: set[int]) -> None:
        stored = self._embedder_dim(conn, embedder_id)
        if stored is not None and stored not in dims:
            raise GalleryError(
                f"gallery holds {stored}-D embeddings for embedder {embedder_id!r}, "
                f"refusing {dims.pop()}-D ones (a different model under the same id?)"
            )

    @staticmethod
    def _embedder_dim(conn, embedder_id: str) -> int | None:
        row = conn.execute(
            f"SELECT dim FROM (SELECT dim FROM {SCHEMA}.faces WHERE embedder_id = %s LIMIT 1) f "
            f"UNION ALL SELECT dim FROM (SELECT dim FROM {SCHEMA}.negatives WHERE embedder_id = %s LIMIT 1) n LIMIT 1",
            (embedder_id, embedder_id),
        ).fetchone()
        return None if row is None else int(row[0])

    @staticmethod
    def _insert_many(conn, table: str, entries: Sequence[tuple[int, _Entry]], embedder_id: str,
                     now: datetime) -> list[tuple[int, tuple[str | None, ...]]]:
        """Insert the rows of (person id, entry) pairs into `faces` or `negatives`, one statement per row
        in one pipeline; per entry (rows added, sources of the duplicates skipped)."""
        rows = [(pid, embedder_id, entry.vectors.shape[1], vector.tobytes(), source, digest, now)
                for pid, entry in entries
                for vector, source, digest in zip(entry.vectors, entry.sources, entry.hashes)]
        cursor = conn.cursor()
        cursor.executemany(
            f"INSERT INTO {SCHEMA}.{table} (person_id, embedder_id, dim, vector, source, sha256, created_at) "
            "VALUES (%s, %s, %s, %b, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING id",
            rows, returning=True,
        )
        stored = []
        while True:
            stored.append(cursor.fetchone() is not None)
            if not cursor.nextset():
                break
        results, first = [], 0
        for _, entry in entries:
            mine = stored[first:first + len(entry.sources)]
            first += len(entry.sources)
            results.append((sum(mine), tuple(src for src, ok in zip(entry.sources, mine) if not ok)))
        return results

    def reject(self, name: str, embeddings: np.ndarray, embedder_id: str, sources: Sequence[str] | None = None,
               hashes: Sequence[str] | None = None) -> Enrolled:
        """As `Gallery.reject`: faces that are NOT `name`; the person must be enrolled already."""
        embedder_id = _check_embedder_id(embedder_id)
        entry = _check_entry(name, embeddings, sources, hashes)
        with self._write() as conn:
            row = conn.execute(f"SELECT id FROM {SCHEMA}.people WHERE name = %s", (entry.name,)).fetchone()
            if row is None:
                raise GalleryError(
                    f"no person named {entry.name!r} in gallery {self.path}: enrol them before rejecting faces"
                )
            self._check_dim(conn, embedder_id, {entry.vectors.shape[1]})
            [(added, duplicates)] = self._insert_many(conn, "negatives", [(int(row[0]), entry)], embedder_id, _now())
            return Enrolled(self._person(conn, int(row[0])), added, duplicates)

    def rename(self, old: str, new: str) -> Person:
        """Give a person a new name; the old name must exist and the new one must be free."""
        old_name, new_name = clean_name(old), clean_name(new)
        with self._write() as conn:
            row = conn.execute(f"SELECT id FROM {SCHEMA}.people WHERE name = %s FOR UPDATE", (old_name,)).fetchone()
            if row is None:
                raise GalleryError(f"no person named {old_name!r} in gallery {self.path}")
            if new_name != old_name:
                if conn.execute(f"SELECT 1 FROM {SCHEMA}.people WHERE name = %s", (new_name,)).fetchone():
                    raise GalleryError(f"cannot rename {old_name!r}: {new_name!r} already exists")
                conn.execute(f"UPDATE {SCHEMA}.people SET name = %s WHERE id = %s", (new_name, row[0]))
            return self._person(conn, row[0])

    def remove(self, name: str) -> int:
        """Delete a person and erase their vectors (faces and negative examples) from the tables' files;
        returns how many faces were erased. Other hosts stop matching them at the commit, before the VACUUM."""
        cleaned = clean_name(name)
        with self._write() as conn:
            row = conn.execute(
                f"SELECT p.id, (SELECT count(*) FROM {SCHEMA}.faces f WHERE f.person_id = p.id), "
                f"(SELECT count(*) FROM {SCHEMA}.negatives n WHERE n.person_id = p.id) "
                f"FROM {SCHEMA}.people p WHERE p.name = %s FOR UPDATE",
                (cleaned,),
            ).fetchone()
            if row is None:
                raise GalleryError(f"no person named {cleaned!r} in gallery {self.path}")
            conn.execute(f"DELETE FROM {SCHEMA}.people WHERE id = %s", (row[0],))  # faces, negatives: CASCADE
        self._vacuum()
        log.info("gallery %s: removed %r and erased %d embeddings and %d negative examples", self.path, cleaned,
                 row[1], row[2])
        return int(row[1])

    def _vacuum(self) -> None:
        """Rewrite the tables from their live rows only (a new file each; the old ones, holding the deleted
        tuples, are unlinked). VACUUM cannot run inside a transaction: this connection is in autocommit."""
        import psycopg

        with self._lock:
            try:
                # A rewrite may outlast the usual statement timeout at hundreds of thousands of faces, and its
                # exclusive lock waits for reloads under way (new ones queue behind it, so the wait is bounded).
                self._conn.execute(f"SET statement_timeout = {int(VACUUM_TIMEOUT_S * 1000)}")
                self._conn.execute(f"SET lock_timeout = {int(VACUUM_LOCK_TIMEOUT_S * 1000)}")
                for table in ("faces", "negatives", "people"):
                    self._conn.execute(f"VACUUM FULL {SCHEMA}.{table}")
            except psycopg.Error as exc:
                raise GalleryError(
                    f"gallery {self.path}: removed, but VACUUM failed ({_first_line(exc)}): the rows are gone but "
                    f"their bytes stay in the table files until `VACUUM FULL {SCHEMA}.faces` runs; run it"
                ) from None
            finally:
                try:
                    self._conn.execute(f"SET statement_timeout = {int(self._statement_timeout_s * 1000)}")
                    self._conn.execute(f"SET lock_timeout = {int(self._busy_timeout_s * 1000)}")
                except psycopg.Error:
                    log.debug("gallery %s: could not restore the timeouts after VACUUM", self.path)

    # ------------------------------------------------------------------- reads

    @staticmethod
    def _person(conn, person_id: int) -> Person:
        pid, name, created_at, metadata, faces = conn.execute(
            f"SELECT p.id, p.name, p.created_at, p.metadata, "
            f"(SELECT count(*) FROM {SCHEMA}.faces f WHERE f.person_id = p.id) FROM {SCHEMA}.people p WHERE p.id = %s",
            (person_id,),
        ).fetchone()
        return Person(int(pid), name, created_at, int(faces), metadata)

    def person(self, name: str) -> Person:
        """One person by name; GalleryError when unknown."""
        import psycopg

        cleaned = clean_name(name)
        with self._lock:
            row = self._read(f"SELECT id FROM {SCHEMA}.people WHERE name = %s", (cleaned,))
            if not row:
                raise GalleryError(f"no person named {cleaned!r} in gallery {self.path}")
            try:
                return self._person(self._conn, row[0][0])
            except psycopg.Error as exc:
                raise self._error(exc) from None

    def people(self, embedder_id: str | None = None) -> list[PersonSummary]:
        """Everyone, sorted by name; with `embedder_id`, only people with faces from it (and only those counted)."""
        rows = self._read(
            f"SELECT p.name, f.embedder_id, count(f.id) FROM {SCHEMA}.people p LEFT JOIN {SCHEMA}.faces f "
            "ON f.person_id = p.id AND (%(e)s::text IS NULL OR f.embedder_id = %(e)s) "
            "GROUP BY p.id, p.name, f.embedder_id ORDER BY p.name COLLATE \"C\", f.embedder_id COLLATE \"C\"",
            {"e": embedder_id},
        )
        negatives = dict(self._read(
            f"SELECT p.name, count(*) FROM {SCHEMA}.people p JOIN {SCHEMA}.negatives n ON n.person_id = p.id "
            "WHERE %(e)s::text IS NULL OR n.embedder_id = %(e)s GROUP BY p.id, p.name",
            {"e": embedder_id},
        ))
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
        return {eid: int(dim) for eid, dim in self._read(f"SELECT DISTINCT embedder_id, dim FROM {SCHEMA}.faces")}

    def __len__(self) -> int:
        return int(self._read(f"SELECT count(*) FROM {SCHEMA}.people")[0][0])

    def names(self) -> frozenset[str]:
        """Everyone enrolled, by name only."""
        with self._lock:
            self.refresh()
            return frozenset(r[0] for r in self._read(f"SELECT name FROM {SCHEMA}.people"))

    def __contains__(self, name: object) -> bool:
        try:
            cleaned = clean_name(name)
        except GalleryError:
            return False
        return bool(self._read(f"SELECT 1 FROM {SCHEMA}.people WHERE name = %s", (cleaned,)))

    def matrix(self, embedder_id: str) -> tuple[list[str], np.ndarray]:
        """As `Gallery.matrix`: every face of one embedder, cached until any host changes the gallery."""
        with self._lock:
            self.refresh()
            cached = self._matrices.get(embedder_id)
            if cached is not None:
                return cached
            snapshot = self.snapshot(embedder_id)
            vectors = snapshot.vectors
            vectors.setflags(write=False)
            result = (snapshot.names, vectors)
            self._matrices[embedder_id] = result
            return result

    def snapshot(self, embedder_id: str) -> Snapshot:
        """Every face of one embedder, fresh and consistent (one REPEATABLE READ transaction), grouped by
        person in name order (the byte order of the UTF-8 names, as SQLite sorts them).

        The server only scans: the faces come unsorted, in binary, and are grouped here with numpy, which
        at 100k faces is several times quicker than an ORDER BY of their vectors on the server."""
        import psycopg

        with self._lock:
            self.refresh()
            try:
                self._reconnect_if_broken()
                conn = self._conn
                with conn.transaction():
                    conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    generation = int(conn.execute(
                        f"SELECT value FROM {SCHEMA}.meta WHERE key = 'generation'").fetchone()[0])
                    dim = self._embedder_dim(conn, embedder_id)
                    empty = Snapshot((0, generation), (), np.zeros(0, np.intp), np.zeros((0, 0), dtype=np.float32))
                    if dim is None:
                        return empty
                    person_ids, faces, vectors = self._read_faces(conn, embedder_id, dim)
                    if not len(vectors):
                        return empty
                    people = conn.execute(f"SELECT id, name FROM {SCHEMA}.people").fetchall()
                    people.sort(key=lambda row: row[1])  # code point order = UTF-8 byte order = COLLATE "C"
                    ids = np.fromiter((pid for pid, _ in people), dtype=np.int64, count=len(people))
                    by_id = np.argsort(ids)  # by_id[j]: the name rank of the j-th smallest id
                    sorted_ids = ids[by_id]
                    where = np.searchsorted(sorted_ids, person_ids)
                    if not len(ids) or (where >= len(ids)).any() or (sorted_ids[np.minimum(where, len(ids) - 1)]
                                                                      != person_ids).any():
                        raise GalleryError(f"gallery {self.path} changed during a read (faces without a person)")
                    row_rank = by_id[where]
                    order = np.lexsort((faces, row_rank))  # by person (name order), then enrolment order
                    sizes = np.bincount(row_rank, minlength=len(ids))
                    shown = np.flatnonzero(sizes)  # people with faces of this embedder, still in name order
                    sizes = sizes[shown]
                    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.intp)
                    matrix = np.ascontiguousarray(vectors[order], dtype=np.float32)  # fresh, the caller's
                    negative_people, negative_starts, negatives = self._negatives(conn, embedder_id, int(dim))
                    return Snapshot((0, generation), tuple(people[k][1] for k in shown.tolist()), starts, matrix,
                                    negative_people, negative_starts, negatives)
            except psycopg.Error as exc:
                raise self._error(exc) from None

    def _read_faces(self, conn, embedder_id: str, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(person ids, face ids, (M, dim) vectors as stored) of one embedder, unsorted, in binary: the rows'
        bytes are joined once and read by numpy, not copied row by row."""
        with conn.cursor(binary=True) as cursor:
            cursor.execute(f"SELECT person_id, id, vector FROM {SCHEMA}.faces WHERE embedder_id = %s", (embedder_id,))
            rows = cursor.fetchall()
        if not rows:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
        persons, faces, blobs = zip(*rows)  # columns at C speed
        del rows
        if set(map(len, blobs)) != {4 * dim}:
            raise GalleryError(f"gallery {self.path}: embedder {embedder_id!r} has vectors of mixed length")
        vectors = np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(blobs), dim)
        return np.array(persons, dtype=np.int64), np.array(faces, dtype=np.int64), vectors

    def _negatives(self, conn, embedder_id: str,
                   dim: int) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
        rows = conn.execute(
            f"SELECT p.name, n.vector FROM {SCHEMA}.people p JOIN {SCHEMA}.negatives n ON n.person_id = p.id "
            "WHERE n.embedder_id = %s ORDER BY p.name COLLATE \"C\", n.id",
            (embedder_id,),
        ).fetchall()
        if not rows:
            return (), np.zeros(0, np.intp), np.zeros((0, dim), np.float32)
        if any(len(blob) != 4 * dim for _, blob in rows):
            raise GalleryError(f"gallery {self.path}: embedder {embedder_id!r} has vectors of mixed length")
        vectors = np.frombuffer(b"".join(bytes(blob) for _, blob in rows), dtype=np.float32).reshape(len(rows), dim).copy()
        people, starts = [], []
        for i, (name, _) in enumerate(rows):
            if not people or people[-1] != name:
                people.append(name)
                starts.append(i)
        return tuple(people), np.asarray(starts, dtype=np.intp), vectors


__all__ = ["CHANNEL", "SCHEMA", "SCHEMA_VERSION", "PgGallery", "is_url", "parse_url", "redact"]
