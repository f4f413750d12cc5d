#!/usr/bin/env python3
"""Generate tests/fixtures/metrics_sklearn.json: random score/label cases with
scikit-learn's reference values, checked by tests/metrics.rs to 1e-9 (absolute).

Usage (from the repository root):
    python3 -m venv .venv && .venv/bin/pip install numpy scikit-learn
    .venv/bin/python tools/make_metrics_fixture.py

Scores are rounded to a fixed number of decimals before the reference values are computed.
Float arrays (scores, ROC points) are written as JSON *strings* holding Python's repr, which
round-trips exactly through a correctly rounded parser (Rust's `str::parse::<f64>`); JSON
numbers would go through serde_json's default float parser, which can be one ulp off (it
reads 0.9999999999999999 as 1.0, merging a tie). The scalar reference values stay numbers. All scores are probabilities,
so log_loss applies to every case; the "clip" case has exact 0/1 and sub-epsilon
probabilities on the wrong side, which pins down the clipping epsilon.
"""

import json
import os
import sys

import numpy as np
import sklearn
from sklearn.metrics import average_precision_score, log_loss, roc_auc_score, roc_curve

SEED = 20260611
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures",
                   "metrics_sklearn.json")


def separated(rng, n, rate, signal, decimals):
    """Labels ~ Bernoulli(rate) (both classes guaranteed) and probabilities
    sigmoid(signal * y + N(0, 1) + logit(rate)), rounded to `decimals`."""
    while True:
        y = (rng.random(n) < rate).astype(np.int64)
        if 0 < y.sum() < n:
            break
    z = signal * y + rng.standard_normal(n) + np.log(rate / (1 - rate))
    p = np.round(1.0 / (1.0 + np.exp(-z)), decimals)
    return [float(v) for v in p], [int(v) for v in y]


def clip_case():
    """Confident mistakes at and beyond the clipping bounds, plus ordinary rows."""
    p = [0.0, 1.0, 1e-20, 1e-300, 0.9999999999999999, 0.3, 0.7, 0.5, 0.0, 1.0]
    y = [1, 0, 1, 1, 0, 1, 0, 1, 0, 1]
    return p, y


def main():
    rng = np.random.default_rng(SEED)
    raw = [
        ("n7_continuous", *separated(rng, 7, 0.4, 0.3, 8)),
        ("n100_continuous", *separated(rng, 100, 0.3, 1.2, 8)),
        ("n5000_continuous", *separated(rng, 5000, 0.2, 1.0, 8)),
        ("n5000_ties_2dp", *separated(rng, 5000, 0.3, 1.5, 2)),
        ("n5000_imbalanced_4pct", *separated(rng, 5000, 0.04, 1.5, 4)),
        ("n10_clip", *clip_case()),
    ]
    cases = []
    for name, p, y in raw:
        pa, ya = np.asarray(p, dtype=np.float64), np.asarray(y)
        fpr, tpr, thr = roc_curve(ya, pa, drop_intermediate=False)
        case = {
            "name": name,
            "n": len(p),
            "positives": int(ya.sum()),
            "roc_auc": float(roc_auc_score(ya, pa)),
            "log_loss": float(log_loss(ya, pa)),
            "average_precision": float(average_precision_score(ya, pa)),
            # KS from scikit-learn's own ROC points (the first threshold, +inf, has
            # fpr = tpr = 0 and is left out of `roc_thresholds` because JSON has no inf).
            "ks": float(np.max(np.abs(tpr - fpr))),
            "scores": [repr(v) for v in p],
            "labels": y,
        }
        if len(p) <= 100:
            case["roc_fpr"] = [repr(float(v)) for v in fpr]
            case["roc_tpr"] = [repr(float(v)) for v in tpr]
            case["roc_thresholds"] = [repr(float(v)) for v in thr[1:]]
        cases.append(case)
    doc = {
        "generator": "tools/make_metrics_fixture.py",
        "seed": SEED,
        "sklearn_version": sklearn.__version__,
        "numpy_version": np.__version__,
        "python_version": sys.version.split()[0],
        "log_loss_clipping": "p clipped to [eps, 1-eps], eps = np.finfo(float64).eps",
        "cases": cases,
    }
    with open(OUT, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {OUT}: " + ", ".join(f"{c['name']} (n={c['n']}, pos={c['positives']})"
                                      for c in cases))


if __name__ == "__main__":
    main()
