"""The shared PostgreSQL gallery against a throwaway cluster (tests/postgres.py): the SQLite gallery's
behaviours, propagation between two hosts through LISTEN/NOTIFY, erasure from the relation files, bounded
failures, and a real `streamer run` recognising someone enrolled with `--gallery postgresql://...`."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from postgres import cluster_fixture, database_fixture

from streamer.errors import ConfigError, GalleryError
from streamer.match.gallery import Gallery
from streamer.match.matcher import Matcher

psycopg = pytest.importorskip("psycopg")
from streamer.match.gallery_pg import PgGallery

REPO = Path(__file__).resolve().parents[1]
EMBEDDER = "dlib_resnet_v1"
DIM = 128
log = logging.getLogger(__name__)


cluster = pytest.fixture(scope="module", name="cluster")(cluster_fixture)
url = pytest.fixture(name="url")(database_fixture)


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _observe(gallery, vectors: np.ndarray) -> list:
    """One script of gallery calls; what each returned or raised, with the gallery's name taken out."""
    seen = []

    def note(call):
        try:
            value = call()
        except (GalleryError, ValueError) as exc:
            value = (type(exc).__name__, str(exc).replace(str(gallery.path), "<G>"))
        seen.append(value)

    def person(p):
        return (p.name, p.faces, dict(p.metadata))

    v = vectors
    note(lambda: [(person(e.person), e.added, e.duplicates) for e in gallery.enrol(
        [("Ada", v[:3], ["a1", "a2", "a1 again"], ["h1", "h2", "h1"]), ("Bob", v[3:5], ["b1", "b2"], None)],
        EMBEDDER, metadata={"team": "x"})])
    note(lambda: [(person(e.person), e.added, e.duplicates) for e in gallery.enrol(
        [("Ada", v[5:7], ["a2 again", "a3"], ["h2", "h3"])], EMBEDDER)])  # one duplicate of the stored h2
    note(lambda: person(gallery.add("  Cy\u0301  ", v[7:8], EMBEDDER, ["c1"])))  # NFC + trimmed
    note(lambda: [(person(e.person), e.added, e.duplicates) for e in gallery.enrol(  # one name twice in a call
        [("Eve", v[0:1], ["e1"], ["he"]), ("Eve", v[1:3], ["e2", "e3"], ["he", "he3"])], EMBEDDER, metadata={"k": 1})])
    note(lambda: gallery.enrol([("Dee", v[8:9, :64], None)], EMBEDDER))  # another dimension: refused
    note(lambda: gallery.enrol([("Dee", np.full((1, DIM), np.nan, np.float32), None)], EMBEDDER))
    note(lambda: gallery.enrol([("", v[:1], None)], EMBEDDER))
    note(lambda: [(e.added, e.duplicates) for e in [gallery.reject("Bob", v[9:11], EMBEDDER, ["n1", "n2"], ["x", "x"])]])
    note(lambda: gallery.reject("Nobody", v[9:10], EMBEDDER))
    note(lambda: gallery.people())
    note(lambda: gallery.people("other_embedder"))
    note(lambda: (len(gallery), "Ada" in gallery, "Zed" in gallery, 42 in gallery, sorted(gallery.names()),
                  gallery.embedders()))
    note(lambda: person(gallery.rename("Bob", "Robert")))
    note(lambda: gallery.rename("Robert", "Ada"))
    note(lambda: gallery.rename("Nobody", "X"))
    note(lambda: person(gallery.person("Robert")))
    note(lambda: gallery.person("Bob"))

    def snap():
        s = gallery.snapshot(EMBEDDER)
        return (s.people, s.starts.tolist(), s.vectors.tobytes(), s.names, s.negative_people,
                s.negative_starts.tolist(), s.negatives.tobytes())

    note(snap)
    note(lambda: gallery.matrix(EMBEDDER)[0])
    note(lambda: gallery.remove("Robert"))
    note(lambda: gallery.remove("Robert"))
    note(snap)
    note(lambda: gallery.people())
    note(lambda: gallery.snapshot("other_embedder").vectors.shape)
    return seen


def test_same_behaviour_as_the_sqlite_gallery(url, tmp_path):
    vectors = unit(np.random.default_rng(1), 12)
    with Gallery(tmp_path / "people.db") as sqlite, PgGallery(url, create=True) as pg:
        expected = _observe(sqlite, vectors)
        got = _observe(pg, vectors)
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected)):
        assert a == b, f"step {i}: PostgreSQL {repr(a)[:300]} != SQLite {repr(b)[:300]}"


