#!/usr/bin/env python3
"""Checks the signal targets of a dataset written by `mgkd-train synth` (docs/synth.md).

Usage: tools/synth_check.py DATASET_DIR

Reads every shard with safetensors.numpy.load_file and reports, on the test split of models
fitted on the train split:
  - profile-only logistic regression AUC (target 0.62-0.70),
  - hand-made pre-service features (+ profile) AUC,
  - hand-made in-service features AUC with gradient boosting (target >= 0.85),
  - correlations between pre-service and in-service behaviour shares (users with both),
  - length statistics and the share of empty pre-service sequences.
Needs numpy, safetensors, scikit-learn.
"""

import json
import os
import sys

import numpy as np
from safetensors.numpy import load_file
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from scipy import sparse

GAMBLING = (990, 1000)
STYLE = (600, 624)
N_TYPES = 14  # ids 1..13 and the background group (14..63)


def load(dirname):
    with open(os.path.join(dirname, "dataset.json")) as f:
        manifest = json.load(f)
    parts = [load_file(os.path.join(dirname, s["file"])) for s in manifest["shards"]]
    out = {}
    for key in ("label", "split", "profile_num", "profile_cat"):
        out[key] = np.concatenate([p[key] for p in parts])
    for kind in ("pre", "in"):
        offs, cats, nums, base = [], [], [], 0
        for i, p in enumerate(parts):
            o = p[f"{kind}_offsets"].astype(np.int64)
            offs.append((o if i == 0 else o[1:]) + base)
            base += int(o[-1])
            cats.append(p[f"{kind}_cat"])
            nums.append(p[f"{kind}_num"])
        out[f"{kind}_offsets"] = np.concatenate(offs)
        out[f"{kind}_cat"] = np.concatenate(cats)
        out[f"{kind}_num"] = np.concatenate(nums)
    return manifest, out


def seq_features(offsets, cat, num):
    """Per-user hand-made features of one sequence kind."""
    n_users = len(offsets) - 1
    lens = np.diff(offsets)
    row = np.repeat(np.arange(n_users), lens)
    safe = np.maximum(lens, 1)

    def count(mask):
        return np.bincount(row, weights=mask.astype(np.float64), minlength=n_users)

    ty = cat[:, 0].astype(np.int64)
    group = np.where(ty >= 14, 13, ty - 1)
    feats = {"len": lens.astype(np.float64), "log_len": np.log1p(lens)}
    for g in range(N_TYPES):
        c = count(group == g)
        feats[f"type{g + 1}_n"] = c
        feats[f"type{g + 1}_share"] = c / safe
    merchant = cat[:, 1]
    hour = (cat[:, 3].astype(np.int64) - 1) % 24
    channel = cat[:, 2]
    for name, mask in (
        ("gamble", (merchant >= GAMBLING[0]) & (merchant < GAMBLING[1])),
        ("style", (merchant >= STYLE[0]) & (merchant < STYLE[1])),
        ("night", hour < 6),
        ("mobile", channel == 3),
    ):
        c = count(mask)
        feats[f"{name}_n"] = c
        feats[f"{name}_share"] = c / safe
    # Trends of the numbers along the sequence: slope on the centred position.
    pos = np.arange(len(row)) - offsets[row]
    centred = pos - (lens[row] - 1) / 2.0
    denom = np.bincount(row, weights=centred**2, minlength=n_users)
    denom = np.where(denom > 0, denom, 1.0)
    for j, name in enumerate(("amount", "dt")):
        x = num[:, j].astype(np.float64)
        feats[f"{name}_mean"] = np.bincount(row, weights=x, minlength=n_users) / safe
        feats[f"{name}_trend"] = np.bincount(row, weights=centred * x, minlength=n_users) / denom
    names = sorted(feats)
    return names, np.column_stack([feats[k] for k in names]), feats


def auc_lr(x_train, y_train, x_test, y_test):
    model = LogisticRegression(max_iter=2000, C=1.0)
    model.fit(x_train, y_train)
    return roc_auc_score(y_test, model.decision_function(x_test))


