#!/usr/bin/env python3
"""One table from the engine's benchmark JSON and the PyTorch twin's (tools/torch_twin.py).

    python3 tools/bench_table.py ENGINE.json [ENGINE2.json ...] --torch TWIN.json [--torch TWIN2.json]
                                 [--markdown]

For each stage and batching it lists the engine rows, then the PyTorch rows of the same stage
and batching, with samples/s, ms/step, TFLOP/s, peak memory and device operations per step
(the engine's `launches_per_step`; "-" where a file has none, as the twin's); each PyTorch row also gets
"engine ÷ this": the engine's best padded samples/s for the same stage in the same precision
(its fastest mode and attention over every engine file) divided by that row's samples/s, so
> 1 means the engine is faster; "-" where the engine has no such row.
Files that cannot be read and rows that failed are printed as errors; a warning is printed
when the engine and the twin count different parameters or ran different configurations.
Stdlib only.
"""

import argparse
import json
import os
import sys

STAGE_ORDER = ("student", "teacher")
COLUMNS = ("stage", "batching", "source", "mode", "precision", "samples/s", "ms/step",
           "TFLOP/s", "peak MiB", "launches", "engine ÷ this")


def load(path):
    """(document, None) or (None, error message)."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        return None, f"cannot read {path}: {e}"
    if not isinstance(doc, dict) or not isinstance(doc.get("results"), list):
        return None, f"{path}: no `results` list"
    return doc, None


def num(row, key, fmt):
    v = row.get(key)
    return fmt.format(v) if isinstance(v, (int, float)) else "-"


def cells(row, source, ratio):
    """The table cells of one result row."""
    head = [row.get("stage", "?"), row.get("batching", "?"), source, row.get("mode", "-"),
            row.get("precision", "?")]
    if "error" in row:
        return head + [f"error: {row['error']}"] + [""] * (len(COLUMNS) - len(head) - 1)
    peak = row.get("peak_mem_bytes")
    return head + [
        num(row, "samples_per_s", "{:.0f}"),
        num(row, "ms_per_step", "{:.3f}"),
        num(row, "tflops", "{:.2f}"),
        f"{peak / 2**20:.0f}" if isinstance(peak, (int, float)) else "-",
        num(row, "launches_per_step", "{:.0f}"),
        ratio,
    ]


def engine_reference(engines, stage, precision):
    """The best samples/s among the engine rows of `stage`, padded batching, `precision`,
    without error, over every engine file and mode (eager, graphs)."""
    best = [r["samples_per_s"] for _, doc in engines for r in doc["results"]
            if r.get("stage") == stage and r.get("batching") == "padded"
            and r.get("precision") == precision and "error" not in r
            and isinstance(r.get("samples_per_s"), (int, float))]
    return max(best) if best else None


def build_rows(engines, twin):
    """Table rows: (stage, batching) groups, engine rows first, then the twin's."""
    tagged = []  # (row, source, is_twin)
    many = len(engines) > 1
    for path, doc in engines:
        label = str(doc.get("engine", "engine"))
        if many:
            label += f" [{os.path.basename(path)}]"
        tagged += [(r, label, False) for r in doc["results"]]
    if twin is not None:
        tagged += [(r, f"pytorch {twin.get('version', '')}".strip(), True)
                   for r in twin["results"]]
    groups = []
    for r, _, _ in tagged:
        key = (r.get("stage", "?"), r.get("batching", "?"))
        if key not in groups:
            groups.append(key)
    rank = {s: i for i, s in enumerate(STAGE_ORDER)}
    groups.sort(key=lambda k: (rank.get(k[0], len(rank)), k[0]))  # stable: batching order kept
    out = []
    for key in groups:
        for want_twin in (False, True):
            for r, source, is_twin in tagged:
                if (r.get("stage", "?"), r.get("batching", "?")) != key or is_twin != want_twin:
                    continue
                ratio = ""
                if is_twin and "error" not in r:
                    ref = engine_reference(engines, key[0], r.get("precision"))
                    mine = r.get("samples_per_s")
                    ratio = f"{ref / mine:.2f}" if ref and mine else "-"
                out.append(cells(r, source, ratio))
    return out


def render_plain(rows):
    """Aligned columns: text left, numbers right. An error text does not widen its column."""
    widths = [max([len(c)] + [len(r[i]) for r in rows if not r[i].startswith("error:")])
              for i, c in enumerate(COLUMNS)]

    def line(r):
        return "  ".join(c.ljust(w) if j < 5 or c.startswith("error:") else c.rjust(w)
                         for j, (c, w) in enumerate(zip(r, widths))).rstrip()

    return "\n".join([line(COLUMNS), line(["-" * w for w in widths])] + [line(r) for r in rows])


def render_markdown(rows):
    """A pipe table, numeric columns right-aligned."""
    out = ["| " + " | ".join(COLUMNS) + " |",
           "|" + "|".join("---" if i < 5 else "---:" for i in range(len(COLUMNS))) + "|"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


def warnings(engines, twin):
    """Lines about engine/twin mismatches (parameter counts, configuration)."""
    out = []
    if twin is None:
        return out
    for path, doc in engines:
        ep, tp = doc.get("params"), twin.get("params")
        if ep != tp:
            out.append(f"warning: parameter counts differ: {path} {ep}, twin {tp}")
        ec, tc = doc.get("config") or {}, twin.get("config") or {}
        diff = sorted(k for k in set(ec) & set(tc) if ec[k] != tc[k] and k not in ("steps", "warmup"))
        if diff:
            out.append(f"warning: configurations differ ({path} vs twin): "
                       + ", ".join(f"{k} {ec[k]} vs {tc[k]}" for k in diff))
    return out


def merge_twins(twins):
    """One twin document from several files: the first file's fields, every file's rows in
    order; a warning for each file whose configuration or parameters differ from the
    first's. (None, []) when there is none."""
    if not twins:
        return None, []
    first_path, first = twins[0]
    merged = dict(first)
    merged["results"] = [r for _, doc in twins for r in doc["results"]]
    out = []
    for path, doc in twins[1:]:
        for key in ("config", "params"):
            if doc.get(key) != first.get(key):
                out.append(f"warning: {path} and {first_path} differ in {key}: "
                           f"{json.dumps(doc.get(key))} vs {json.dumps(first.get(key))}")
    return merged, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("engine", nargs="+", help="JSON written by `mgkd-train bench --json`")
    ap.add_argument("--torch", metavar="TWIN.json", action="append", default=[],
                    help="JSON written by tools/torch_twin.py; several (runs of the same "
                    "configuration, e.g. its rows in two parts) are read as one")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    a = ap.parse_args(argv)
    engines, errors = [], []
    for path in a.engine:
        doc, err = load(path)
        if err:
            errors.append(f"error: {err}")
        else:
            engines.append((path, doc))
    twins = []
    for path in a.torch:
        doc, err = load(path)
        if err:
            errors.append(f"error: {err}")
        else:
            twins.append((path, doc))
    twin, merge_warnings = merge_twins(twins)
    for path, doc in engines + twins:
        print(f"{path}: {doc.get('engine', '?')} {doc.get('version', '')} on "
              f"{doc.get('device', '?')}, config {json.dumps(doc.get('config', {}))}")
    for line in errors + merge_warnings + warnings(engines, twin):
        print(line)
    rows = build_rows(engines, twin)
    if rows:
        print(render_markdown(rows) if a.markdown else render_plain(rows))
    return 0 if engines or twin else 1


if __name__ == "__main__":
    sys.exit(main())
