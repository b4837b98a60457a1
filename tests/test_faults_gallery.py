"""The gallery under what real sites do to it: another process holding it locked, a file swapped in with
`mv`, a large gallery reloading while frames are matched, and galleries nobody may write.

Each test reproduces the fault on the code before the fix (a stalled or raising `match`, a removed person
still named, a reload on the hot path, a read-only gallery that cannot be opened) and then shows it handled.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from streamer.errors import GalleryError
from streamer.match.gallery import Gallery
from streamer.match.matcher import Matcher, open_matcher

EMB = "test_emb"
D = 128
SPEC = SimpleNamespace(id=EMB, metric="euclidean", threshold=0.6)  # what open_matcher reads of an embedder spec

# Another process that takes the gallery's EXCLUSIVE lock (what a large VACUUM or an sqlite3 shell's
# `BEGIN EXCLUSIVE` does), optionally deletes a person inside it, says "locked", and commits after a while.
LOCKER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("PRAGMA foreign_keys = ON")
conn.execute("BEGIN EXCLUSIVE")
if sys.argv[3]:
    conn.execute("DELETE FROM people WHERE name = ?", (sys.argv[3],))
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("COMMIT")
"""


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261202)


def unit(rng: np.random.Generator, n: int, d: int = D) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def hold_lock(path: Path, seconds: float, delete: str = "") -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", LOCKER, str(path), str(seconds), delete],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def wait_for(predicate, timeout_s: float, poll_s: float = 0.02) -> float | None:
    """Seconds until predicate() held, or None when it never did within timeout_s."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if predicate():
            return time.monotonic() - start
        time.sleep(poll_s)
    return None


def gallery_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "streamer.match.matcher" and r.levelno == logging.WARNING]


# ------------------------------------------------------------------------------------------ locks


def test_a_locked_gallery_keeps_matching_with_the_last_good_copy(tmp_path, rng, caplog):
    """Fault: every match reads PRAGMA data_version, so while another process holds the file locked each
    call waits for the lock (up to 5 s) and then raises, which ends the detect worker."""
    path = tmp_path / "people.db"
    alice, bob = unit(rng, 1), unit(rng, 1)
    with Gallery(path) as g:
        g.add("Alice", alice, EMB)
        g.add("Bob", bob, EMB)
    gallery, matcher = open_matcher(path, SPEC)
    queries = np.vstack([alice, bob])
    try:
        assert [m.name for m in matcher.match(queries)] == ["Alice", "Bob"]
        caplog.set_level(logging.WARNING, logger="streamer.match.matcher")
        # Holds the lock for 2.5 s, well past the reload's short busy wait, and removes Bob inside it.
        locker = hold_lock(path, 2.5, delete="Bob")
        slowest, calls, until = 0.0, 0, time.monotonic() + 1.2
        while time.monotonic() < until:
            t0 = time.perf_counter()
            names = [m.name for m in matcher.match(queries)]
            slowest = max(slowest, time.perf_counter() - t0)
            calls += 1
            assert names == ["Alice", "Bob"]  # the last good copy answers
            time.sleep(0.01)
        assert slowest < 0.2, f"a match waited {slowest:.2f} s for another process's lock"
        status = matcher.status
        assert status.stale and "locked" in status.error and status.failures >= 1
        warnings = gallery_warnings(caplog)
        assert len(warnings) == 1, warnings  # rate limited: one line, not one per retry
        assert "locked by another process" in warnings[0] and "retrying" in warnings[0]

        locker.wait(timeout=10)
        assert locker.returncode == 0
        # Retried on its own: the commit made under the lock shows without anyone touching the matcher.
        gone = wait_for(lambda: matcher.match(queries)[1].name is None, 2.0)
        assert gone is not None, "the change committed under the lock never showed"
        assert matcher.match(queries)[0].name == "Alice"
        assert not matcher.status.stale and matcher.status.error is None
        assert matcher.status.failures >= 2  # it kept retrying...
        warnings = gallery_warnings(caplog)
        assert [w for w in warnings if "readable again" not in w] == warnings[:1]  # ...and said so once
        assert "readable again" in warnings[-1]
    finally:
        matcher.close()
        gallery.close()


def test_a_gallery_locked_at_open_is_named_as_locked(tmp_path, rng):
    """Fault: a lock at open read as `... is not a gallery file (database is locked)`."""
    path = tmp_path / "people.db"
    with Gallery(path) as g:
        g.add("Alice", unit(rng, 1), EMB)
    locker = hold_lock(path, 1.5)
    try:
        started = time.monotonic()
        with pytest.raises(GalleryError, match="is locked by another process") as info:
            Gallery(path, create=False, readonly=True, busy_timeout_s=0.2)
        assert "not a gallery" not in str(info.value)
        assert time.monotonic() - started < 1.0
    finally:
        locker.wait(timeout=10)


# -------------------------------------------------------------------------------- a replaced file


@pytest.fixture(scope="module")
def engine(model_dir, cache_dir):
    from streamer.config import load_settings
    from streamer.engine import FaceEngine

    settings = load_settings(overrides={"model_dir": str(model_dir), "models": {"cache_dir": str(cache_dir)}})
    with FaceEngine(settings) as engine:
        yield engine


def test_a_gallery_replaced_with_mv_stops_naming_the_removed_person(tmp_path, engine, media_dir):
    """Fault: the matcher kept reading the file it had opened, so after `mv new.db people.db` a person
    left out of the new file was still recognised for as long as `streamer run` ran."""
    photos = media_dir / "face_recognition/examples"
    people, new = tmp_path / "people.db", tmp_path / "new.db"
    with Gallery(people) as g:
        engine.enroll(g, "Barack Obama", [photos / "obama.jpg"])
        engine.enroll(g, "Joe Biden", [photos / "biden.jpg"])
    with Gallery(new) as g:
        engine.enroll(g, "Joe Biden", [photos / "biden.jpg"])
    # Other photos than the enrolled ones, as a camera would see them: Obama alone, then both of them.
    obama = engine.enrollment_embeddings([photos / "obama2.jpg"])[0]
    both = _all_faces(engine, photos / "knn_examples/test/obama_and_biden.jpg")
    queries = np.vstack([obama, both])
    gallery, matcher = open_matcher(people, engine.embedder.spec)
    try:
        before = [m.name for m in matcher.match(queries)]
        assert before[0] == "Barack Obama" and {"Barack Obama", "Joe Biden"} <= set(before[1:]), before

        subprocess.run(["mv", str(new), str(people)], check=True)
        gone = wait_for(lambda: "Barack Obama" not in {m.name for m in matcher.match(queries)}, 1.0)
        assert gone is not None, "Barack Obama is still recognised 1 s after the gallery without him replaced it"
        after = [m.name for m in matcher.match(queries)]
        assert after[0] is None and "Joe Biden" in after, after  # the new file answers, not an empty gallery
        assert matcher.status.reloads == 1 and not matcher.status.stale
    finally:
        matcher.close()
        gallery.close()


def _all_faces(engine, image: Path) -> np.ndarray:
    from streamer.engine import load_image

    bgr = load_image(image)
    return engine.embed_faces(bgr, engine.detector.detect(bgr))


def test_a_file_swapped_for_something_else_keeps_the_last_good_copy(tmp_path, rng, caplog):
    """A half-finished swap (a JPEG, a missing file) must not crash the matcher nor empty the gallery."""
    path, spare = tmp_path / "people.db", tmp_path / "spare.db"
    alice, bob = unit(rng, 1), unit(rng, 1)
    with Gallery(path) as g:
        g.add("Alice", alice, EMB)
    with Gallery(spare) as g:
        g.add("Bob", bob, EMB)
    gallery, matcher = open_matcher(path, SPEC)
    caplog.set_level(logging.WARNING, logger="streamer.match.matcher")
    try:
        queries = np.vstack([alice, bob])
        jpeg = tmp_path / "face.jpg"
        jpeg.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(256)) * 8)
        os.replace(jpeg, path)
        assert wait_for(lambda: matcher.stale, 2.0) is not None
        assert "not a gallery file" in matcher.status.error
        assert [m.name for m in matcher.match(queries)] == ["Alice", None]

        path.unlink()
        assert wait_for(lambda: "no longer exists" in (matcher.status.error or ""), 2.0) is not None
        assert [m.name for m in matcher.match(queries)] == ["Alice", None]

        os.replace(spare, path)
        assert wait_for(lambda: not matcher.stale, 2.0) is not None
        assert [m.name for m in matcher.match(queries)] == [None, "Bob"]
        warnings = gallery_warnings(caplog)
        assert any("not a gallery file" in w for w in warnings) and any("readable again" in w for w in warnings)
    finally:
        matcher.close()
        gallery.close()


# ------------------------------------------------------------------------------- reload off the hot path


def _build_large(path: Path, rng: np.random.Generator, people: int, faces_each: int, dim: int) -> None:
    with Gallery(path) as g:
        g.add_many([(f"p{i:05d}", unit(rng, faces_each, dim), None) for i in range(people)], EMB)


# The detect thread's part: match in a loop while the gallery changes, and say how long the longest call took.
# A process of its own, with one BLAS thread: on a small busy machine OpenBLAS's own threads make single
# products spike to hundreds of ms whatever the gallery does, which would drown what is measured here.
MATCH_LOOP = """
import json, sys, time, numpy as np
from types import SimpleNamespace
from streamer.match.gallery import Gallery
from streamer.match.matcher import Matcher, open_matcher
path, emb, queries = sys.argv[1], sys.argv[2], np.load(sys.argv[3])
with Gallery(path, create=False, readonly=True) as g:
    started = time.perf_counter()
    Matcher(g, emb, "cosine", 0.4).match(queries)  # a first match loads the whole gallery
    load_s = time.perf_counter() - started  # what one reload costs, on this machine, now
