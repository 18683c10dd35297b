"""The report's figures (matplotlib, Agg backend): GATE forest plot, TOC/Qini curves, policy value vs baselines.

Each function saves a PNG and returns its path, or None when there is nothing to draw.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import pandas as pd


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display on clusters or in CI)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path) -> None:
    """Lay out, write the PNG and free the figure (pyplot keeps every open figure alive otherwise)."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def forest_plot(labels: Sequence[str], est, lo, hi, path: Path, title: str, reference: Optional[float] = 0.0,
                xlabel: str = "effect (95% CI)") -> Optional[Path]:
    """Point estimates with CI bars, one row per label, top to bottom in the given order."""
    est, lo, hi = (np.asarray(a, dtype=float) for a in (est, lo, hi))
    ok = np.isfinite(est)
    if not ok.any():
        return None
    plt = pyplot()
    n = len(labels)
    fig, ax = plt.subplots(figsize=(8, 0.9 + 0.32 * n))
    y = np.arange(n)[::-1]
    has_ci = np.isfinite(lo) & np.isfinite(hi)
    # the interval as drawn from its ends (an estimate may lie outside a percentile-bootstrap CI)
    ax.hlines(y[has_ci], lo[has_ci], hi[has_ci], color="#7aa6d6", lw=1.5)
    ax.plot(np.r_[lo[has_ci], hi[has_ci]], np.r_[y[has_ci], y[has_ci]], "|", color="#7aa6d6", ms=7)
    ax.plot(est[has_ci], y[has_ci], "o", color="#1f4e79", ms=4)
    if (~has_ci & ok).any():
        ax.plot(est[~has_ci & ok], y[~has_ci & ok], "o", color="#999999", ms=4)
    if reference is not None:
        ax.axvline(reference, color="#aa3333", lw=0.8, ls="--")
    ax.set_ylim(-0.7, n - 0.3)  # a margin above the first and below the last row
    ax.set_yticks(y)
    ax.set_yticklabels([str(l)[:60] for l in labels], fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    save_figure(fig, path)
    return path


def curves_plot(curves: pd.DataFrame, path: Path, title: str, group_col: Optional[str] = None) -> Optional[Path]:
    """TOC(q) and Qini(q) side by side with ±1.96·SE bands when SE columns exist (columns q, toc, qini, *_se)."""
    have = [c for c in ("toc", "qini") if c in curves.columns]
    if "q" not in curves.columns or not have or curves.empty:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(have), figsize=(5 * len(have), 3.6), squeeze=False)
    groups = [(None, curves)] if group_col is None else list(curves.groupby(group_col, sort=True))
    for ax, metric in zip(axes[0], have):
        for name, g in groups:
            g = g.sort_values("q")
            q, v = g["q"].to_numpy(float), g[metric].to_numpy(float)
            line, = ax.plot(q, v, label=None if name is None else str(name))
            se_col = f"{metric}_se"
            if se_col in g.columns:
                se = g[se_col].to_numpy(float)
                ax.fill_between(q, v - 1.96 * se, v + 1.96 * se, color=line.get_color(), alpha=0.2)
        ax.axhline(0, color="#aa3333", lw=0.8, ls="--")
        ax.set_xlabel("q (share treated, by predicted effect)")
        ax.set_title({"toc": "TOC(q)", "qini": "Qini(q)"}[metric], fontsize=10)
        ax.grid(alpha=0.3)
        if group_col is not None and len(groups) > 1:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)
    return path


def value_plot(names: List[str], est, lo, hi, path: Path, title: str) -> Optional[Path]:
    """Policy values with CIs as a horizontal forest (no reference line: values are levels, not contrasts)."""
    return forest_plot(names, est, lo, hi, path, title, reference=None, xlabel="policy value (95% CI)")
