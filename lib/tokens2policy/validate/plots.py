"""Figures of the validation study (matplotlib, Agg backend): IoU vs n, IoU vs effect size, null FWER, coverage."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import numpy as np
import pandas as pd

from tokens2policy.report.plots import pyplot, save_figure

SHOWN_METHODS = ("nexis_linear", "nexis_hc2", "nexis_hc2_norho", "nexis_hc2_nobw", "nexis_gcm",
                 "marginal_raw", "marginal_bonferroni", "marginal_bh")




def _design1(summary: pd.DataFrame) -> pd.DataFrame:
    """Design 1's sweep rows (not the null, design 2 or design 3's ``drivers/...`` points)."""
    d = summary["design"].astype(str)
    return summary[~d.isin(["null", "text"]) & ~d.str.startswith("drivers/")]


def _style(method: str):
    return dict(ls="-" if method.startswith("nexis") else "--", marker="o" if method.startswith("nexis") else "s",
                ms=4, capsize=2)


def _sweep(summary: pd.DataFrame, x: str, fixed: str, fixed_value, methods, title: str, path: Path):
    plt = pyplot()
    cells = _design1(summary)[["design", "outcome"]].drop_duplicates().values.tolist()
    if not cells:
        return None
    fig, axes = plt.subplots(1, len(cells), figsize=(4.2 * len(cells), 3.6), squeeze=False, sharey=True)
    for ax, (design, outcome) in zip(axes[0], cells):
        sub = summary[(summary["design"] == design) & (summary["outcome"] == outcome)
                      & np.isclose(summary[fixed].astype(float), float(fixed_value))]
        for meth in methods:
            g = sub[sub["method"] == meth].sort_values(x)
            if g.empty:
                continue
            err = np.vstack([g["iou"] - g["iou_lo"], g["iou_hi"] - g["iou"]]).clip(0)
            ax.errorbar(g[x], g["iou"], yerr=np.nan_to_num(err), label=meth, **_style(meth))
        if x == "n":
            from matplotlib.ticker import NullFormatter, ScalarFormatter

            ax.set_xscale("log")
            ax.set_xticks(sorted(sub["n"].unique()))
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(-0.02, 1.05)
        ax.set_xlabel("sample size n" if x == "n" else "effect size")
        ax.set_title(f"{design}, {outcome} ({fixed}={fixed_value:g})", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("IoU(selected, aligned) — mean, 95% CI")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)
    return path


def iou_vs_n(summary: pd.DataFrame, path, effect: Optional[float] = None, methods=SHOWN_METHODS):
    """IoU against n at one effect size (default: the median effect of the sweep), one panel per design cell."""
    real = _design1(summary)
    if real.empty:
        return None
    effect = float(np.median(sorted(real["effect"].unique()))) if effect is None else effect
    effect = min(real["effect"].unique(), key=lambda e: abs(e - effect))
    return _sweep(summary, "n", "effect", effect, methods, "Recovery of the aligned coordinates vs sample size",
                  Path(path))


def iou_vs_effect(summary: pd.DataFrame, path, n: Optional[int] = None, methods=SHOWN_METHODS):
    """IoU against the effect size at one n (default: the middle n of the sweep)."""
    real = _design1(summary)
    if real.empty or real["effect"].nunique() < 2:
        return None
    ns = sorted(real["n"].unique())
    n = ns[len(ns) // 2] if n is None else n
    return _sweep(summary, "effect", "n", n, methods, "Recovery of the aligned coordinates vs effect size", Path(path))


def text_iou_vs_n(summary: pd.DataFrame, path, methods=SHOWN_METHODS):
    """Design 2: IoU against the best-F1 neurons (the issue's truth) and IoU modulo topic-aligned neurons, against
    n, one row of panels per effect size."""
    plt = pyplot()
    text = summary[(summary["design"] == "text") & (summary["effect"].astype(float) != 0)]  # effect 0: FWER only
    if text.empty:
        return None
    effects = sorted(text["effect"].unique())
    metrics = [("iou", "IoU vs best-F1 neurons")]
    if "iou_aligned" in text:
        metrics.append(("iou_aligned", "IoU modulo topic-aligned neurons"))
    fig, axes = plt.subplots(len(effects), len(metrics), figsize=(4.6 * len(metrics), 3.4 * len(effects)),
                             squeeze=False, sharey=True)
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    for r, eff in enumerate(effects):
        sub = text[np.isclose(text["effect"].astype(float), float(eff))]
        for c, (metric, label) in enumerate(metrics):
            ax = axes[r][c]
            for meth in methods:
                g = sub[sub["method"] == meth].sort_values("n")
                if g.empty:
                    continue
                err = np.vstack([g[metric] - g[f"{metric}_lo"], g[f"{metric}_hi"] - g[metric]]).clip(0)
                ax.errorbar(g["n"], g[metric], yerr=np.nan_to_num(err), label=meth, **_style(meth))
            ax.set_xscale("log")
            ax.set_xticks(sorted(sub["n"].unique()))
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_ylim(-0.02, 1.05)
            ax.set_xlabel("sample size n")
            ax.set_title(f"{label} (effect={eff:g}, {int(sub['m'].iloc[0])} SAE latents)", fontsize=9)
            ax.grid(alpha=0.3)
        axes[r][0].set_ylabel("mean, 95% CI")
    axes[0][-1].legend(fontsize=7, loc="upper left")
    fig.suptitle("Design 2 (BBC News → MiniLM → TopK SAE): recovery of the driving topics' neurons", fontsize=10)
    save_figure(fig, path)
    return Path(path)


def null_fwer(summary: pd.DataFrame, path, alpha: float = 0.05):
    """Family-wise error rate under the null (any selection) per method with Wilson 95 % CIs; the α line."""
    plt = pyplot()
    null = summary[summary["design"] == "null"]
    if null.empty:
        return None
    outcomes = sorted(null["outcome"].unique())
    fig, axes = plt.subplots(1, len(outcomes), figsize=(6.5 * len(outcomes), 3.8), squeeze=False)
    for ax, outcome in zip(axes[0], outcomes):
        g = null[null["outcome"] == outcome].sort_values("method")
        x = np.arange(len(g))
        err = np.vstack([g["any_selected"] - g["any_selected_lo"], g["any_selected_hi"] - g["any_selected"]]).clip(0)
        colors = ["tab:blue" if m.startswith("nexis") else "tab:orange" for m in g["method"]]
        ax.bar(x, g["any_selected"], yerr=err, color=colors, capsize=2)
        ax.axhline(alpha, color="k", ls=":", lw=1, label=f"α = {alpha:g}")
        ax.set_xticks(x)
        ax.set_xticklabels(g["method"], rotation=70, ha="right", fontsize=7)
        ax.set_ylabel("FWER (Wilson 95% CI)")
        ax.set_yscale("symlog", linthresh=0.1)
        ax.set_ylim(0, 1.05)
        reps = int(g["reps"].max())
        ax.set_title(f"null design, {outcome} outcome, n={int(g['n'].iloc[0])}, {reps} repetitions", fontsize=9)
        ax.legend(fontsize=7)
    save_figure(fig, path)
    return Path(path)


def calibration_fwer(summary: pd.DataFrame, path, alpha: float = 0.05):
    """The calibration designs: family-wise error rate (a selection outside the truth) of every test option per
    design, Wilson 95 % CIs, the α line and the α + 2 Monte-Carlo s.e. tolerance."""
    plt = pyplot()
    cal = summary[summary["design"].astype(str).str.startswith("cal-")]
    if cal.empty or "any_false" not in cal:
        return None
    designs = sorted(cal["design"].unique())
    methods = sorted(cal["method"].unique())
    fig, ax = plt.subplots(figsize=(1.2 + 1.4 * len(designs), 4.2))
    width = 0.8 / len(methods)
    for i, meth in enumerate(methods):
        g = cal[cal["method"] == meth].set_index("design").reindex(designs)
        x = np.arange(len(designs)) + (i - (len(methods) - 1) / 2) * width
        err = np.vstack([g["any_false"] - g["any_false_lo"], g["any_false_hi"] - g["any_false"]]).clip(0)
        ax.bar(x, g["any_false"], width, yerr=np.nan_to_num(err), capsize=2, label=meth)
    reps = int(cal["reps"].max())
    ax.axhline(alpha, color="k", ls=":", lw=1, label=f"α = {alpha:g}")
    ax.axhline(alpha + 2 * np.sqrt(alpha * (1 - alpha) / reps), color="k", ls="--", lw=0.8,
               label=f"α + 2 MC s.e. ({reps} reps)")
    ax.set_xticks(np.arange(len(designs)))
    ax.set_xticklabels([d[4:] for d in designs], fontsize=8)
    ax.set_yscale("symlog", linthresh=0.1)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("FWER (Wilson 95% CI)")
    ax.set_title("Calibration designs: family-wise error of every test option", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    save_figure(fig, path)
    return Path(path)


def coverage(cov: pd.DataFrame, path, level: float = 0.95):
    """Empirical coverage of the nominal 95 % CIs per estimand (Wilson 95 % CIs), one row of points per design."""
    plt = pyplot()
    if cov.empty:
        return None
    cov = cov.copy()
    cov["label"] = (cov["design"] + "/" + cov["outcome"] + " n=" + cov["n"].astype(str) + " effect="
                    + cov["effect"].map(lambda e: f"{e:g}"))
    estimands = sorted(cov["estimand"].unique())
    fig, ax = plt.subplots(figsize=(7.5, 0.5 + 0.35 * len(estimands) * cov["label"].nunique() ** 0.5 + 1.5))
    labels = sorted(cov["label"].unique())
    for i, lab in enumerate(labels):
        g = cov[cov["label"] == lab].set_index("estimand").reindex(estimands)
        y = np.arange(len(estimands)) + (i - (len(labels) - 1) / 2) * 0.8 / max(len(labels), 1)
        err = np.vstack([g["coverage"] - g["coverage_lo"], g["coverage_hi"] - g["coverage"]]).clip(0)
        ax.errorbar(g["coverage"], y, xerr=np.nan_to_num(err), fmt="o", ms=4, capsize=2, label=lab)
    ax.axvline(level, color="k", ls=":", lw=1)
    ax.set_yticks(np.arange(len(estimands)))
    ax.set_yticklabels(estimands, fontsize=8)
    ax.set_xlabel("empirical coverage of the 95% CI (Wilson 95% CI)")
    ax.set_xlim(max(0.0, float(np.nanmin(cov["coverage_lo"])) - 0.05), 1.0)
    ax.legend(fontsize=7)
    save_figure(fig, path)
    return Path(path)


def all_figures(selection: pd.DataFrame, cov: pd.DataFrame, out_dir, alpha: float = 0.05) -> Dict[str, Path]:
    """Write every figure that the data support to ``out_dir/validation_*.png``; returns name -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    made = {
        "iou_vs_n": iou_vs_n(selection, out / "validation_iou_vs_n.png"),
        "iou_vs_effect": iou_vs_effect(selection, out / "validation_iou_vs_effect.png"),
        "null_fwer": null_fwer(selection, out / "validation_null_fwer.png", alpha),
        "coverage": coverage(cov, out / "validation_coverage.png"),
        "text_iou_vs_n": text_iou_vs_n(selection, out / "validation_text_iou_vs_n.png"),
        "calibration_fwer": calibration_fwer(selection, out / "validation_calibration_fwer.png", alpha),
    }
    return {k: Path(v) for k, v in made.items() if v is not None}
