"""Gallery store and matcher: atomic writes, real erasure, embedder isolation, cache freshness, matching maths.

Vectors are random unit vectors with planted near-duplicates; in 128-D two random unit vectors sit about
sqrt(2) apart, far beyond any threshold used here, so the planted matches are unambiguous.
"""

from __future__ import annotations

import hashlib
import math
import os
import sqlite3
import tempfile
from pathlib import Path

import numpy as np
import pytest

from streamer.errors import GalleryError
from streamer.match.gallery import Gallery, PersonSummary
from streamer.match.matcher import Match, Matcher

D = 128
EMB = "dlib_resnet"


def unit(rng: np.random.Generator, n: int, d: int = D) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def near(rng: np.random.Generator, x: np.ndarray, sigma: float = 0.01) -> np.ndarray:
    """A noisy copy of each row, re-normalised: a new photo of the same person."""
    return unit_rows(x + sigma * rng.standard_normal(x.shape).astype(np.float32))


def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def gallery(tmp_path: Path):
    g = Gallery(tmp_path / "gallery.db")
    yield g
    g.close()


# ---------------------------------------------------------------------------------------------- store


def test_add_list_and_reopen(tmp_path, rng):
    path = tmp_path / "g.db"
    with Gallery(path) as g:
        alice = g.add("Alice", unit(rng, 3), EMB, ["a1.jpg", "a2.jpg", "a3.jpg"], metadata={"team": "red"})
        assert (alice.name, alice.faces, alice.metadata) == ("Alice", 3, {"team": "red"})
        again = g.add("Alice", unit(rng, 2), EMB, ["a4.jpg", "a5.jpg"])
        assert again.id == alice.id and again.faces == 5
        g.add("Bob", unit(rng, 1), "mobilefacenet", ["b.jpg"])
    with Gallery(path, create=False) as g:
        assert g.people() == [
            PersonSummary("Alice", 5, (EMB,)),
            PersonSummary("Bob", 1, ("mobilefacenet",)),
        ]
        assert g.people(EMB) == [PersonSummary("Alice", 5, (EMB,))]
        assert g.person("Alice").metadata == {"team": "red"}
        assert g.embedders() == {EMB: D, "mobilefacenet": D}
        assert len(g) == 2 and "Bob" in g and "Carol" not in g
        # the file says what it is and uses a rollback journal, never WAL
        assert g._conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert not Path(str(path) + "-wal").exists()


def test_vectors_round_trip_exactly(gallery, rng):
    a, b = unit(rng, 2), unit(rng, 3)
    gallery.add("Zed", b, EMB, ["z1", "z2", "z3"])
    gallery.add("Amy", a, EMB, ["a1", "a2"])
    names, vectors = gallery.matrix(EMB)
    assert names == ["Amy", "Amy", "Zed", "Zed", "Zed"]  # grouped by person, sorted by name
    assert vectors.dtype == np.float32 and vectors.shape == (5, D)
    np.testing.assert_array_equal(vectors, np.vstack([a, b]))
    assert not vectors.flags.writeable


def test_name_is_normalised(gallery, rng):
    nfd = "Jose\u0301"  # as macOS folder names arrive
    gallery.add(f"  {nfd} ", unit(rng, 1), EMB)
    assert [p.name for p in gallery.people()] == ["Jos\u00e9"]
    assert gallery.add("Jos\u00e9", unit(rng, 1), EMB).faces == 2


def test_embedder_ids_never_mix(gallery, rng):
    x = unit(rng, 1)
    gallery.add("Alice", x, EMB)
    gallery.add("Bob", x, "arcface_r100")  # same numbers, different space
    names, _ = gallery.matrix(EMB)
    assert names == ["Alice"]
    assert gallery.matrix("arcface_r100")[0] == ["Bob"]
    assert [m.name for m in Matcher(gallery, "arcface_r100", "cosine", 0.4).match(x)] == ["Bob"]
    empty_names, empty = gallery.matrix("unknown_model")
    assert empty_names == [] and empty.shape[0] == 0
    # a different dimension under an existing id means a different model: refused, file unchanged
    before = sha(gallery.path)
    with pytest.raises(GalleryError, match="128-D"):
        gallery.add("Carol", unit(rng, 1, 512), EMB)
    assert sha(gallery.path) == before


