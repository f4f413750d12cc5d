#!/usr/bin/env python3
"""A gradient-boosted baseline beside the student: LightGBM on per-user aggregates of an
mgkd dataset, trained on its train split, early-stopped on its valid split, measured on its
test split (the same rows the engine's ablation uses).

    python3 tools/gbm.py --data DIR --inputs student --seeds 5 --out gbm-student.json
    python3 tools/gbm.py --data DIR --inputs in-service --seeds 5 --out gbm-in-service.json
    mgkd-train ablation --data DIR --out REPORT --gbm gbm-student.json --gbm gbm-in-service.json
    python3 tools/gbm.py --data DIR --inputs student --out gbm.json --predictions gbm.csv
    mgkd-train compare --data DIR --split test student.csv gbm.csv   # a student's predict CSV

`--predictions` also writes the score of every row, the mean probability of the seeds' models,
in the CSV format of `mgkd-train predict` (`user_id` or `row`, `probability`, `logit`), so that
`mgkd-train compare` can test a model against the GBM on the same rows (DeLong's paired test).

`--soft-labels CSV` trains the trees on probabilities instead of the labels (LightGBM's
cross-entropy objective, which takes targets in [0, 1]): a teacher's scores from `mgkd-train
predict`, which makes the GBM a student distilled from that teacher's soft labels, or the
`default_probability` column of `mgkd-train synth --latents`, the generator's true
probability, i.e. a perfect teacher. Only the train rows' values are read; early stopping,
AUC and KS still use the labels, and the output records the file and its SHA-256:

    mgkd-train predict --data DIR --model teacher.safetensors --split train --out t.csv
    python3 tools/gbm.py --data DIR --inputs student --soft-labels t.csv --out gbm-soft.json

`--inputs student` reads what the student reads: the profile and the pre-service events (the
most recent `pre_len` of them, as the engine keeps). `--inputs in-service` reads the profile
and the in-service events (the most recent `in_len`), what the teacher reads. Features per
user: the profile as stored (numbers standardised, categorical ids as numbers); the number
of events kept; per categorical event field of a
vocabulary up to 64, the count of each id, and for larger vocabularies the number of distinct
ids and the most frequent one; per numeric event field, mean, std, min, max, sum, the most
recent value and the mean of the 3 most recent; per event type (the first categorical field,
when its vocabulary is at most 64) the sum of each numeric field; the most recent event's
categorical ids. The dataset is read with safetensors (shards as `safetensors.numpy`
dictionaries); nothing is written but `--out` (and `--predictions`).

Needs numpy, safetensors and lightgbm. LightGBM's settings (learning rate 0.02, 7 leaves, at
least 200 rows per leaf, half the features and 80 % of the rows per tree, early stopping after
200 rounds without a better valid AUC) were chosen on the valid split of the synthetic cohort
of docs/results.md (draw 12, student inputs: valid AUC 0.633, against 0.584 with 31 leaves,
learning rate 0.05 and the categorical ids as LightGBM categories, which over-fit their 100
levels on 16 000 rows). Each seed changes LightGBM's row and feature sub-sampling; AUC and KS are computed here (AUC by ranks with ties counted half, as the
engine does). The output records the SHA-256 of the dataset's `dataset.json`, which the
ablation checks before it shows the rows.
"""

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time

import numpy as np

SMALL_VOCAB = 64


def fail(msg):
    print(f"gbm.py: error: {msg}", file=sys.stderr)
    sys.exit(2)


def load_manifest(data):
    path = os.path.join(data, "dataset.json")
    try:
        raw = open(path, "rb").read()
    except OSError as e:
        fail(f"{path}: {e.strerror}")
    try:
        m = json.loads(raw)
    except ValueError as e:
        fail(f"{path}: not JSON ({e})")
    if not isinstance(m, dict) or m.get("format") != "mgkd-dataset":
        fail(f"{path}: not an mgkd dataset manifest")
    if not m.get("has_label"):
        fail(f"{path}: the dataset has no labels")
    try:
        schema = m["schema"]
        for key in ("profile_num", "profile_cat", "event_cat", "event_num"):
            [f["name"] for f in schema[key]]
        [f["vocab"] for f in schema["event_cat"]]
        int(schema["pre_len"]), int(schema["in_len"])
        [sh["file"] for sh in m["shards"]]
    except (KeyError, TypeError, ValueError) as e:
        fail(f"{path}: the manifest lacks or mistypes a field the features need ({e!r})")
    return m, hashlib.sha256(raw).hexdigest()