def test_schema_readonly_and_versions(url):
    with pytest.raises(GalleryError, match="holds no streamer gallery yet.*streamer gallery add"):
        PgGallery(url, create=False, readonly=True)
    with PgGallery(url, create=True) as writer:
        writer.add("Ada", unit(np.random.default_rng(2), 2), EMBEDDER)
        with PgGallery(url, create=False, readonly=True) as reader:
            assert reader.names() == {"Ada"}
            for write in (lambda: reader.add("Bob", unit(np.random.default_rng(3), 1), EMBEDDER),
                          lambda: reader.remove("Ada"), lambda: reader.rename("Ada", "B")):
                with pytest.raises(GalleryError, match="is open read-only"):
                    write()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("UPDATE streamer.meta SET value = 99 WHERE key = 'schema_version'")
        with pytest.raises(GalleryError, match="schema version 99; this streamer reads up to 1"):
            PgGallery(url, create=False)
    # Two hosts creating the schema at once: both succeed, one schema.
    fresh = url.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(fresh, autocommit=True) as conn:
        conn.execute("CREATE DATABASE race")
    race = url.rsplit("/", 1)[0] + "/race"
    errors: list[BaseException] = []

    def make():
        try:
            PgGallery(race, create=True).close()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=make) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors


def _wait_for(matcher: Matcher, query: np.ndarray, expected: str | None, start: float,
              timeout_s: float = 5.0) -> float:
    """Seconds from `start` (just before the other host's write) until `matcher` answers `expected`."""
    while time.monotonic() - start < timeout_s:
        if matcher.match(query)[0].name == expected:
            return time.monotonic() - start
        time.sleep(0.005)
    pytest.fail(f"the other host's matcher did not see {expected!r} within {timeout_s} s")


def test_enrolment_and_removal_reach_another_host_within_a_second(url):
    rng = np.random.default_rng(4)
    crowd, ada = unit(rng, 200), unit(rng, 1)
    with PgGallery(url, create=True) as host_a:
        host_a.enrol([(f"p{i:03d}", crowd[i:i + 1], None) for i in range(len(crowd))], EMBEDDER)
        with PgGallery(url, create=False, readonly=True) as host_b:
            matcher = Matcher(host_b, EMBEDDER, "euclidean", 0.3, background=True)
            try:
                assert matcher.match(ada)[0].name is None
                delays = {}  # from just before host A's call to host B's matcher answering with it
                start = time.monotonic()
                host_a.add("Ada", ada, EMBEDDER)
                delays["enrol"] = _wait_for(matcher, ada, "Ada", start)
                start = time.monotonic()
                host_a.rename("Ada", "Ada Lovelace")
                delays["rename"] = _wait_for(matcher, ada, "Ada Lovelace", start)
                start = time.monotonic()
                host_a.remove("Ada Lovelace")  # its VACUUM FULL included
                delays["remove"] = _wait_for(matcher, ada, None, start)
                log.warning("gallery propagation delays: %s", {k: f"{v * 1000:.0f} ms" for k, v in delays.items()})
                assert all(d < 1.0 for d in delays.values()), delays
                assert matcher.status.reloads >= 2 and not matcher.stale
            finally:
                matcher.close()


def test_a_matcher_survives_the_server_going_away(cluster, url):
    """Server stopped under a running matcher: it answers from its copy, says it is stale within a poll or
    two, and after the restart picks up what was enrolled meanwhile."""
    rng = np.random.default_rng(8)
    ada, bob = unit(rng, 1), unit(rng, 1)
    with PgGallery(url, create=True) as writer:
        writer.add("Ada", ada, EMBEDDER)
    with PgGallery(url, create=False, readonly=True) as host_b:
        matcher = Matcher(host_b, EMBEDDER, "euclidean", 0.3, background=True)
        try:
            cluster.stop()
            try:
                deadline = time.monotonic() + 5
                while not matcher.stale and time.monotonic() < deadline:
                    time.sleep(0.02)
                assert matcher.stale and "PostgreSQL" in matcher.status.error
                assert matcher.match(ada)[0].name == "Ada"  # the last good copy answers
            finally:
                cluster.start()
            with PgGallery(url, create=False) as writer:
                writer.add("Bob", bob, EMBEDDER)
            _wait_for(matcher, bob, "Bob", time.monotonic(), timeout_s=10)
            assert not matcher.stale
        finally:
            matcher.close()