gallery, matcher = open_matcher(path, SimpleNamespace(id=emb, metric="cosine", threshold=0.4))
matcher.match(queries)
print("ready", flush=True)
slowest, seen_at, start = 0.0, None, time.monotonic()
while time.monotonic() - start < 30 and (seen_at is None or time.monotonic() < seen_at + 0.2):
    t0 = time.perf_counter()
    names = [m.name for m in matcher.match(queries)]
    slowest = max(slowest, time.perf_counter() - t0)
    if seen_at is None and names[-1] == "newcomer":
        seen_at = time.monotonic()
    time.sleep(0.002)
status = getattr(matcher, "status", None)
print(json.dumps({"load_s": load_s, "slowest_s": slowest, "seen": seen_at is not None,
                  "reloads": getattr(status, "reloads", None), "faces": getattr(status, "faces", None)}))
"""


def test_a_reload_never_stalls_match(tmp_path, rng):
    """Fault: the first match after a change re-read and re-indexed the whole gallery on the caller's thread
    (3.4 s at 500k faces: the detect thread stood still). Now a thread builds the new index beside the old."""
    path = tmp_path / "large.db"
    # Many short rows: a reload costs ~40 matches here, so a reload on the caller's thread stands out.
    dim = 16
    _build_large(path, rng, people=200, faces_each=1000, dim=dim)
    newcomer = unit(rng, 1, dim)
    np.save(tmp_path / "queries.npy", np.vstack([unit(rng, 4, dim), newcomer]))
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    loop = subprocess.Popen([sys.executable, "-c", MATCH_LOOP, str(path), EMB, str(tmp_path / "queries.npy")],
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert loop.stdout.readline().strip() == "ready"
        with Gallery(path, create=False) as g:  # what `streamer gallery add` does, from another process
            g.add("newcomer", newcomer, EMB)
        out, _ = loop.communicate(timeout=60)
    finally:
        loop.kill()
    assert loop.returncode == 0
    result = json.loads(out)
    assert result["seen"], "the enrolled person never became matchable"
    slowest, load_s = result["slowest_s"], result["load_s"]
    assert slowest < load_s / 2, f"a match stalled {slowest:.3f} s (a full load takes {load_s:.3f} s)"
    assert result["reloads"] == 1 and result["faces"] == 200 * 1000 + 1


def test_a_removed_person_stops_matching_before_a_large_reload_finishes(tmp_path, rng):
    """A full reload takes seconds at 500k faces; a removal (privacy) must not wait for it, while someone
    newly enrolled may."""
    path = tmp_path / "large.db"
    dim = 16
    _build_large(path, rng, people=200, faces_each=1000, dim=dim)
    with Gallery(path, create=False, readonly=True) as g:
        names, vectors = g.matrix(EMB)
    removed = vectors[names.index("p00042")][None]
    kept = vectors[names.index("p00043")][None]
    gallery, matcher = open_matcher(path, SimpleNamespace(id=EMB, metric="euclidean", threshold=0.6))
    try:
        queries = np.vstack([removed, kept])
        assert [m.name for m in matcher.match(queries)] == ["p00042", "p00043"]
        conn = sqlite3.connect(path)  # another process's removal, without the rebuild `remove` adds
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("DELETE FROM people WHERE name = 'p00042'")
        conn.commit()
        conn.close()
        # (16-D random faces are crowded: the query may now match a neighbour, never p00042 again.)
        first_unmatched = None
        while matcher.status.reloads == 0 and first_unmatched is None:
            names_now = [m.name for m in matcher.match(queries)]
            if names_now[0] != "p00042":
                first_unmatched = (names_now[1], matcher.status.reloads)
            time.sleep(0.005)
        assert first_unmatched is not None, "p00042 was matched until the whole gallery had been reloaded"
        assert first_unmatched == ("p00043", 0)
        assert wait_for(lambda: matcher.status.reloads == 1, 30) is not None
        after = [m.name for m in matcher.match(queries)]
        assert after[0] != "p00042" and after[1] == "p00043"
        assert matcher.status.faces == 199 * 1000 and matcher.status.people == 199
    finally:
        matcher.close()
        gallery.close()


def test_closing_the_gallery_stops_the_reload_thread(tmp_path, rng):
    """The detect worker closes only the gallery; the reload thread must not outlive it."""
    path = tmp_path / "people.db"
    with Gallery(path) as g:
        g.add("Alice", unit(rng, 1), EMB)
    gallery, matcher = open_matcher(path, SPEC)
    thread = matcher._thread
    assert thread is not None and thread.is_alive()
    gallery.close()
    thread.join(timeout=2)
    assert not thread.is_alive()
    assert matcher.match(unit(rng, 1))[0].name is None  # still answers (from the last copy), never raises


# ------------------------------------------------------------------------------- read-only galleries


def _make_gallery(path: Path, rng: np.random.Generator, *, wal: bool = False) -> None:
    with Gallery(path) as g:
        g.add("Alice", unit(rng, 2), EMB, ["a1.jpg", "a2.jpg"])
        g.add("Bob", unit(rng, 1), EMB)
    if wal:  # as someone with an sqlite3 shell might leave it
        conn = sqlite3.connect(path)
        assert conn.execute("PRAGMA journal_mode = WAL").fetchone()[0] == "wal"
        conn.close()


def _read_everything(path: Path) -> list[str]:
    """What `gallery list` and `find` need of a gallery, opened read-only; one line per result."""
    out = []
    try:
        with Gallery(path, create=False, readonly=True) as g:
            out.append("people " + ",".join(f"{p.name}:{p.faces}" for p in g.people()))
            names, vectors = g.matrix(EMB)
            out.append(f"matrix {len(names)}x{vectors.shape[1]}")
            out.append("top " + Matcher(g, EMB, "euclidean", 0.6).top_k(vectors[0], 2)[0].name)
            g.refresh()
        gallery, matcher = open_matcher(path, SPEC)
        out.append(f"matcher {matcher.status.people}")
        matcher.close()
        gallery.close()
    except GalleryError as exc:
        out.append(f"GalleryError: {exc}")
    return out


def _as_nobody(fn, *args, warm_up=None) -> list[str]:
    """fn(*args) in a forked child that dropped root (root ignores permission bits); its lines back.

    Nobody may not read this interpreter's files (under /root), so whatever fn imports lazily must be
    imported before: `warm_up()` runs in the child while it is still root."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 0
        try:
            os.close(read_end)
            if warm_up is not None:
                warm_up()
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            os.write(write_end, "\n".join(fn(*args)).encode())
        except BaseException as exc:  # noqa: BLE001 - reported to the parent as a line
            os.write(write_end, f"child failed: {type(exc).__name__}: {exc}".encode())
            code = 1
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, data
    return data.split("\n")