@pytest.mark.parametrize(
    ("embeddings", "sources", "error", "match"),
    [
        (np.zeros((0, D), np.float32), None, ValueError, "N>=1"),
        (np.zeros(D, np.float32), None, ValueError, "shape"),
        (np.zeros((1, D), np.int32), None, ValueError, "float dtype"),
        (np.full((1, D), np.nan, np.float32), None, ValueError, "NaN"),
        (np.full((1, D), 1e300, np.float64), None, ValueError, "float32 range"),
        ([[0.0] * D], None, ValueError, "numpy array"),
        (np.zeros((2, D), np.float32), ["only-one.jpg"], ValueError, "2 file names"),
    ],
)
def test_bad_batch_leaves_file_byte_identical(gallery, rng, embeddings, sources, error, match):
    gallery.add("Alice", unit(rng, 2), EMB)
    before = sha(gallery.path)
    good = ("Bob", unit(rng, 2), ["b1", "b2"])
    with pytest.raises(error, match=match):
        gallery.add_many([good, ("Carol", embeddings, sources)], EMB)
    assert sha(gallery.path) == before
    assert [p.name for p in gallery.people()] == ["Alice"]


def test_failure_inside_transaction_rolls_back(gallery, rng, monkeypatch):
    """A failure after rows were written (not caught by validation) still leaves the file as it was."""
    gallery.add("Alice", unit(rng, 2), EMB)
    before = sha(gallery.path)
    calls = []
    original = Gallery._insert

    def failing_insert(conn, entry, *args):
        calls.append(entry.name)
        if len(calls) == 3:
            raise sqlite3.OperationalError("disk I/O error (simulated)")
        return original(conn, entry, *args)

    monkeypatch.setattr(Gallery, "_insert", staticmethod(failing_insert))
    batch = [(name, unit(rng, 50), None) for name in ("Bob", "Carol", "Dave")]
    with pytest.raises(GalleryError, match="simulated"):
        gallery.add_many(batch, EMB)
    assert calls == ["Bob", "Carol", "Dave"]
    assert sha(gallery.path) == before
    assert not Path(str(gallery.path) + "-journal").exists()
    assert [p.name for p in gallery.people()] == ["Alice"]
    assert gallery.matrix(EMB)[1].shape == (2, D)


def test_remove_erases_vector_bytes(tmp_path, rng):
    path = tmp_path / "g.db"
    secret = unit(rng, 3)
    with Gallery(path) as g:
        g.add("Alice", unit(rng, 4), EMB, ["a.jpg"] * 4)
        g.add("Mallory", secret, EMB, ["secret_source_name.jpg"] * 3)
        g.add("Bob", unit(rng, 4), EMB, ["b.jpg"] * 4)
        raw = path.read_bytes()
        assert all(row.tobytes() in raw for row in secret)  # the check can see them while they exist
        assert g._conn.execute("PRAGMA secure_delete").fetchone()[0] == 1
        assert g.remove("Mallory") == 3
        assert [p.name for p in g.people()] == ["Alice", "Bob"]
        raw = path.read_bytes()
        for row in secret:
            assert row.tobytes() not in raw
            assert row[:16].tobytes() not in raw  # not even a fragment
        assert b"Mallory" not in raw and b"secret_source_name" not in raw
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "g.db"]
    assert leftovers == []  # no -journal / -wal copy of the old pages


