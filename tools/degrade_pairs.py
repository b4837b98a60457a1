"""Degraded copies of the pair photos, and their verification scores.

    python tools/degrade_pairs.py make  /work/shared/media/pairs.csv out/degraded
    python tools/degrade_pairs.py score /work/shared/media/pairs.csv out/degraded [-- streamer verify options]

`make` writes, for every photo named in PAIRS.csv (paths relative to STREAMER_MEDIA_DIR or --root),
one copy per degradation under OUT/<kind>/<same relative path>:

    downscaled  longer side to at most 256 px (INTER_AREA): faces of about 30-80 px, as on a far camera
    rotated     in-plane rotation by 20 degrees (alternating sign per photo), canvas grown, black fill
    jpeg        JPEG quality 12 (blocking, lost detail)
    darkened    gamma 2.2 then x0.5, Gaussian sensor noise sigma 3: a dim room
    mixed       each photo gets one of the four above (chosen from a hash of its path, so reproducible)

Degrading both photos of a pair is harsher than a clean enrolment against a poor camera frame; it is
the same recipe for every change measured, which is what matters here. The copies are media: keep
them under out/ (git-ignored), never commit them.

`score` runs `streamer verify --pairs PAIRS.csv --root OUT/<kind> --json` for each kind (and the clean
photos) and prints one JSON line per kind from tools/score_pairs.py's `score`: accuracy at the shipped
threshold and ROC AUC. Extra arguments after `--` go to `streamer verify`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from score_pairs import read_labels, score

KINDS = ("downscaled", "rotated", "jpeg", "darkened")


def _seed(rel: str) -> int:
    return int.from_bytes(hashlib.sha256(rel.encode()).digest()[:4], "little")


def downscale(image: np.ndarray, rel: str) -> np.ndarray:
    h, w = image.shape[:2]
    f = min(1.0, 256 / max(h, w))
    if f == 1.0:
        return image.copy()
    return cv2.resize(image, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)


def rotate(image: np.ndarray, rel: str) -> np.ndarray:
    angle = 20.0 if _seed(rel) % 2 else -20.0
    h, w = image.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    cos, sin = abs(m[0, 0]), abs(m[0, 1])
    nw, nh = int(h * sin + w * cos), int(h * cos + w * sin)
    m[0, 2] += nw / 2 - w / 2
    m[1, 2] += nh / 2 - h / 2
    return cv2.warpAffine(image, m, (nw, nh), flags=cv2.INTER_LINEAR, borderValue=(0, 0, 0))


def jpeg(image: np.ndarray, rel: str) -> np.ndarray:
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 12])
    assert ok
    return cv2.imdecode(data, cv2.IMREAD_COLOR)


def darken(image: np.ndarray, rel: str) -> np.ndarray:
    rng = np.random.default_rng(_seed(rel))
    x = (image.astype(np.float32) / 255.0) ** 2.2 * 0.5 * 255.0
    x += rng.normal(0.0, 3.0, x.shape).astype(np.float32)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


DEGRADE = {"downscaled": downscale, "rotated": rotate, "jpeg": jpeg, "darkened": darken}


def mixed(image: np.ndarray, rel: str) -> np.ndarray:
    return DEGRADE[KINDS[_seed(rel + "#mixed") % len(KINDS)]](image, rel)


DEGRADE["mixed"] = mixed


def _photos(pairs_csv: Path) -> list[str]:
    return sorted({name for pair in read_labels(pairs_csv) for name in pair})


def make(pairs_csv: Path, root: Path, out: Path) -> None:
    for rel in _photos(pairs_csv):
        image = cv2.imread(str(root / rel), cv2.IMREAD_COLOR)
        if image is None:
            raise SystemExit(f"{root / rel}: not a readable image")
        for kind, degrade in DEGRADE.items():
            target = out / kind / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            # .jpg photos are rewritten at quality 100 so that only the jpeg kind adds visible artefacts
            if not cv2.imwrite(str(target), degrade(image, rel),
                               [cv2.IMWRITE_JPEG_QUALITY, 100] if target.suffix.lower() in (".jpg", ".jpeg") else []):
                raise SystemExit(f"cannot write {target}")


def score_all(pairs_csv: Path, root: Path, out: Path, verify_args: list[str]) -> None:
    labels = read_labels(pairs_csv)
    streamer = str(Path(sys.executable).with_name("streamer"))
    for kind, kind_root in [("clean", root), *((k, out / k) for k in DEGRADE)]:
        cmd = [streamer, "verify", "--pairs", str(pairs_csv), "--root", str(kind_root), "--json", *verify_args]
        run = subprocess.run(cmd, check=False, capture_output=True, text=True, env=os.environ)
        if run.returncode not in (0, 2):  # 2 = some pairs had no face: scored as "not verified"
            raise SystemExit(f"{' '.join(cmd)} failed ({run.returncode}): {run.stderr.strip()[-500:]}")
        rows = [json.loads(line) for line in run.stdout.splitlines() if line.strip()]
        print(json.dumps({"kind": kind, **score(rows, labels)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("make", "score"))
    parser.add_argument("pairs", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--root", type=Path, help="folder the pair paths are relative to (default: the CSV's folder)")
    parser.add_argument("verify_args", nargs="*", help="after --: passed to streamer verify")
    args = parser.parse_args()
    root = args.root or args.pairs.parent
    if args.action == "make":
        make(args.pairs, root, args.out)
    else:
        score_all(args.pairs, root, args.out, args.verify_args)


if __name__ == "__main__":
    main()