def _in_read_only_folder(fn, folder: Path, *args, warm_up=None) -> list[str]:
    """Lock `folder` and its files against writes (as nobody when we are root), run fn, unlock."""
    files = [p for p in folder.iterdir()]
    for f in files:
        f.chmod(0o444)
    folder.chmod(0o555)
    try:
        return _as_nobody(fn, *args, warm_up=warm_up) if os.geteuid() == 0 else fn(*args)
    finally:
        folder.chmod(0o755)
        for f in files:
            f.chmod(0o644)


EXPECTED = ["people Alice:2,Bob:1", "matrix 3x128", "top Alice", "matcher 2"]


@pytest.mark.parametrize("wal", [False, True], ids=["rollback-journal", "wal"])
def test_read_only_gallery_in_a_read_only_folder(rng, wal):
    """Fault: a WAL-mode gallery (converted with an sqlite3 shell) in a folder we may not write could not be
    opened read-only at all (`attempt to write a readonly database`: SQLite wants its -shm file)."""
    # Not tmp_path: pytest's base folder is private to root, and the root case runs as nobody.
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o755)
        folder = Path(tmp) / "ro"
        folder.mkdir()
        path = folder / "people.db"
        _make_gallery(path, rng, wal=wal)
        before = sorted(p.name for p in folder.iterdir()), sha(path), path.stat().st_mtime_ns
        assert _in_read_only_folder(_read_everything, folder, path) == EXPECTED
        assert (sorted(p.name for p in folder.iterdir()), sha(path), path.stat().st_mtime_ns) == before