def test_rename_and_remove_errors(gallery, rng):
    gallery.add("Alice", unit(rng, 1), EMB)
    gallery.add("Bob", unit(rng, 1), EMB)
    before = sha(gallery.path)
    cases = [
        (lambda: gallery.rename("Carol", "Dave"), "no person named 'Carol'"),
        (lambda: gallery.rename("Alice", "Bob"), "'Bob' already exists"),
        (lambda: gallery.rename("Alice", "   "), "empty"),
        (lambda: gallery.rename("Alice", "two\nlines"), "control characters"),
        (lambda: gallery.remove("Carol"), "no person named 'Carol'"),
        (lambda: gallery.add("", unit(rng, 1), EMB), "empty"),
        (lambda: gallery.person("Carol"), "no person named"),
    ]
    for call, message in cases:
        with pytest.raises(GalleryError, match=message) as info:
            call()
        assert "\n" not in str(info.value)
    assert sha(gallery.path) == before
    renamed = gallery.rename("Alice", "Alicia")
    assert renamed.name == "Alicia" and renamed.faces == 1
    assert gallery.matrix(EMB)[0] == ["Alicia", "Bob"]


def test_cache_follows_changes_from_another_connection(tmp_path, rng):
    path = tmp_path / "g.db"
    writer, reader = Gallery(path), Gallery(path, readonly=True)
    try:
        writer.add("Alice", unit(rng, 1), EMB)
        first = reader.matrix(EMB)
        assert first[0] == ["Alice"]
        assert reader.matrix(EMB) is first  # cached while nothing changed
        matcher = Matcher(reader, EMB, "euclidean", 0.6)
        bob = unit(rng, 1)
        assert matcher.match(bob)[0].name is None
        writer.add("Bob", bob, EMB)
        assert reader.matrix(EMB)[0] == ["Alice", "Bob"]
        assert matcher.match(bob)[0].name == "Bob"
        writer.rename("Bob", "Robert")
        assert matcher.match(bob)[0].name == "Robert"
        writer.remove("Robert")
        assert matcher.match(bob)[0].name is None
        with pytest.raises(GalleryError, match="read-only"):
            reader.add("Eve", bob, EMB)
    finally:
        writer.close()
        reader.close()


def test_open_errors(tmp_path):
    with pytest.raises(GalleryError, match="does not exist"):
        Gallery(tmp_path / "missing.db", create=False)
    with pytest.raises(GalleryError, match="does not exist"):
        Gallery(tmp_path / "missing.db", readonly=True)
    assert not (tmp_path / "missing.db").exists()
    with pytest.raises(GalleryError, match="directory .*nope does not exist"):
        Gallery(tmp_path / "nope" / "g.db")
    with pytest.raises(GalleryError, match="is a directory"):
        Gallery(tmp_path)

    jpeg = tmp_path / "face.jpg"
    jpeg.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(256)) * 8)
    before = sha(jpeg)
    for kwargs in ({}, {"readonly": True}):
        with pytest.raises(GalleryError, match="not a gallery file") as info:
            Gallery(jpeg, **kwargs)
        assert "\n" not in str(info.value)
    assert sha(jpeg) == before

    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE t (x)")
    conn.close()
    before = sha(other)
    with pytest.raises(GalleryError, match="not a streamer gallery"):
        Gallery(other)
    assert sha(other) == before

    newer = tmp_path / "newer.db"
    Gallery(newer).close()
    with sqlite3.connect(newer) as conn:
        conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(GalleryError, match="schema version 99"):
        Gallery(newer)


def _unwritable_checks(locked: Path) -> list[str]:
    """Open galleries in a directory we may not write; one line per attempt: the error, or what was read."""
    outcomes = []
    for path, kwargs in ((locked / "new.db", {}), (locked / "g.db", {}), (locked / "g.db", {"readonly": True})):
        try:
            with Gallery(path, **kwargs) as g:
                outcomes.append("read " + ",".join(p.name for p in g.people()))
        except GalleryError as exc:
            outcomes.append(f"GalleryError: {exc}")
    # Without our pre-check SQLite itself refuses, and that also arrives as a GalleryError.
    real_access, os.access = os.access, lambda *a, **k: True
    try:
        Gallery(locked / "new.db")
        outcomes.append("created")
    except GalleryError as exc:
        outcomes.append(f"GalleryError: {exc}")
    finally:
        os.access = real_access
    return outcomes


