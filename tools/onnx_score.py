#!/usr/bin/env python3
"""Score a dataset directory through an exported student (`mgkd-train export`) with
onnxruntime, independently of the engine, and optionally compare with `mgkd-train predict`.

    python tools/onnx_score.py student.onnx DATA_DIR [--split test] [--batch 512]
        [--pad batch|limit] [--junk-padding] [--sort-by-length] [--out scores.csv]
        [--compare predict.csv --tol 1e-5] [--json]

Needs numpy, safetensors and onnxruntime. The dataset is read as docs/model.md §3 lays it
out (dataset.json, safetensors shards); each row keeps its `pre_len` most recent pre-service
events, oldest first (§2.3), exactly what a scorer in production has to do with a raw
applicant's history. `--pad limit` pads every batch to the limit instead of to the batch's
longest sequence; `--junk-padding` fills padded slots with random valid ids and numbers (the
graph must ignore them); `--sort-by-length` batches rows of similar length together, so that
some batches hold only applicants without pre-service events.

With `--compare`, every probability is checked against predict's CSV (matched by user id, or
by row index when the dataset has no user ids); the exit status is 1 when any differs by more
than `--tol`. `--json` prints one summary object (rows, empty rows, rows at the limit, the
largest differences) on stdout.
"""

import argparse
import csv
import json
import os
import sys

import numpy as np
import onnxruntime as ort
from safetensors.numpy import load_file

SPLITS = {"train": 0, "valid": 1, "test": 2}


