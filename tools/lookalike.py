"""The look-alike pair of the shared photos: the two photos of different people whose embeddings are
nearest, with the embedder in use (default dlib_resnet). "Different" is pairs.csv's same=0, not the
identity labels, which are per source repository (the same actress is labelled in two of them).

    STREAMER_MEDIA_DIR=/work/shared/media .venv/bin/python tools/lookalike.py [--top 5]
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

import numpy as np

from streamer.engine import FaceEngine
from streamer.errors import InputError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--media", default=os.environ.get("STREAMER_MEDIA_DIR", "/work/shared/media"))
    parser.add_argument("--top", type=int, default=5, help="how many nearest pairs to print")
    args = parser.parse_args()
    media = Path(args.media)
    with open(media / "pairs.csv", newline="") as f:
        pairs = [(r["file_a"], r["file_b"]) for r in csv.DictReader(f) if r["same"] == "0"]
    with open(media / "identities.csv", newline="") as f:
        identity = {r["file"]: r["identity"] for r in csv.DictReader(f)}
    vectors: dict[str, np.ndarray] = {}
    with FaceEngine() as engine:
        for name in sorted({f for pair in pairs for f in pair}):
            try:
                vectors[name] = engine.embed_primary(media / name)[1]
            except InputError:
                continue
        threshold = engine.embedder.spec.threshold
        scored = sorted(
            (engine.embedder.distance(vectors[a], vectors[b]), a, b) for a, b in pairs if a in vectors and b in vectors
        )
    print(f"{len(scored)} different-people pairs, threshold {threshold}")
    for d, a, b in scored[: args.top]:
        print(f"{d:.4f}  {a} ({identity.get(a, '?')})  {b} ({identity.get(b, '?')})")


if __name__ == "__main__":
    main()