def _as_nobody(fn, *args) -> list[str]:
    """Run fn in a forked child that dropped root (root ignores permission bits)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 0
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            os.write(write_end, "\n".join(fn(*args)).encode())
        except BaseException:
            code = 1
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "child failed before reporting"
    return data.split("\n")


def test_unwritable_directory(rng):
    # Not tmp_path: pytest's base folder is private to its owner, and the root case runs as nobody.
    with tempfile.TemporaryDirectory() as tmp:
        locked = Path(tmp) / "locked"
        locked.mkdir()
        with Gallery(locked / "g.db") as g:
            g.add("Alice", unit(rng, 1), EMB)
        if os.geteuid() == 0:
            os.chmod(tmp, 0o755)
            locked.chmod(0o755)  # owned by root: read-only for nobody
            (locked / "g.db").chmod(0o644)
            outcomes = _as_nobody(_unwritable_checks, locked)
        else:
            locked.chmod(0o500)
            try:
                outcomes = _unwritable_checks(locked)
            finally:
                locked.chmod(0o700)
        new_db, existing, readonly, sqlite_itself = outcomes
        assert new_db.startswith("GalleryError") and "is not writable" in new_db
        assert existing.startswith("GalleryError") and "not writable" in existing
        assert readonly == "read Alice"
        assert sqlite_itself.startswith("GalleryError: cannot open gallery"), sqlite_itself
        assert not (locked / "new.db").exists()


def test_unwritable_file_reported_by_sqlite(tmp_path, rng, monkeypatch):
    """Where permission bits do not stop us (root), SQLite's own refusal still becomes a GalleryError."""
    path = tmp_path / "g.db"
    Gallery(path).close()
    monkeypatch.setattr(os, "access", lambda *a, **k: True)
    with Gallery(path) as g:
        g._conn.execute("PRAGMA query_only = ON")  # stands in for a read-only medium
        with pytest.raises(GalleryError, match=r"^cannot write gallery .*g\.db: .*readonly"):
            g.add("Alice", unit(rng, 1), EMB)


# -------------------------------------------------------------------------------------------- matcher


def brute_force(queries: np.ndarray, names: list[str], vectors: np.ndarray, metric: str) -> dict:
    """Reference per-person minimum distances, one pair at a time."""
    out: dict[str, np.ndarray] = {}
    for name in sorted(set(names)):
        rows = vectors[[i for i, n in enumerate(names) if n == name]].astype(np.float64)
        q = queries.astype(np.float64)
        if metric == "euclidean":
            d = np.linalg.norm(q[:, None, :] - rows[None, :, :], axis=2)
        else:
            qn = q / np.linalg.norm(q, axis=1, keepdims=True)
            rn = rows / np.linalg.norm(rows, axis=1, keepdims=True)
            d = 1.0 - qn @ rn.T
        out[name] = d.min(axis=1)
    return out


@pytest.mark.parametrize(("metric", "threshold"), [("euclidean", 0.6), ("cosine", 0.3)])
def test_match_finds_planted_duplicates(gallery, rng, metric, threshold):
    people = {f"person{i:02d}": unit(rng, int(rng.integers(1, 5))) for i in range(40)}
    gallery.add_many([(n, v, None) for n, v in people.items()], EMB)
    planted = list(people)[::4]
    # a noisy copy of one of each planted person's faces, then strangers, shuffled
    queries = [near(rng, people[n][-1:], 0.02) for n in planted]
    strangers = unit(rng, 15)
    expected = planted + [None] * len(strangers)
    order = rng.permutation(len(expected))
    batch = np.vstack(queries + [strangers])[order]
    expected = [expected[i] for i in order]
    matcher = Matcher(gallery, EMB, metric, threshold)
    results = matcher.match(batch)
    assert [r.name for r in results] == expected

    names, vectors = gallery.matrix(EMB)
    ref = brute_force(batch, names, vectors, metric)
    people_out, dist = matcher.distances(batch)
    assert list(people_out) == sorted(ref)
    np.testing.assert_allclose(dist, np.stack([ref[n] for n in people_out], axis=1), atol=2e-3)
    best = np.min(np.stack(list(ref.values()), axis=1), axis=1)
    np.testing.assert_allclose([r.distance for r in results], best, atol=2e-3)
    for r in results:
        assert 0.0 <= r.score <= 1.0
        assert (r.score > 0.5) == (r.name is not None)