def load_dataset(data_dir):
    """The manifest and the rows of every shard, concatenated (offsets made global)."""
    with open(os.path.join(data_dir, "dataset.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    parts = {k: [] for k in ("split", "profile_num", "profile_cat", "pre_cat", "pre_num")}
    pre_offsets, user_ids = [np.zeros(1, dtype=np.uint64)], []
    base = 0
    for shard in manifest["shards"]:
        t = load_file(os.path.join(data_dir, shard["file"]))
        for k in parts:
            parts[k].append(t[k])
        pre_offsets.append(t["pre_offsets"][1:] + np.uint64(base))
        base += int(t["pre_offsets"][-1])
        if manifest.get("has_user_id"):
            off, raw = t["user_id_offsets"], t["user_id_bytes"].tobytes()
            user_ids += [raw[off[i]:off[i + 1]].decode("utf-8") for i in range(len(off) - 1)]
    data = {k: np.concatenate(v) for k, v in parts.items()}
    data["pre_offsets"] = np.concatenate(pre_offsets).astype(np.int64)
    data["user_ids"] = user_ids if manifest.get("has_user_id") else None
    return manifest, data


def batch_inputs(data, rows, limit, pad, input_names, rng):
    """The graph's inputs for dataset rows `rows` (the most recent `limit` events each)."""
    starts, ends = data["pre_offsets"][rows], data["pre_offsets"][rows + 1]
    lens = np.minimum(ends - starts, limit)
    seq = limit if pad == "limit" else max(int(lens.max(initial=0)), 1)
    n = len(rows)
    ec = data["pre_cat"].shape[1] if data["pre_cat"].ndim == 2 else 0
    ed = data["pre_num"].shape[1] if data["pre_num"].ndim == 2 else 0
    if rng is not None:
        vocabs = data["event_vocabs"]
        cat = np.stack([rng.integers(0, v, size=(n, seq)) for v in vocabs], axis=2) if ec else \
            np.zeros((n, seq, 0), dtype=np.int64)
        num = rng.normal(0.0, 5.0, size=(n, seq, ed)).astype(np.float32)
    else:
        cat = np.zeros((n, seq, ec), dtype=np.int64)
        num = np.zeros((n, seq, ed), dtype=np.float32)
    for i, (e, l) in enumerate(zip(ends, lens)):
        if l > 0:
            cat[i, :l] = data["pre_cat"][e - l:e]
            num[i, :l] = data["pre_num"][e - l:e]
    feeds = {
        "profile_num": data["profile_num"][rows].astype(np.float32),
        "profile_cat": data["profile_cat"][rows].astype(np.int64),
        "pre_cat": cat.astype(np.int64),
        "pre_num": num,
        "pre_len": lens.astype(np.int64),
    }
    return {k: v for k, v in feeds.items() if k in input_names}, lens


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("data")
    ap.add_argument("--split", choices=sorted(SPLITS), default=None)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--pad", choices=["batch", "limit"], default="batch")
    ap.add_argument("--junk-padding", action="store_true")
    ap.add_argument("--sort-by-length", action="store_true")
    ap.add_argument("--out")
    ap.add_argument("--compare")
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    sess = ort.InferenceSession(a.model, providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    if meta.get("mgkd.format") != "mgkd-student-onnx":
        sys.exit(f"{a.model}: not an exported mgkd student (mgkd.format is "
                 f"{meta.get('mgkd.format')!r})")
    schema = json.loads(meta["mgkd.schema"])
    limit = int(schema["pre_len"])
    input_names = {i.name for i in sess.get_inputs()}

    manifest, data = load_dataset(a.data)
    if manifest["schema"] != schema:
        sys.exit(f"{a.data}: the dataset's schema differs from the model's mgkd.schema")
    data["event_vocabs"] = [f["vocab"] for f in schema["event_cat"]]
    rows = np.arange(len(data["split"]), dtype=np.int64)
    if a.split is not None:
        rows = rows[data["split"] == SPLITS[a.split]]
    kept = np.minimum(data["pre_offsets"][rows + 1] - data["pre_offsets"][rows], limit)
    order = np.argsort(kept, kind="stable") if a.sort_by_length else np.arange(len(rows))
    rng = np.random.default_rng(12345) if a.junk_padding else None

    prob = np.empty(len(rows), dtype=np.float64)
    logit = np.empty(len(rows), dtype=np.float64)
    seq_dims = set()
    for b0 in range(0, len(rows), a.batch):
        idx = order[b0:b0 + a.batch]
        feeds, _ = batch_inputs(data, rows[idx], limit, a.pad, input_names, rng)
        if "pre_cat" in feeds:
            seq_dims.add(feeds["pre_cat"].shape[1])
        p, z = sess.run(["probability", "logit"], feeds)
        prob[idx], logit[idx] = p, z

    keys = [data["user_ids"][r] for r in rows] if data["user_ids"] is not None else \
        [str(r) for r in rows]
    if a.out:
        with open(a.out, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["user_id" if data["user_ids"] is not None else "row",
                        "probability", "logit"])
            for k, p, z in zip(keys, prob, logit):
                w.writerow([k, repr(float(p)), repr(float(z))])

    summary = {
        "rows": int(len(rows)),
        "empty_rows": int((kept == 0).sum()),
        "rows_at_limit": int((kept == limit).sum()),
        "limit": limit,
        "batches": int((len(rows) + a.batch - 1) // a.batch),
        "seq_dims": sorted(int(s) for s in seq_dims),
    }
    failed = False
    if a.compare:
        with open(a.compare, newline="", encoding="utf-8") as f:
            ref = {r[0]: float(r[1]) for r in list(csv.reader(f))[1:]}
        missing = [k for k in keys if k not in ref]
        if missing or len(ref) != len(keys):
            sys.exit(f"{a.compare}: rows differ from the scored ones ({len(ref)} there, "
                     f"{len(keys)} scored, {len(missing)} missing, e.g. {missing[:3]})")
        diff = np.abs(prob - np.array([ref[k] for k in keys]))
        worst = int(np.argmax(diff)) if len(diff) else 0
        summary.update({
            "max_abs_diff": float(diff.max(initial=0.0)),
            "max_abs_diff_empty": float(diff[kept == 0].max(initial=0.0)),
            "max_abs_diff_at_limit": float(diff[kept == limit].max(initial=0.0)),
            "worst_row": keys[worst] if len(keys) else None,
            "over_tol": int((diff > a.tol).sum()),
            "tol": a.tol,
        })
        failed = summary["over_tol"] > 0
    if a.json:
        print(json.dumps(summary))
    else:
        for k, v in summary.items():
            print(f"{k}: {v}")
    if failed:
        print(f"FAILED: {summary['over_tol']} probabilities differ by more than {a.tol}",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
