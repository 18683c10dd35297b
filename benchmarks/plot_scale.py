"""Log-log plot of stage time vs units from the JSON lines of ``bench_pipeline_scale.py``, and the fitted slopes.

    .venv/bin/python benchmarks/plot_scale.py docs/results/pipeline_scale.jsonl --out docs/figures/scale_time_vs_n.png

One line per (stage, identify test; records labelled "before..." apart; a record's ``series`` apart, hollow
markers when it names the machine's load): every recorded run of that stage at its n (a run that reused generated data
counts like any other). The slope of log(seconds) on log(n) over the points is printed (and drawn in the legend):
1 is linear in n; below 1 means fixed costs still weigh at the small sizes.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict

import numpy as np


def series(lines):
    """{(stage, test): [(n, seconds, load1)]} from the bench's JSON records."""
    out = defaultdict(list)
    for rec in lines:
        for stage, secs in rec.get("seconds", {}).items():
            tag = rec.get("identify_test") if stage == "identify" else ""
            if str(rec.get("label", "")).startswith("before"):  # a run of older code: its own series
                tag = (tag + ", " if tag else "") + "before"
            if rec.get("series"):  # e.g. stage times read from the runner's log: their own series
                tag = (tag + ", " if tag else "") + rec["series"]
            if rec.get("execution", "spark") != "spark":  # the in-memory path: its own series
                tag = (tag + ", " if tag else "") + rec["execution"]
            key = (stage, tag)
            out[key].append((rec["n"], secs, (rec.get("load_average") or [None])[0]))
    return {k: sorted(v) for k, v in out.items()}


def slope(points):
    """Least-squares slope of log(seconds) on log(n) (None with fewer than two sizes)."""
    ns = np.array([p[0] for p in points], float)
    if len(set(ns)) < 2:
        return None
    return float(np.polyfit(np.log(ns), np.log([p[1] for p in points]), 1)[0])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("jsonl")
    ap.add_argument("--out", default="docs/figures/scale_time_vs_n.png")
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(args.jsonl) as fh:
        lines = [json.loads(x) for x in fh if x.strip() and not x.startswith("#")]
    data = series(lines)
    fig, ax = plt.subplots(figsize=(9.6, 4.6))
    colors = plt.get_cmap("tab20").colors
    markers = {"identify": "o", "effects": "s", "policy": "^"}
    for i, ((stage, test), pts) in enumerate(sorted(data.items())):
        b = slope(pts)
        label = f"{stage}{' (' + test + ')' if test else ''}" + (f": slope {b:.2f}" if b is not None else "")
        print(json.dumps({"stage": stage, "test": test, "points": pts, "slope": b}))
        loaded = "load" in test  # a run on a loaded machine (its series says so): hollow markers
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", marker=markers.get(stage, "o"), color=colors[i % 20],
                markerfacecolor="none" if loaded else colors[i % 20], label=label)
    ns = sorted({p[0] for pts in data.values() for p in pts})
    if len(ns) >= 2:  # a slope-1 guide through the smallest identify point
        ref = min((p for (s, _), pts in data.items() if s == "identify" for p in pts), default=None)
        if ref:
            xs = np.array([ns[0], ns[-1]], float)
            ax.plot(xs, ref[1] * xs / ref[0], "k:", lw=1, label="linear in n (guide)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("units n")
    ax.set_ylabel("stage wall seconds (local[2], shared machine)")
    ax.set_title("identify → effects → policy at scale (4,096 neurons, k = 32)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