def test_score_and_threshold_boundary(gallery):
    gallery.add("Origin", np.zeros((1, 4), np.float32), "toy")
    matcher = Matcher(gallery, "toy", "euclidean", 0.5)
    queries = np.array([[0, 0, 0, 0], [0.25, 0, 0, 0], [0.5, 0, 0, 0], [0.75, 0, 0, 0], [3, 0, 0, 0]], np.float32)
    results = matcher.match(queries)
    assert [r.name for r in results] == ["Origin", "Origin", None, None, None]  # unknown AT the threshold
    np.testing.assert_allclose([r.distance for r in results], [0, 0.25, 0.5, 0.75, 3], atol=1e-6)
    np.testing.assert_allclose([r.score for r in results], [1, 0.75, 0.5, 0.25, 0], atol=1e-6)


def test_empty_gallery_and_top_k(gallery, rng):
    matcher = Matcher(gallery, EMB, "cosine", 0.4)
    assert matcher.match(unit(rng, 3)) == [Match(None, math.inf, 0.0)] * 3
    assert matcher.top_k(unit(rng, 1)[0], 5) == []
    assert matcher.match(np.zeros((0, D), np.float32)) == []

    base = unit(rng, 1)[0]
    # people at increasing angles from `base`
    for i, step in enumerate([0.05, 0.3, 1.5, 3.0]):
        gallery.add(f"p{i}", unit_rows((base + step * unit(rng, 1)[0])[None]), EMB)
    top = matcher.top_k(base, 3)
    assert [m.name for m in top] == ["p0", "p1", "p2"]
    assert top[0].distance < top[1].distance < top[2].distance
    assert len(matcher.top_k(base[None], 10)) == 4  # capped at the number of people
    assert top[-1].score < 0.5 < top[0].score  # names beyond the threshold are listed, score tells


def test_matcher_validation(gallery, rng):
    gallery.add("Alice", unit(rng, 1), EMB)
    with pytest.raises(ValueError, match="metric"):
        Matcher(gallery, EMB, "manhattan", 0.5)  # type: ignore[arg-type]
    for bad in (0, -1, math.nan, math.inf):
        with pytest.raises(ValueError, match="threshold"):
            Matcher(gallery, EMB, "euclidean", bad)
    matcher = Matcher(gallery, EMB, "euclidean", 0.6)
    with pytest.raises(ValueError, match="dimension 128"):
        matcher.match(unit(rng, 2, 512))
    with pytest.raises(ValueError, match=r"shape \(N, D\)"):
        matcher.match(unit(rng, 1)[0])
    with pytest.raises(ValueError, match="NaN"):
        matcher.match(np.full((1, D), np.nan, np.float32))
    with pytest.raises(ValueError, match="k"):
        matcher.top_k(unit(rng, 1)[0], 0)


def test_matcher_batch_is_fast(tmp_path, rng):
    """One matrix product per batch: 32 queries against 10,000 faces takes milliseconds (about 5-25 ms on a
    busy 2-core box); a per-pair Python loop would take seconds. The bound leaves room for a loaded CI machine."""
    import time

    with Gallery(tmp_path / "big.db") as g:
        g.add_many([(f"p{i:04d}", unit(rng, 5), None) for i in range(2000)], EMB)
        matcher = Matcher(g, EMB, "euclidean", 0.6)
        queries = unit(rng, 32)
        matcher.match(queries)  # builds the index once
        start = time.perf_counter()
        for _ in range(10):
            matcher.match(queries)
        per_batch = (time.perf_counter() - start) / 10
    assert per_batch < 0.2, f"{per_batch * 1e3:.1f} ms per batch of 32 against 10k faces"