def auc_gb(x_train, y_train, x_test, y_test):
    model = HistGradientBoostingClassifier(max_iter=300, learning_rate=0.08, random_state=0)
    model.fit(x_train, y_train)
    return roc_auc_score(y_test, model.predict_proba(x_test)[:, 1])


def main():
    if len(sys.argv) != 2:
        print(__doc__)
        sys.exit(2)
    manifest, d = load(sys.argv[1])
    y, split = d["label"].astype(np.int64), d["split"]
    train, test = split == 0, split == 2
    n = len(y)
    print(f"users {n}, default rate {y.mean():.4f}; per split:",
          ", ".join(f"{s['name']} {s['rows']} rows {s['default_rate']:.4f}" for s in manifest["splits"]))

    # Profile only: one-hot categories + standardised numbers, logistic regression.
    pnum = d["profile_num"].astype(np.float64)
    print(f"profile_num train mean |max| {np.abs(pnum[train].mean(0)).max():.4f}, "
          f"std range {pnum[train].std(0).min():.4f}..{pnum[train].std(0).max():.4f}")
    enc = OneHotEncoder(handle_unknown="ignore")
    pcat = enc.fit_transform(d["profile_cat"][train])
    x_prof_tr = sparse.hstack([pcat, sparse.csr_matrix(pnum[train])]).tocsr()
    x_prof_te = sparse.hstack([enc.transform(d["profile_cat"][test]), sparse.csr_matrix(pnum[test])]).tocsr()
    auc_prof = auc_lr(x_prof_tr, y[train], x_prof_te, y[test])
    print(f"AUC profile-only logistic regression (target 0.62-0.70): {auc_prof:.4f}")

    results = {}
    feats = {}
    for kind in ("pre", "in"):
        names, x, f = seq_features(d[f"{kind}_offsets"], d[f"{kind}_cat"], d[f"{kind}_num"])
        feats[kind] = f
        lens = f["len"]
        print(f"{kind}-service lengths: mean {lens.mean():.1f}, median {np.median(lens):.0f}, "
              f"p99 {np.percentile(lens, 99):.0f}, max {lens.max():.0f}, empty {np.mean(lens == 0):.3f}")
        en = d[f"{kind}_num"].astype(np.float64)
        print(f"  {kind}_num pooled mean {en.mean(0).round(4)}, std {en.std(0).round(4)}")
        results[kind] = auc_gb(x[train], y[train], x[test], y[test])
        print(f"AUC {kind}-service features, gradient boosting: {results[kind]:.4f}")
        sc = StandardScaler().fit(x[train])
        lr = auc_lr(sc.transform(x[train]), y[train], sc.transform(x[test]), y[test])
        print(f"AUC {kind}-service features, logistic regression: {lr:.4f}")
        xp = np.hstack([x, pnum, d["profile_cat"].astype(np.float64)])
        both = auc_gb(xp[train], y[train], xp[test], y[test])
        print(f"AUC {kind}-service features + profile, gradient boosting: {both:.4f}")

    # Pre-service -> in-service behaviour correlations (users with both sequences).
    both = (feats["pre"]["len"] > 0) & (feats["in"]["len"] > 0)
    print(f"pre->in correlations over {both.sum()} users with both sequences:")
    for name in ("night_share", "style_share", "gamble_share", "mobile_share", "type6_share"):
        c = np.corrcoef(feats["pre"][name][both], feats["in"][name][both])[0, 1]
        print(f"  corr(pre {name}, in {name}) = {c:.3f}")
    distress = feats["in"]["type4_share"] + feats["in"]["type5_share"] + feats["in"]["gamble_share"]
    for name in ("night_share", "style_share", "gamble_share", "type6_share"):
        c = np.corrcoef(feats["pre"][name][both], distress[both])[0, 1]
        print(f"  corr(pre {name}, in late+missed+gambling share) = {c:.3f}")


if __name__ == "__main__":
    main()