def test_read_only_open_over_an_interrupted_write_says_what_to_do(rng):
    """A hot journal can only be rolled back by a writer; reading past it (immutable) could see half a write."""
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o755)
        folder = Path(tmp) / "ro"
        folder.mkdir()
        path = folder / "people.db"
        _make_gallery(path, rng, wal=True)
        # A writer killed mid-transaction leaves <name>-journal beside a rollback-journal file; here a stand-in
        # whose mere presence must stop the immutable fallback.
        (folder / "people.db-journal").write_bytes(b"\x00" * 512)
        lines = _in_read_only_folder(_read_everything, folder, path)
        assert len(lines) == 1 and lines[0].startswith("GalleryError") and "interrupted write" in lines[0], lines


def test_read_only_open_writes_nothing_even_as_root(tmp_path, rng):
    """Where permission bits do not stop writes (root), a read-only Gallery and the matcher still leave the
    file's bytes, its mtime and the folder exactly as they were."""
    path = tmp_path / "people.db"
    _make_gallery(path, rng)
    path.chmod(0o444)
    before = sorted(p.name for p in tmp_path.iterdir()), sha(path), path.stat().st_mtime_ns
    assert _read_everything(path) == EXPECTED
    assert (sorted(p.name for p in tmp_path.iterdir()), sha(path), path.stat().st_mtime_ns) == before


