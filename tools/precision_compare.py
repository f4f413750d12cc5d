#!/usr/bin/env python3
"""Seed-by-seed comparison of two `mgkd-train ablation` runs that differ in precision.

    python3 tools/precision_compare.py F32_DIR/results.json BF16_DIR/results.json \
        [--max-diff 0.003] [--markdown]

For every (variant, seed) trained in both runs (teacher included), prints the test AUC of
each run and their difference, then per variant the largest |difference| and the paired
gain over the plain student in each run. Exits 1 when a |difference| exceeds --max-diff
(issue 15: bf16 test AUCs within 0.003 of f32's, seed by seed), 2 when the files cannot be
compared (unreadable, no common runs, different data). Stdlib only.
"""

import argparse
import json
import sys


def load(path):
    """(document, {(variant, seed): test AUC}, precisions); ValueError naming the file and
    the run for anything else than an ablation's results.json."""
    with open(path) as f:
        try:
            doc = json.load(f)
        except ValueError as e:
            raise ValueError(f"{path}: not JSON: {e}") from None
    runs = doc.get("runs") if isinstance(doc, dict) else None
    if not isinstance(runs, list):
        raise ValueError(f"{path}: no `runs` list")
    precisions, table = set(), {}
    for k, r in enumerate(runs):
        where = f"{path}: runs[{k}]"
        if not isinstance(r, dict):
            raise ValueError(f"{where}: not an object")
        variant, seed, auc = r.get("variant"), r.get("seed"), r.get("test_auc")
        if not isinstance(variant, str) or not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"{where}: `variant` (a string) and `seed` (an integer) expected")
        if auc is None:
            continue  # a run that failed has no test AUC
        if not isinstance(auc, (int, float)) or isinstance(auc, bool):
            raise ValueError(f"{where}: `test_auc` is not a number")
        config = r.get("config", {})
        precisions.add(config.get("precision") if isinstance(config, dict) else None)
        table[(variant, seed)] = float(auc)
    return doc, table, precisions


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("a", help="results.json of the first ablation (e.g. f32)")
    ap.add_argument("b", help="results.json of the second ablation (e.g. bf16)")
    ap.add_argument("--max-diff", type=float, default=0.003,
                    help="largest allowed |test AUC difference| of one run (default 0.003)")
    ap.add_argument("--markdown", action="store_true", help="print Markdown tables")
    a = ap.parse_args(argv)
    try:
        doc_a, ta, pa = load(a.a)
        doc_b, tb, pb = load(a.b)
    except (OSError, ValueError) as e:
        print(f"error: {e}")
        return 2
    if doc_a.get("data") != doc_b.get("data"):
        print(f"error: different datasets: {doc_a.get('data')} and {doc_b.get('data')}")
        return 2
    keys = sorted(set(ta) & set(tb), key=lambda k: (k[0] != "teacher", k[0] != "plain", k))
    if not keys:
        print("error: no (variant, seed) trained in both runs")
        return 2
    name_a = "/".join(sorted(str(p) for p in pa))
    name_b = "/".join(sorted(str(p) for p in pb))
    print(f"{a.a}: precision {name_a}; {a.b}: precision {name_b}; data {doc_a.get('data')}")

    def table(head, rows):
        if a.markdown:
            print("| " + " | ".join(head) + " |")
            print("|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|")
            for r in rows:
                print("| " + " | ".join(r) + " |")
        else:
            w = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
            print("  ".join(h.ljust(w[i]) if i == 0 else h.rjust(w[i]) for i, h in enumerate(head)))
            for r in rows:
                print("  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)))
        print()

    worst = 0.0
    rows = []
    for v, s in keys:
        d = tb[(v, s)] - ta[(v, s)]
        worst = max(worst, abs(d))
        flag = "" if abs(d) <= a.max_diff else "  > max"
        rows.append([v, str(s), f"{ta[(v, s)]:.4f}", f"{tb[(v, s)]:.4f}", f"{d:+.4f}{flag}"])
    table(["variant", "seed", f"test AUC {name_a}", f"test AUC {name_b}", "difference"], rows)

    summary = []
    for v in dict.fromkeys(k[0] for k in keys):
        seeds = [s for (w, s) in keys if w == v]
        diffs = [tb[(v, s)] - ta[(v, s)] for s in seeds]
        gain = ""
        if v not in ("teacher", "plain"):
            both = [s for s in seeds if ("plain", s) in ta and ("plain", s) in tb]
            if both:
                ga = sum(ta[(v, s)] - ta[("plain", s)] for s in both) / len(both)
                gb = sum(tb[(v, s)] - tb[("plain", s)] for s in both) / len(both)
                gain = f"{ga:+.4f} / {gb:+.4f}"
        summary.append([v, str(len(seeds)), f"{max(abs(x) for x in diffs):.4f}",
                        f"{sum(diffs) / len(diffs):+.4f}", gain])
    table(["variant", "seeds", "max abs difference", "mean difference",
           f"paired gain over plain ({name_a} / {name_b})"], summary)
    ok = worst <= a.max_diff
    print(f"largest |difference| {worst:.4f}: {'within' if ok else 'beyond'} {a.max_diff}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
