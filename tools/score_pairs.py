"""Score `streamer verify --pairs PAIRS.csv --json` output against the pairs' `same` labels.

    streamer verify --pairs ../shared/media/pairs.csv --json | python tools/score_pairs.py ../shared/media/pairs.csv

Prints accuracy at the engine's own decision (`verified`, i.e. the shipped threshold), ROC AUC of the
distances, and, for reference only, the best single threshold on these pairs (tuned on the test data,
so not a number to ship).
"""

from __future__ import annotations

import csv
import json
import sys

import numpy as np
from scipy.stats import rankdata


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    with open(sys.argv[1], newline="") as handle:
        labels = {(r["file_a"], r["file_b"]): int(r["same"]) for r in csv.DictReader(handle)}
    rows = [json.loads(line) for line in sys.stdin if line.strip()]
    errors = [r for r in rows if r.get("error")]
    scored = [r for r in rows if not r.get("error")]
    same = np.array([labels[(r["file_a"], r["file_b"])] for r in scored])
    distance = np.array([r["distance"] for r in scored], np.float64)
    verified = np.array([r["verified"] for r in scored])
    all_same = np.array([labels[(r["file_a"], r["file_b"])] for r in rows])
    # Pairs that failed (no face) count as "not verified", as the CLI reports them.
    decisions = np.array([bool(r.get("verified")) for r in rows])
    accuracy = float(np.mean(decisions == all_same.astype(bool)))
    # ROC AUC = P(distance of a different pair > distance of a same pair) (Mann-Whitney U).
    ranks = rankdata(-distance)
    n_pos, n_neg = int(same.sum()), int((1 - same).sum())
    auc = (ranks[same == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    candidates = np.unique(distance)
    best = max(((np.mean((distance < t) == same.astype(bool)), t) for t in candidates), key=lambda x: x[0])
    print(
        json.dumps(
            {
                "pairs": len(rows),
                "failed_pairs": len(errors),
                "accuracy_at_shipped_threshold": round(accuracy, 4),
                "accuracy_scored_pairs_only": round(float(np.mean(verified == same.astype(bool))), 4),
                "roc_auc": round(float(auc), 5),
                "best_threshold_on_these_pairs": round(float(best[1]), 4),
                "best_accuracy_on_these_pairs": round(float(best[0]), 4),
            }
        )
    )


if __name__ == "__main__":
    main()
