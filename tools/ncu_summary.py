#!/usr/bin/env python3
"""Time per kernel from an Nsight Compute CSV.

    ncu --clock-control none --metrics gpu__time_duration.sum --csv --page raw \
        --log-file prof.csv PROGRAM ...
    python3 tools/ncu_summary.py prof.csv [--top 30]

prints, per kernel name, the launches, the summed and mean time and the share of all kernel
time, largest first, then the totals. Standard library only.
"""

import argparse
import csv
import sys
from collections import defaultdict

METRIC = "gpu__time_duration.sum"
# Factor to microseconds for each unit ncu may print.
UNITS = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3,
         "s": 1e6, "second": 1e6}


def read_rows(path):
    """The kernel rows of the CSV as (name, microseconds); an error names the file."""
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        lines = [l for l in f if l.startswith('"')]  # ncu prefixes its own log lines with ==
    rows = list(csv.reader(lines))
    head = next((i for i, r in enumerate(rows) if "Kernel Name" in r and METRIC in r), None)
    if head is None:
        raise SystemExit(f"{path}: no header row with 'Kernel Name' and '{METRIC}'")
    cols = rows[head]
    name_col, time_col = cols.index("Kernel Name"), cols.index(METRIC)
    body = rows[head + 1:]
    factor = 1e-3  # ncu's default unit for this metric is ns
    if body and body[0][time_col] in UNITS:  # the units row
        factor = UNITS[body[0][time_col]]
        body = body[1:]
    out = []
    for r in body:
        if len(r) <= max(name_col, time_col):
            continue
        try:
            out.append((r[name_col], float(r[time_col].replace(",", "")) * factor))
        except ValueError:
            continue
    return out


def short(name, width=70):
    """A kernel name cut to `width` characters (cuBLAS names are long)."""
    return name if len(name) <= width else name[: width - 1] + "…"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", help="ncu --csv --page raw output")
    ap.add_argument("--top", type=int, default=30, help="kernels to list (default 30)")
    a = ap.parse_args()
    rows = read_rows(a.csv)
    if not rows:
        print(f"{a.csv}: no kernel rows", file=sys.stderr)
        return 1
    agg = defaultdict(lambda: [0, 0.0])
    for name, us in rows:
        agg[name][0] += 1
        agg[name][1] += us
    total = sum(us for _, us in rows)
    print(f"{'kernel':<70} {'launches':>8} {'total µs':>10} {'mean µs':>9} {'share':>6}")
    for name, (n, us) in sorted(agg.items(), key=lambda kv: -kv[1][1])[: a.top]:
        print(f"{short(name):<70} {n:>8} {us:>10.1f} {us / n:>9.2f} {100 * us / total:>5.1f}%")
    print(f"{'all kernels':<70} {len(rows):>8} {total:>10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
