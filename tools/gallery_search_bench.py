"""1:N search by gallery size, and the shared (PostgreSQL) gallery's load and propagation times.

    python tools/gallery_search_bench.py                         (1k, 10k, 100k; a throwaway cluster)
    python tools/gallery_search_bench.py --sizes 1000,10000 --url postgresql://USER:PW@127.0.0.1/bench
    python tools/gallery_search_bench.py --json out/gallery_search.json

For each size N: N synthetic identities (one random unit vector each, 128-D as dlib_resnet's), enrolled
through the gallery API into PostgreSQL (PgGallery) and into SQLite (Gallery) for comparison. Reports:
- load: `snapshot` (gallery -> the (N, D) matrix) and a background Matcher ready to answer (snapshot +
  index), median of --repeat, for both stores;
- search: `Matcher.match` on a batch of B faces (B = 1 and --batch), per face, median of --repeat x 20;
- propagation (PostgreSQL): host A enrols or removes a person, host B's background Matcher (polling every
  0.25 s, as in `streamer run`) answers with the change; median and max of --repeat tries, each at a
  random point of the poll period. An enrolment
  shows after B's reload (which includes loading N faces); a removal is hidden before the reload.
Without --url, a cluster is made with tests/postgres.py (initdb/pg_ctl on PATH or Debian's) and removed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

EMBEDDER = "dlib_resnet_v1"
DIM = 128
METRIC, THRESHOLD = "euclidean", 0.6  # dlib_resnet's
CHUNK = 5000  # identities per enrolment transaction


def unit_rows(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def fill(gallery, vectors: np.ndarray) -> float:
    started = time.perf_counter()
    for first in range(0, len(vectors), CHUNK):
        gallery.enrol([(f"id{i:07d}", vectors[i:i + 1], None) for i in range(first, min(first + CHUNK, len(vectors)))],
                      EMBEDDER)
    return time.perf_counter() - started


def timed(call, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def load_and_search(gallery, vectors: np.ndarray, batch: int, repeat: int) -> dict:
    from streamer.match.matcher import Matcher

    out = {"snapshot_s": timed(lambda: gallery.snapshot(EMBEDDER), repeat)}

    def ready():
        Matcher(gallery, EMBEDDER, METRIC, THRESHOLD, background=True).close()

    out["matcher_ready_s"] = timed(ready, repeat)
    matcher = Matcher(gallery, EMBEDDER, METRIC, THRESHOLD, background=True)
    try:
        rng = np.random.default_rng(1)
        for b in (1, batch):
            picks = rng.integers(0, len(vectors), b)
            queries = vectors[picks] + rng.normal(0, 0.01, (b, DIM)).astype(np.float32)
            found = matcher.match(queries)
            assert [m.name for m in found] == [f"id{i:07d}" for i in picks], "the bench matched the wrong people"
            per_batch = timed(lambda q=queries: matcher.match(q), repeat * 20)
            out[f"match_per_face_ms_batch{b}"] = per_batch / b * 1000
    finally:
        matcher.close()
    return out


def propagation(url: str, repeat: int, size: int) -> dict:
    """Host A's call runs on its own thread (a removal's VACUUM FULL keeps the call busy after its commit)
    while host B's answers are watched; each try starts with B's index current (no reload under way)."""
    from streamer.match.gallery_pg import PgGallery
    from streamer.match.matcher import Matcher

    rng = np.random.default_rng(2)
    enrol, remove = [], []
    with PgGallery(url, create=False) as host_a, PgGallery(url, create=False, readonly=True) as host_b:
        matcher = Matcher(host_b, EMBEDDER, METRIC, THRESHOLD, background=True)
        try:
            for i in range(repeat):
                face = unit_rows(rng, 1)
                name = f"zz-bench-{i}"
                steps = ((lambda n=name, f=face: host_a.add(n, f, EMBEDDER), name, enrol, size + 1),
                         (lambda n=name: host_a.remove(n), None, remove, size))
                for action, expected, times, faces_after in steps:
                    time.sleep(rng.uniform(0, 0.25))  # at a random point of B's poll period, as a real change
                    started = time.monotonic()
                    writer = threading.Thread(target=action)
                    writer.start()
                    while matcher.match(face)[0].name != expected:
                        if time.monotonic() - started > 120:
                            raise RuntimeError(f"host B never saw {expected!r}")
                        time.sleep(0.002)
                    times.append(time.monotonic() - started)
                    writer.join()
                    while matcher.status.faces != faces_after:  # B's reload done: the next try starts quiet
                        time.sleep(0.01)
        finally:
            matcher.close()
    return {"enrol_median_ms": statistics.median(enrol) * 1000, "enrol_max_ms": max(enrol) * 1000,
            "remove_median_ms": statistics.median(remove) * 1000, "remove_max_ms": max(remove) * 1000}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000", help="gallery sizes (identities), comma separated")
    parser.add_argument("--url", help="an existing PostgreSQL database (its streamer schema is dropped first!)")
    parser.add_argument("--batch", type=int, default=32, help="faces per match call besides 1")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-sqlite", action="store_true", help="skip the SQLite comparison")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    import psycopg

    from streamer.match.gallery import Gallery
    from streamer.match.gallery_pg import PgGallery

    cluster = None
    if args.url is None:
        sys.path.insert(0, str(REPO / "tests"))
        from postgres import remove_cluster, start_cluster

        cluster = start_cluster()
    results = []
    try:
        base = args.url or cluster.url()
        for n in sizes:
            if cluster is not None:
                url = cluster.createdb(f"bench{n}")
            else:
                url = base
                with psycopg.connect(url, autocommit=True) as conn:
                    conn.execute("DROP SCHEMA IF EXISTS streamer CASCADE")
            vectors = unit_rows(np.random.default_rng(n), n)
            row: dict = {"identities": n, "dim": DIM}
            with PgGallery(url, create=True) as pg:
                row["pg_enrol_s"] = fill(pg, vectors)
                row["pg"] = load_and_search(pg, vectors, args.batch, args.repeat)
            row["propagation"] = propagation(url, args.repeat, n)
            if not args.no_sqlite:
                with tempfile.TemporaryDirectory() as folder, Gallery(Path(folder) / "bench.db") as lite:
                    row["sqlite_enrol_s"] = fill(lite, vectors)
                    row["sqlite"] = load_and_search(lite, vectors, args.batch, args.repeat)
            results.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    finally:
        if cluster is not None:
            remove_cluster(cluster)
    print(f"{'identities':>10} {'store':>7} {'enrol s':>8} {'snapshot ms':>12} {'matcher ms':>11} "
          f"{'match/face ms (1)':>18} {f'match/face ms ({args.batch})':>19}")
    for row in results:
        for store in ("pg", "sqlite"):
            if store not in row:
                continue
            r = row[store]
            print(f"{row['identities']:>10} {store:>7} {row[f'{store}_enrol_s']:>8.1f} {r['snapshot_s'] * 1000:>12.1f} "
                  f"{r['matcher_ready_s'] * 1000:>11.1f} {r['match_per_face_ms_batch1']:>18.3f} "
                  f"{r[f'match_per_face_ms_batch{args.batch}']:>19.3f}")
    print("propagation to another host's background matcher (poll 0.25 s), PostgreSQL LISTEN/NOTIFY:")
    for row in results:
        p = row["propagation"]
        print(f"{row['identities']:>10}  enrol median {p['enrol_median_ms']:.0f} ms (max {p['enrol_max_ms']:.0f}), "
              f"remove median {p['remove_median_ms']:.0f} ms (max {p['remove_max_ms']:.0f})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