def _cli_list(path: Path) -> list[str]:
    """`streamer gallery list --json` in this process: its exit status and stdout."""
    from streamer.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["gallery", "list", "--gallery", str(path), "--json"])
    return [f"exit {code}", out.getvalue().strip()]


def test_gallery_list_on_a_read_only_gallery(tmp_path, rng):
    """Fault: `gallery list` opened the gallery for writing, so a file it may not write was refused."""
    scratch = tmp_path / "scratch.db"
    _make_gallery(scratch, rng)
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o755)
        folder = Path(tmp) / "ro"
        folder.mkdir()
        path = folder / "people.db"
        _make_gallery(path, rng)
        code, listing = _in_read_only_folder(_cli_list, folder, path, warm_up=lambda: _cli_list(scratch))
        assert code == "exit 0" and '"Alice"' in listing and '"Bob"' in listing, (code, listing)



def test_find_on_a_read_only_gallery(tmp_path, engine, media_dir):
    """Fault: `find` (FaceEngine.find given a path) opened the gallery for writing, so a file it may not
    write was refused although finding only reads."""
    photos = media_dir / "face_recognition/examples"
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o755)
        folder = Path(tmp) / "ro"
        folder.mkdir()
        path = folder / "people.db"
        with Gallery(path) as g:
            engine.enroll(g, "Barack Obama", [photos / "obama.jpg"])
        scratch = tmp_path / "scratch.db"
        shutil.copy(path, scratch)

        def find(gallery: Path) -> list[str]:
            try:
                return [f.name or "unknown" for f in engine.find(photos / "obama2.jpg", gallery)]
            except GalleryError as exc:
                return [f"GalleryError: {exc}"]

        # The warm-up, still as root, loads every model session the child will use.
        assert _in_read_only_folder(find, folder, path, warm_up=lambda: find(scratch)) == ["Barack Obama"]