def kept_window(offsets, limit):
    """Per row, the range of its most recent `limit` events."""
    start, end = offsets[:-1], offsets[1:]
    return np.maximum(start, end - limit), end


def seq_features(shard, prefix, schema, limit, names):
    """Aggregates of one sequence kind's kept events, one row per user."""
    offsets = shard[f"{prefix}offsets"].astype(np.int64)
    cat = shard[f"{prefix}cat"]
    num = shard[f"{prefix}num"]
    n = len(offsets) - 1
    lo, hi = kept_window(offsets, limit)
    counts = hi - lo
    # Events kept, and the row of each.
    row = np.repeat(np.arange(n), counts)
    idx = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts) + lo[row]
    cols = [counts.astype(np.float64)]
    names.append(f"{prefix}count")
    nonempty = counts > 0
    last = hi - 1
    for f, field in enumerate(schema["event_cat"]):
        v, ids = field["vocab"], cat[idx, f].astype(np.int64)
        if v <= SMALL_VOCAB:
            per = np.bincount(row * v + ids, minlength=n * v).reshape(n, v)
            for k in range(v):
                cols.append(per[:, k].astype(np.float64))
                names.append(f"{prefix}{field['name']}={k}")
        else:
            pair = np.unique(row * v + ids)
            cols.append(np.bincount(pair // v, minlength=n).astype(np.float64))
            names.append(f"{prefix}{field['name']}_distinct")
            # The most frequent id (the smallest among ties), NaN for an empty row.
            keys, freq = np.unique(row * v + ids, return_counts=True)
            r = keys // v
            order = np.lexsort((keys % v, -freq, r))
            first = order[np.r_[True, r[order][1:] != r[order][:-1]]] if len(order) else order
            mode = np.full(n, np.nan)
            mode[r[first]] = (keys % v)[first]
            cols.append(mode)
            names.append(f"{prefix}{field['name']}_mode")
        lastid = np.full(n, np.nan)
        lastid[nonempty] = cat[last[nonempty], f]
        cols.append(lastid)
        names.append(f"{prefix}{field['name']}_last_id")
    type_field = schema["event_cat"][0] if schema["event_cat"] else None
    for j, field in enumerate(schema["event_num"]):
        x = num[idx, j].astype(np.float64)
        s = np.bincount(row, weights=x, minlength=n)
        s2 = np.bincount(row, weights=x * x, minlength=n)
        c = np.maximum(counts, 1)
        mean = np.where(nonempty, s / c, np.nan)
        var = np.where(nonempty, s2 / c - np.nan_to_num(mean) ** 2, np.nan)
        mn, mx = np.full(n, np.nan), np.full(n, np.nan)
        if len(idx):
            starts = np.flatnonzero(np.r_[True, row[1:] != row[:-1]])
            rows_ne = row[starts]
            mn[rows_ne] = np.minimum.reduceat(x, starts)
            mx[rows_ne] = np.maximum.reduceat(x, starts)
        lastv = np.full(n, np.nan)
        lastv[nonempty] = num[last[nonempty], j]
        recent = np.zeros(n)
        k3 = np.minimum(counts, 3)
        for back in range(3):
            ok = k3 > back
            recent[ok] += num[hi[ok] - 1 - back, j]
        recent = np.where(nonempty, recent / np.maximum(k3, 1), np.nan)
        base = f"{prefix}{field['name']}"
        for vals, nm in ((mean, "mean"), (np.sqrt(np.maximum(var, 0)), "std"), (mn, "min"),
                         (mx, "max"), (s, "sum"), (lastv, "last"), (recent, "recent3")):
            cols.append(vals)
            names.append(f"{base}_{nm}")
        if type_field is not None and type_field["vocab"] <= SMALL_VOCAB:
            v = type_field["vocab"]
            ids = cat[idx, 0].astype(np.int64)
            per = np.bincount(row * v + ids, weights=x, minlength=n * v).reshape(n, v)
            for k in range(v):
                cols.append(per[:, k])
                names.append(f"{base}_sum_{type_field['name']}={k}")
    return cols


def features(data, manifest, inputs):
    from safetensors.numpy import load_file

    schema = manifest["schema"]
    seq = ("pre_", schema["pre_len"]) if inputs == "student" else ("in_", schema["in_len"])
    xs, labels, splits, names = [], [], [], []
    for sh in manifest["shards"]:
        path = os.path.join(data, sh["file"])
        try:
            shard = load_file(path)
        except Exception as e:  # noqa: BLE001 (safetensors raises several kinds)
            fail(f"{path}: cannot read the shard ({e})")
        try:
            x, label, split, names = shard_features(shard, schema, seq)
        except (KeyError, IndexError, ValueError) as e:
            fail(f"{path}: a tensor is missing or does not match the manifest's schema ({e!r})")
        xs.append(x)
        labels.append(label)
        splits.append(split)
    return np.vstack(xs), np.concatenate(labels), np.concatenate(splits), names


def shard_features(shard, schema, seq):
    """The feature matrix of one shard, its labels and splits, and the feature names."""
    names = [f"profile_{f['name']}" for f in schema["profile_num"] + schema["profile_cat"]]
    cols = [shard["profile_num"][:, j].astype(np.float64) for j in range(len(schema["profile_num"]))]
    cols += [shard["profile_cat"][:, j].astype(np.float64) for j in range(len(schema["profile_cat"]))]
    cols += seq_features(shard, seq[0], schema, seq[1], names)
    x = np.column_stack(cols)
    if not (len(shard["label"]) == len(shard["split"]) == len(x)):
        raise ValueError("label, split and profile row counts differ")
    return x, shard["label"], shard["split"], names


def auc(scores, labels):
    """Mann–Whitney AUC, ties counted half."""
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    # Tied scores share the mean of their 1-based positions.
    start = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    end = np.r_[start[1:], len(s)]
    group = np.repeat(np.arange(len(start)), end - start)
    r = np.empty(len(s))
    r[order] = ((start + end + 1) / 2)[group]
    pos = labels == 1
    n1, n0 = pos.sum(), (~pos).sum()
    return float((r[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def ks(scores, labels):
    """max |TPR − FPR| over thresholds (ties move together)."""
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    tp, fp = np.cumsum(y == 1), np.cumsum(y == 0)
    cut = np.r_[s[1:] != s[:-1], True]
    return float(np.max(np.abs(tp[cut] / tp[-1] - fp[cut] / fp[-1])))


def row_keys(data, manifest):
    """Each row's key as `mgkd-train predict` writes it: the user id when the dataset has
    them, else the dataset row index. Returns (column name, keys)."""
    from safetensors.numpy import load_file

    if not manifest.get("has_user_id"):
        rows = sum(int(sh["rows"]) for sh in manifest["shards"])
        return "row", [str(r) for r in range(rows)]
    keys = []
    for sh in manifest["shards"]:
        path = os.path.join(data, sh["file"])
        shard = load_file(path)
        try:
            off, raw = shard["user_id_offsets"], shard["user_id_bytes"].tobytes()
            keys += [raw[off[i]:off[i + 1]].decode("utf-8") for i in range(len(off) - 1)]
        except (KeyError, IndexError, UnicodeDecodeError) as e:
            fail(f"{path}: the user ids cannot be read ({e!r})")
    return "user_id", keys


def read_soft_labels(path, column, keyed, train):
    """The soft label of every train row from the CSV `path`, keyed like `mgkd-train
    predict`'s output (`user_id` or `row`), read from `column`. Rows outside the train split
    may be absent (they are never trained on); a train row without a value, a key that is
    not in the dataset, a repeated key, or a value that is not a probability is an error
    naming the file and line. Returns (values, SHA-256 of the file)."""
    import csv

    key_column, keys = keyed
    index = {k: i for i, k in enumerate(keys)}
    values = np.full(len(keys), np.nan)
    try:
        raw = open(path, "rb").read()
    except OSError as e:
        fail(f"--soft-labels {path}: {e.strerror}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        fail(f"--soft-labels {path}: not UTF-8 text ({e})")
    reader = csv.reader(text.splitlines())
    header = next(reader, None)
    if header is None:
        fail(f"--soft-labels {path}: the file is empty")
    for need in (key_column, column):
        if need not in header:
            fail(f"--soft-labels {path}: line 1: no column {need!r} (the header is "
                 f"{','.join(header)}); the dataset's rows are keyed by {key_column!r}")
    ki, vi = header.index(key_column), header.index(column)
    for line, fields in enumerate(reader, start=2):
        if len(fields) != len(header):
            fail(f"--soft-labels {path}: line {line}: {len(fields)} fields, the header has "
                 f"{len(header)}")
        row = index.get(fields[ki])
        if row is None:
            fail(f"--soft-labels {path}: line {line}: {key_column} {fields[ki]!r} is not a "
                 f"row of the dataset")
        if not np.isnan(values[row]):
            fail(f"--soft-labels {path}: line {line}: {key_column} {fields[ki]!r} repeated")
        try:
            v = float(fields[vi])
        except ValueError:
            v = float("nan")
        if not 0.0 <= v <= 1.0:
            fail(f"--soft-labels {path}: line {line}: {column} {fields[vi]!r} is not a "
                 f"probability in [0, 1]")
        values[row] = v
    missing = np.flatnonzero(train & np.isnan(values))
    if len(missing):
        fail(f"--soft-labels {path}: {len(missing)} train rows have no value, the first "
             f"{key_column} {keys[missing[0]]}")
    return values, hashlib.sha256(raw).hexdigest()


def write_scores(f, keyed, probs):
    """The CSV of `mgkd-train predict`: key, probability, logit (log p − log(1 − p))."""
    column, keys = keyed
    if len(keys) != len(probs):
        fail(f"{len(keys)} row keys for {len(probs)} scores")
    with np.errstate(divide="ignore"):
        logits = np.log(probs) - np.log1p(-probs)
    f.write(f"{column},probability,logit\n")
    for k, p, z in zip(keys, probs, logits):
        f.write(f"{k},{float(p)!r},{float(z)!r}\n")


def write_atomic(path, write):
    """Writes `path` through a temporary file in its directory, renamed when complete."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".gbm-",
                               suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="mgkd dataset directory")
    ap.add_argument("--inputs", choices=["student", "in-service"], default="student",
                    help="what the GBM reads: the student's inputs (profile + pre-service) "
                         "or the teacher's (profile + in-service) [default: student]")
    ap.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 [default: 5]")
    ap.add_argument("--rounds", type=int, default=3000, help="most boosting rounds [default: 3000]")
    ap.add_argument("--out", required=True, help="JSON result file (written atomically)")
    ap.add_argument("--predictions", help="also write every row's score (the seeds' mean "
                    "probability) as a CSV in `mgkd-train predict`'s format (written atomically)")
    ap.add_argument("--soft-labels", metavar="CSV",
                    help="train on these probabilities instead of the labels (cross-entropy "
                         "against soft targets): a CSV keyed like `mgkd-train predict`'s, "
                         "e.g. a teacher's scores or `synth --latents`' true probabilities; "
                         "early stopping and every metric still use the labels")
    ap.add_argument("--soft-column", default="probability",
                    help="the --soft-labels column to read [default: probability]")
    args = ap.parse_args()
    if args.seeds < 1:
        fail("--seeds must be at least 1")
    data_dir = os.path.realpath(args.data)
    outputs = [("--out", args.out)]
    if args.predictions:
        outputs.append(("--predictions", args.predictions))
    for flag, path in outputs:
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            fail(f"{flag} {path}: the directory {parent} does not exist")
        if os.path.commonpath([os.path.realpath(parent), data_dir]) == data_dir:
            fail(f"{flag} {path} lies inside the dataset {args.data}: choose another place")
    if args.predictions and os.path.abspath(args.predictions) == os.path.abspath(args.out):
        fail("--predictions and --out name the same file")
    if args.soft_labels:
        for flag, path in outputs:
            if os.path.abspath(path) == os.path.abspath(args.soft_labels):
                fail(f"{flag} {path} is the --soft-labels input: choose another output")
    try:
        import lightgbm as lgb
    except ImportError:
        fail("lightgbm is not installed (pip install lightgbm)")
    t0 = time.time()
    manifest, sha = load_manifest(args.data)
    x, y, split, names = features(args.data, manifest, args.inputs)
    parts = {k: split == v for k, v in (("train", 0), ("valid", 1), ("test", 2))}
    for k, m in parts.items():
        if len(np.unique(y[m])) < 2:
            fail(f"{args.data}: the {k} split needs both classes")
    keyed = row_keys(args.data, manifest) if args.soft_labels or args.predictions else None
    target, soft = y, None
    if args.soft_labels:
        target, soft_sha = read_soft_labels(args.soft_labels, args.soft_column, keyed,
                                            parts["train"])
        soft = {"file": args.soft_labels, "column": args.soft_column, "sha256": soft_sha}
    runs = []
    score_sum = np.zeros(len(y))
    for seed in range(args.seeds):
        objective = "cross_entropy" if soft else "binary"
        params = dict(objective=objective, learning_rate=0.02, num_leaves=7, min_data_in_leaf=200,
                      feature_fraction=0.5, bagging_fraction=0.8, bagging_freq=1, seed=seed,
                      metric="auc", verbose=-1, deterministic=True, force_col_wise=True)
        tr = lgb.Dataset(x[parts["train"]], target[parts["train"]], feature_name=names,
                         categorical_feature=[], free_raw_data=False)
        va = lgb.Dataset(x[parts["valid"]], y[parts["valid"]], reference=tr)
        model = lgb.train(params, tr, num_boost_round=args.rounds, valid_sets=[va],
                          callbacks=[lgb.early_stopping(200, verbose=False)])
        res = {"seed": seed, "trees": int(model.best_iteration)}
        if args.predictions:
            score_sum += model.predict(x, num_iteration=model.best_iteration)
        for k in ("valid", "test"):
            p = model.predict(x[parts[k]], num_iteration=model.best_iteration)
            res[f"{k}_auc"] = auc(p, y[parts[k]])
            res[f"{k}_ks"] = ks(p, y[parts[k]])
        runs.append(res)
        print(f"seed {seed}: {res['trees']} trees, valid AUC {res['valid_auc']:.4f}, "
              f"test AUC {res['test_auc']:.4f}, KS {res['test_ks']:.4f}", file=sys.stderr)
    out = {
        "format": "mgkd-gbm",
        "version": 1,
        "inputs": args.inputs,
        "dataset_sha256": sha,
        "data": args.data,
        "features": len(names),
        "rows": {k: int(m.sum()) for k, m in parts.items()},
        "seconds": time.time() - t0,
        "runs": runs,
    }
    if soft:
        out["soft_labels"] = soft
    if args.predictions:
        write_atomic(args.predictions, lambda f: write_scores(f, keyed, score_sum / args.seeds))
    write_atomic(args.out, lambda f: json.dump(out, f, indent=1))
    a = np.array([r["test_auc"] for r in runs])
    print(f"{args.inputs} inputs: test AUC {a.mean():.4f} ± {a.std(ddof=1) if len(a) > 1 else 0:.4f} "
          f"over {len(a)} seeds; {len(names)} features; {out['seconds']:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