def test_refresh_is_cheap_when_nothing_changed(url):
    with PgGallery(url, create=True) as gallery:
        gallery.add("Ada", unit(np.random.default_rng(5), 1), EMBEDDER)
        token = gallery.refresh()
        start = time.perf_counter()
        for _ in range(1000):
            assert gallery.refresh() == token
        per_call = (time.perf_counter() - start) / 1000
    assert per_call < 0.0005, f"refresh took {per_call * 1e6:.0f} us with nothing changed"


def _database_files(cluster, url: str) -> bytes:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CHECKPOINT")  # dirty pages to the files; the files VACUUM FULL replaced are unlinked
        oid = conn.execute("SELECT oid FROM pg_database WHERE datname = current_database()").fetchone()[0]
    folder = cluster.data / "base" / str(oid)
    return b"".join(p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file())


def test_removed_vectors_leave_no_trace_in_the_relation_files(cluster, url):
    rng = np.random.default_rng(6)
    keep, gone = unit(rng, 3), unit(rng, 4)
    wide = unit(rng, 1, 512)  # 2 kB: stored out of line in the TOAST table
    with PgGallery(url, create=True) as gallery:
        gallery.add("Keep", keep, EMBEDDER)
        gallery.add("Gone", gone, EMBEDDER)
        gallery.reject("Gone", unit(rng, 1), EMBEDDER)
        gallery.add("Gone", wide, "arcface:wide")
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CHECKPOINT")
            heap, toast = conn.execute(
                "SELECT pg_relation_filepath('streamer.faces'), "
                "pg_relation_filepath(reltoastrelid) FROM pg_class WHERE oid = 'streamer.faces'::regclass"
            ).fetchone()
        probes = [v.tobytes()[:256] for v in (*gone, wide[0])]
        files = cluster.read_file(heap) + cluster.read_file(toast)
        assert all(p in files for p in probes), "the check cannot see stored vectors: it would prove nothing"
        assert gallery.remove("Gone") == 5
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CHECKPOINT")
            new_heap, new_toast = conn.execute(
                "SELECT pg_relation_filepath('streamer.faces'), "
                "pg_relation_filepath(reltoastrelid) FROM pg_class WHERE oid = 'streamer.faces'::regclass"
            ).fetchone()
        assert new_heap != heap  # VACUUM FULL wrote a new file
        assert not (cluster.data / heap).exists() or (cluster.data / heap).stat().st_size == 0
        after = cluster.read_file(new_heap) + cluster.read_file(new_toast)
        assert not any(p in after for p in probes)
        everything = _database_files(cluster, url)  # every table, index and leftover file of the database
        assert not any(p in everything for p in probes)
        assert all(v.tobytes()[:256] in everything for v in keep)
        assert gallery.names() == {"Keep"}


def _one_line(exc: pytest.ExceptionInfo, password: str) -> str:
    text = str(exc.value)
    assert "\n" not in text and password not in text, text
    return text