# ------------------------------------------------------------------------------ removal and readers

# Another process reading the gallery as fast as it can, never waiting for a lock: the longest time it
# could not read, and what it saw of `name` (1 present, 0 gone) in order.
READER = """
import json, sqlite3, sys, threading, time
conn = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True, timeout=0, isolation_level=None)
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
seen, last_ok, longest, busy = [], time.monotonic(), 0.0, 0
print("reading", flush=True)
while not stop.is_set():
    try:
        present = conn.execute("SELECT count(*) FROM people WHERE name = ?", (sys.argv[2],)).fetchone()[0]
    except sqlite3.OperationalError:
        busy += 1
    else:
        now = time.monotonic()
        longest, last_ok = max(longest, now - last_ok), now
        if not seen or seen[-1] != present:
            seen.append(present)
    time.sleep(0.001)
print(json.dumps({"longest_s": longest, "busy": busy, "seen": seen}))
"""


def test_remove_never_locks_readers_out_while_the_file_is_rebuilt(tmp_path, rng):
    """Fault: `remove` ran an in-place VACUUM, which holds the file exclusively for as long as it rewrites it
    (half a minute at 500k faces): every reader was locked out, and a running matcher kept naming the
    removed person from its last copy all that time."""
    path = tmp_path / "people.db"
    _build_large(path, rng, people=200, faces_each=1000, dim=16)
    reference = tmp_path / "copy.db"
    shutil.copy(path, reference)
    conn = sqlite3.connect(reference)
    started = time.perf_counter()
    conn.execute("VACUUM")  # what an in-place rebuild of this file locks readers out for
    vacuum_s = time.perf_counter() - started
    conn.close()
    reader = subprocess.Popen([sys.executable, "-c", READER, str(path), "p00007"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().strip() == "reading"
        time.sleep(0.05)
        with Gallery(path, create=False) as g:
            assert g.remove("p00007") == 1000
            assert "p00007" not in g and len(g) == 199
        time.sleep(0.05)
        out, _ = reader.communicate("", timeout=10)
    finally:
        reader.kill()
    result = json.loads(out)
    assert result["seen"] == [1, 0]
    assert result["longest_s"] < max(vacuum_s / 2, 0.05), (result, vacuum_s)
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers == ["copy.db", "people.db"]  # no journal, no half-built copy
    raw = path.read_bytes()
    assert b"p00007" not in raw


def test_a_writer_waiting_during_a_rebuild_writes_to_the_new_file(tmp_path, rng):
    """The rebuilt file is renamed over the old one: a writer that opened the old one must not write there."""
    path = tmp_path / "people.db"
    with Gallery(path) as g:
        g.add("Alice", unit(rng, 1), EMB)
        g.add("Mallory", unit(rng, 1), EMB)
    other = Gallery(path, create=False)  # opened before the rebuild, as a second `streamer gallery add` would be
    try:
        with Gallery(path, create=False) as g:
            g.remove("Mallory")
        other.add("Bob", unit(rng, 1), EMB)
    finally:
        other.close()
    with Gallery(path, create=False, readonly=True) as g:
        assert [p.name for p in g.people()] == ["Alice", "Bob"]


@pytest.mark.slow
def test_a_running_pipeline_publishes_a_locked_gallery_and_keeps_naming(tmp_path):
    """End to end: a lock held for seconds on a running `streamer run` gallery is a pipeline.status
    `gallery: stale` event, then `ok`, and identities keep coming with her name; the run is never killed."""
    import socket as socket_module

    from streamer.publish.subscriber import EventSubscriber

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    gallery = tmp_path / "people.db"
    subprocess.run([sys.executable, "-m", "streamer", "gallery", "add", "Eileen Collins",
                    str(repo / "sample_videos/astronaut.jpg"), "--gallery", str(gallery)],
                   check=True, env=env, capture_output=True)  # fmt: skip
    with socket_module.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        endpoint = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    config = tmp_path / "run.yaml"
    config.write_text(f"sources: [{{url: {repo / 'sample_videos/astronaut.mp4'}, live: true, loop: true}}]\n"
                      f"publish: {{endpoint: '{endpoint}'}}\n")
    run = subprocess.Popen([sys.executable, "-m", "streamer", "run", "--config", str(config), "--gallery",
                            str(gallery), "--quiet"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True)  # fmt: skip
    events = []
    try:
        with EventSubscriber(endpoint, timeout_ms=200) as subscriber:
            def until(test, timeout_s):
                deadline = time.monotonic() + timeout_s
                while time.monotonic() < deadline and run.poll() is None:
                    event = subscriber.receive(200)
                    if event is not None:
                        events.append(event)
                        if test(event):
                            return event
                pytest.fail(f"not seen in {timeout_s} s; exit {run.poll()}")

            until(lambda e: e.kind == "identity" and e.name == "Eileen Collins", 90)
            locker = hold_lock(gallery, 4.0)
            stale = until(lambda e: e.kind == "pipeline.status" and e.gallery == "stale", 10)
            assert "locked" in stale.detail, stale.detail
            back = until(lambda e: e.kind == "pipeline.status" and e.gallery == "ok", 15)
            locker.wait(timeout=10)
            assert "readable again" in back.detail
            mark = len(events)
            until(lambda e: e.kind == "identity" and e.name == "Eileen Collins", 30)
            assert all(e.kind != "pipeline.status" or e.gallery is not None for e in events[mark:])
    finally:
        run.terminate()
        code = run.wait(timeout=60)
    assert code == 0, run.stderr.read()
