"""How long `Matcher.match` stalls while a large gallery changes under a running matcher.

    python tools/gallery_reload_bench.py                       (500k faces, 512-D, in a temp folder)
    python tools/gallery_reload_bench.py --gallery /tmp/g500k.db --keep   (build once, reuse after)

    mkdir /tmp/old-tree && git archive COMMIT streamer | tar -x -C /tmp/old-tree   (the code at COMMIT)
    PYTHONPATH=/tmp/old-tree python tools/gallery_reload_bench.py --gallery /tmp/g500k.db --keep

Builds a synthetic gallery (random unit vectors, `--per-person` faces each) through the Gallery API, opens
it the way `streamer run` does (`open_matcher`), then calls `match` in a loop, as the detect thread does for
each batch of faces, while another process changes the file: it enrols a new person, and later removes
them (which also rebuilds the file). Reports the median call, the longest call ("stall") in the quiet
phase and around each change, how long each change took to show in the answers, and calls that raised.
The PYTHONPATH form runs the same measurement against another checkout, for a before/after comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

EMBEDDER = "bench-512"
ADDED = "zz-added-by-bench"  # sorts last, like a name the bench never generated

_CHANGE = """
import sys, numpy as np
from streamer.match.gallery import Gallery
path, action, dim = sys.argv[1], sys.argv[2], int(sys.argv[3])
vector = np.random.default_rng(12345).standard_normal((1, dim)).astype(np.float32)
vector /= np.linalg.norm(vector)
with Gallery(path, create=False) as g:
    g.add(sys.argv[4], vector, sys.argv[5]) if action == "add" else g.remove(sys.argv[4])
"""


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def build(path: Path, faces: int, dim: int, per_person: int) -> None:
    from streamer.match.gallery import Gallery

    rng = np.random.default_rng(0)
    people = -(-faces // per_person)
    started = time.monotonic()
    with Gallery(path) as gallery:
        chunk = 5000  # people per transaction: bounded memory, a few seconds each
        for first in range(0, people, chunk):
            entries = []
            for p in range(first, min(people, first + chunk)):
                n = min(per_person, faces - p * per_person)
                entries.append((f"person{p:07d}", unit_rows(rng, n, dim), None))
            gallery.add_many(entries, EMBEDDER)
    print(f"built {path}: {faces} faces of {people} people in {time.monotonic() - started:.1f} s", file=sys.stderr)


def gallery_faces(path: Path) -> int:
    from streamer.match.gallery import Gallery

    with Gallery(path, create=False, readonly=True) as gallery:
        return sum(p.faces for p in gallery.people(EMBEDDER))


def change(path: Path, action: str, dim: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _CHANGE, str(path), action, str(dim), ADDED, EMBEDDER])


def measure(path: Path, dim: int, quiet_s: float, settle_s: float, timeout_s: float) -> dict:
    from streamer.match.matcher import open_matcher

    spec = SimpleNamespace(id=EMBEDDER, metric="cosine", threshold=0.4)
    opened = time.monotonic()
    gallery, matcher = open_matcher(path, spec)
    queries = unit_rows(np.random.default_rng(7), 4, dim)  # four unknown faces...
    added = np.random.default_rng(12345).standard_normal((1, dim)).astype(np.float32)
    queries = np.vstack([queries, added / np.linalg.norm(added)])  # ...and the one the bench enrols
    matcher.match(queries)  # the first load, as the detect worker does at start
    first_load_s = time.monotonic() - opened

    def loop(until, stop_when=None) -> dict:
        durations, errors, seen_at = [], 0, None
        start = time.monotonic()
        while True:
            now = time.monotonic()
            if until(now - start, seen_at):
                break
            t0 = time.perf_counter()
            try:
                names = [m.name for m in matcher.match(queries)]
            except Exception as exc:  # noqa: BLE001 - what the old code does under a lock is part of the result
                errors += 1
                names = None
                last_error = f"{type(exc).__name__}: {exc}"
            durations.append(time.perf_counter() - t0)
            if names is not None and stop_when is not None and seen_at is None and stop_when(names[-1]):
                seen_at = time.monotonic() - start
            time.sleep(0.005)  # a frame's worth of other work between batches
        out = {
            "calls": len(durations),
            "median_ms": round(1000 * statistics.median(durations), 2) if durations else None,
            "max_ms": round(1000 * max(durations), 1) if durations else None,
            "errors": errors,
        }
        if errors:
            out["last_error"] = last_error
        if stop_when is not None:
            out["visible_after_s"] = None if seen_at is None else round(seen_at, 2)
        return out

    result = {"first_load_s": round(first_load_s, 2)}
    result["quiet"] = loop(lambda t, seen: t >= quiet_s)
    for action, visible in (("add", lambda name: name == ADDED), ("remove", lambda name: name != ADDED)):
        proc = change(path, action, dim)
        phase = loop(lambda t, seen: (seen is not None and t >= seen + settle_s) or t >= timeout_s, visible)
        proc.wait()
        phase["writer_exit"] = proc.returncode
        result[action] = phase
    matcher_close = getattr(matcher, "close", None)
    if matcher_close is not None:
        matcher_close()
    gallery.close()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faces", type=int, default=500_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--per-person", type=int, default=5)
    parser.add_argument("--gallery", type=Path, help="gallery file to build (or reuse, with --keep)")
    parser.add_argument("--keep", action="store_true", help="keep the gallery file, and reuse it if it fits")
    parser.add_argument("--quiet-s", type=float, default=3.0, help="matching before any change")
    parser.add_argument("--settle-s", type=float, default=2.0, help="matching after a change became visible")
    parser.add_argument("--timeout-s", type=float, default=90.0, help="give up on a change after this long")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    tmp = None
    if args.gallery is None:
        tmp = tempfile.TemporaryDirectory(prefix="gallery-bench-")
        args.gallery = Path(tmp.name) / "people.db"
    try:
        if not (args.keep and args.gallery.exists() and gallery_faces(args.gallery) == args.faces):
            if args.gallery.exists():
                args.gallery.unlink()
            build(args.gallery, args.faces, args.dim, args.per_person)
        result = {"faces": args.faces, "dim": args.dim, "code": os.environ.get("PYTHONPATH") or "this checkout"}
        result.update(measure(args.gallery, args.dim, args.quiet_s, args.settle_s, args.timeout_s))
    finally:
        if tmp is not None:
            tmp.cleanup()
        elif not args.keep and args.gallery.exists():
            args.gallery.unlink()
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['faces']} faces x {result['dim']}-D ({result['code']}); first load {result['first_load_s']} s")
        for phase in ("quiet", "add", "remove"):
            r = result[phase]
            extra = "" if phase == "quiet" else f", visible after {r['visible_after_s']} s"
            errors = f", {r['errors']} errors ({r.get('last_error')})" if r["errors"] else ""
            print(f"  {phase:6s} {r['calls']:5d} calls, median {r['median_ms']} ms, longest {r['max_ms']} ms"
                  f"{extra}{errors}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