def test_bad_urls_and_servers_fail_fast_in_one_line(cluster, url):
    cases = {
        "wrong password": (cluster.url(url.rsplit("/", 1)[1], password="not-it"), "refused user 'streamer'"),
        "no database": (cluster.url("nodb"), "database 'nodb' does not exist"),
        "server down": (f"postgresql://streamer:{cluster.password}@127.0.0.1:{_closed_port()}/x",
                        "is PostgreSQL running there"),
        "not a URL": ("postgresql://streamer:pw@127.0.0.1:notaport/x", "port .notaport. is not a number"),
        "unknown option": ("postgresql://streamer:pw@127.0.0.1/x?bogus=1", "not a valid PostgreSQL URL"),
        "no TLS beyond loopback": ("postgresql://streamer:pw@192.0.2.7/x", "beyond loopback.*sslmode=verify-full"),
    }
    for what, (bad, message) in cases.items():
        start = time.monotonic()
        with pytest.raises(GalleryError, match=message) as exc:
            PgGallery(bad, create=False)
        assert time.monotonic() - start < 2.0, what
        _one_line(exc, cluster.password)
        assert "pw@" not in str(exc.value)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_server_that_never_answers_times_out():
    """A hostile (or hung) server accepts the connection and says nothing: the connect timeout ends it."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]
        start = time.monotonic()
        with pytest.raises(GalleryError, match="did not answer within 2 s") as exc:
            PgGallery(f"postgresql://u:sekrit@127.0.0.1:{port}/db", create=False, connect_timeout_s=2)
        took = time.monotonic() - start
    assert 1.5 < took < 6, took
    _one_line(exc, "sekrit")


def test_a_slow_statement_is_cut_by_the_statement_timeout(url):
    with PgGallery(url, create=True) as writer:
        writer.add("Ada", unit(np.random.default_rng(7), 1), EMBEDDER)
        with psycopg.connect(url) as locker:  # holds the faces table so every read of it waits
            locker.execute("LOCK TABLE streamer.faces IN ACCESS EXCLUSIVE MODE")
            with PgGallery(url, create=False, readonly=True, busy_timeout_s=0.3) as reader:
                start = time.monotonic()
                with pytest.raises(GalleryError, match="locked by another host"):
                    reader.snapshot(EMBEDDER)
                assert time.monotonic() - start < 2


def test_settings_gallery_url(monkeypatch):
    from streamer.config import load_settings

    secret = "postgresql://u:sekrit@127.0.0.1:5/db"
    settings = load_settings(overrides={"gallery": {"url": secret}})
    assert "sekrit" not in repr(settings) and "sekrit" not in str(settings.gallery)
    assert settings.gallery.url.get_secret_value() == secret
    # The worker processes get their settings as JSON and must be able to connect.
    assert settings.model_dump(mode="json")["gallery"]["url"] == secret
    with pytest.raises(ConfigError, match="gallery.path and gallery.url are both set") as exc:
        load_settings(overrides={"gallery": {"url": secret, "path": "people.db"}})
    assert "sekrit" not in str(exc.value)
    monkeypatch.setenv("STREAMER_GALLERY__URL", "postgresql://u:sekrit@db.example.com/db")
    with pytest.raises(ConfigError, match=r"gallery.url \(STREAMER_GALLERY__URL\): server db.example.com is beyond "
                                          "loopback") as exc:
        load_settings()
    assert "sekrit" not in str(exc.value) and "\n" not in str(exc.value)
    monkeypatch.setenv("STREAMER_GALLERY__URL", "postgresql://u:sekrit@db.example.com/db?sslmode=verify-full")
    assert load_settings().gallery.url is not None


def test_streamer_run_recognises_someone_enrolled_in_postgresql(cluster, url, model_dir, cache_dir):
    env = {**os.environ, "STREAMER_MODEL_DIR": str(model_dir), "STREAMER_MODELS__CACHE_DIR": str(cache_dir),
           "PYTHONPATH": str(REPO)}

    def streamer(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "streamer", *args], capture_output=True, text=True, env=env, check=False,
                              timeout=240)

    added = streamer("gallery", "add", "Eileen Collins", str(REPO / "sample_videos/astronaut.jpg"), "--gallery", url)
    assert added.returncode == 0, added.stderr
    assert cluster.password not in added.stderr
    listed = streamer("gallery", "list", "--gallery", url, "--json")
    assert listed.returncode == 0, listed.stderr
    assert [p["name"] for p in json.loads(listed.stdout)] == ["Eileen Collins"]
    run = streamer("run", str(REPO / "sample_videos/astronaut.mp4"), "--gallery", url, "--print-events", "--quiet",
                   "--publish", f"tcp://127.0.0.1:{_closed_port()}")
    assert run.returncode == 0, run.stderr
    events = [json.loads(line.split(" ", 1)[1]) for line in run.stdout.splitlines() if " {" in line]  # TOPIC JSON
    names = {e.get("name") for e in events if e.get("kind") == "identity"}
    # (Nobody named while the log says "unknown tracks": the detect worker opened no gallery; it must hand
    # open_matcher the gallery settings, `settings.gallery`, whose url or path it opens.)
    assert "Eileen Collins" in names, (names, run.stderr[-2000:])
    assert cluster.password not in run.stdout + run.stderr
    bad = streamer("gallery", "list", "--gallery", cluster.url(url.rsplit("/", 1)[1], password="wrong"))
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "refused user" in bad.stderr
