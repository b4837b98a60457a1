"""Score `streamer verify --pairs PAIRS.csv --json` output against the pairs' `same` labels.

    streamer verify --pairs ../shared/media/pairs.csv --json | python tools/score_pairs.py ../shared/media/pairs.csv

Prints accuracy at the engine's own decision (`verified`, i.e. the shipped threshold), the wrong accepts
and wrong rejects behind it, ROC AUC of the distances, and, for reference only, the best single
threshold on these pairs (tuned on the test data, so not a number to ship). `score` is importable
(tools/degrade_pairs.py scores its degraded copies with it).
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from scipy.stats import rankdata


def read_labels(pairs_csv: Path) -> dict[tuple[str, str], int]:
    with open(pairs_csv, newline="") as handle:
        return {(r["file_a"], r["file_b"]): int(r["same"]) for r in csv.DictReader(handle)}


def score(rows: Sequence[Mapping], labels: Mapping[tuple[str, str], int]) -> dict:
    """Accuracy at the shipped threshold (a failed pair counts as "not verified"), ROC AUC over the
    pairs that were compared, and the error counts."""
    errors = [r for r in rows if r.get("error")]
    scored = [r for r in rows if not r.get("error")]
    same = np.array([labels[(r["file_a"], r["file_b"])] for r in scored], bool)
    distance = np.array([r["distance"] for r in scored], np.float64)
    verified = np.array([bool(r["verified"]) for r in scored], bool)
    all_same = np.array([labels[(r["file_a"], r["file_b"])] for r in rows], bool)
    # Pairs that failed (no face) count as "not verified", as the CLI reports them.
    decisions = np.array([bool(r.get("verified")) for r in rows], bool)
    accuracy = float(np.mean(decisions == all_same))
    # ROC AUC = P(distance of a different pair > distance of a same pair) (Mann-Whitney U).
    ranks = rankdata(-distance)
    n_pos, n_neg = int(same.sum()), int((~same).sum())
    auc = (ranks[same].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg) if n_pos and n_neg else float("nan")
    candidates = np.unique(distance)
    best = max(((np.mean((distance < t) == same), t) for t in candidates), key=lambda x: x[0])
    return {
        "pairs": len(rows),
        "failed_pairs": len(errors),
        "accuracy_at_shipped_threshold": round(accuracy, 4),
        "wrong_accepts": int(np.sum(decisions & ~all_same)),
        "wrong_rejects": int(np.sum(~decisions & all_same)),
        "accuracy_scored_pairs_only": round(float(np.mean(verified == same)), 4) if len(scored) else None,
        "roc_auc": round(float(auc), 5),
        "best_threshold_on_these_pairs": round(float(best[1]), 4),
        "best_accuracy_on_these_pairs": round(float(best[0]), 4),
    }


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    labels = read_labels(Path(sys.argv[1]))
    rows = [json.loads(line) for line in sys.stdin if line.strip()]
    print(json.dumps(score(rows, labels)))


if __name__ == "__main__":
    main()
