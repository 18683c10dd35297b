"""Is the heterogeneity-coverage CI honest on the pipeline's own path? (issue 18)

The effects stage reports, per outcome, the share of the detectable heterogeneity the selected modifiers explain
(:mod:`tokens2policy.effects.coverage`) with a 95 % bootstrap CI. Design 3 of the validation study found that CI
covering its truth in only 67–83 % of repetitions — but design 3 computed the statistic on the units NEXIS selected
on, with plain (not nested) cross-fitting, i.e. not as the stage does since issue 13. This design runs the stages'
own cores (identify's NEXIS on the selection units, :func:`~tokens2policy.effects.job.effects_in_memory` with the
``dr_selected`` and ``dr_full`` learners), reads the ``calibration`` table's ``coverage`` rows as a user would, and
compares them with the truth of the same draw: the same share computed with the simulated τ in place of the DR
scores (:func:`~tokens2policy.effects.coverage.explained_heterogeneity` with ``debias=False``), on the units and
out-of-fold predictions the stage used.

Design (:class:`CoverageDesign`): m dense N(0, 1) features stored as neuron activations,
``τ(x) = base + topical·1{x₀ > 0} + distributed·Σ_{j=1..d} x_j / √d`` — one driver NEXIS can select as a single
feature and one spread thinly over d features (each with a small interaction), so the selected set usually
explains part of the heterogeneity; ``μ₀(x) = mu·(x₀ + x_{d+1})``. Every repetition runs ``honesty.mode=split`` (the
default) and ``honesty.mode=none`` (the paper's single-sample path) on the same draw.

    python -m tokens2policy.validate.coverage_path --reps 200 --out cov/    # rows + summary CSV
"""
from __future__ import annotations

import argparse
import time
import zlib
from dataclasses import dataclass
from typing import List, Sequence

import numpy as np
import pandas as pd

from .pipeline_path import MODES, PathDesign, identify_in_memory, path_config, selected_neurons

COLUMNS = ["design", "n", "m", "rep", "mode", "n_selected", "selected", "n_estimation", "detected", "warning",
           "estimate", "ci_low", "ci_high", "true_value", "covered", "explained_joint", "true_joint",
           "tau_share_selected", "seconds"]


@dataclass(frozen=True)
class CoverageDesign(PathDesign):
    """A topical driver (x₀'s sign) and a distributed one (the mean of d features); see the module docstring."""

    name: str = "coverage"
    n: int = 2000
    m: int = 30
    topical: float = 1.0
    distributed: float = 0.5
    d: int = 10
    selectors: tuple = ("nexis",)

    @property
    def truth(self) -> List[int]:
        return [0] + list(range(1, self.d + 1))

    def tau(self, x: np.ndarray) -> np.ndarray:
        return (self.base + self.topical * (x[:, 0] > 0)
                + self.distributed * x[:, 1:self.d + 1].sum(1) / np.sqrt(self.d))

    def mu0(self, x: np.ndarray) -> np.ndarray:
        return self.mu * (x[:, 0] + x[:, self.d + 1])


def coverage_config(mode: str, design: CoverageDesign, overrides: Sequence[str] = ()):
    """The stage defaults with the study's columns (``path_config``) and every feature in the full learner's and
    the nuisances' feature set (``effects.nuisance_neurons = m``), so the full learner can find the distributed
    driver."""
    return path_config(mode, [f"effects.nuisance_neurons={design.m}", "effects.n_bootstrap=200", *overrides])


def stage_coverage(cfg, units: pd.DataFrame, neurons: pd.DataFrame, tau: np.ndarray) -> dict:
    """identify → effects on one experiment's tables (the stages' cores, the configured ``honesty`` mode) and the
    heterogeneity coverage the ``calibration`` table reports, with its truth on this draw: the same share computed
    with ``tau`` (each ``units`` row's true CATE) in place of the DR scores, on the units and out-of-fold
    predictions the stage used. Also the true share of Var(τ) a linear function of the selected neurons' active
    indicators carries on those units (``tau_share_selected``)."""
    from tokens2policy.effects.coverage import explained_heterogeneity
    from tokens2policy.effects.job import effects_in_memory

    (exp,) = units["experiment_id"].unique()
    mods = identify_in_memory(cfg, units, neurons)
    eff = effects_in_memory(cfg, units, neurons, mods, keep_learners=True, learners=["dr_selected", "dr_full"])[exp]
    fit = eff["fitted"]["outcome"]
    est = fit["estimation"]
    row_of = dict(zip(units["unit_id"], range(len(units))))
    idx = np.array([row_of[u] for u in fit["units"]["unit_id"].to_numpy()[est]])
    folds = fit["units"]["fold"].to_numpy()[est]
    S = np.column_stack([fit["learners"]["dr_selected"].oof_cate_, fit["learners"]["dr_full"].oof_cate_])
    true_joint = explained_heterogeneity(tau[idx], S, folds, debias=False)
    truth = explained_heterogeneity(tau[idx], S[:, :1], folds, debias=False) / true_joint \
        if true_joint > 1e-12 else np.nan
    truth = float(np.clip(truth, 0.0, 1.0)) if np.isfinite(truth) else np.nan
    cal = eff["calibration"]
    cov = cal[(cal["metric"] == "coverage") & (cal["outcome"] == "outcome")].set_index("group")
    share = cov.loc["share_selected"]
    lo, hi = float(share.ci_low), float(share.ci_high)
    Zs = fit["Z"][est] if fit["Z"].shape[1] else np.zeros((len(idx), 0))
    F1 = np.column_stack([np.ones(len(idx)), Zs])
    beta, *_ = np.linalg.lstsq(F1, tau[idx], rcond=None)
    var_tau = float(np.var(tau[idx]))
    selected = selected_neurons(mods)
    return dict(modifiers=mods, selected=selected, n_selected=len(selected), n_estimation=int(est.sum()),
                detected=float(cov.loc["detected", "estimate"]), warning=float(cov.loc["warning", "estimate"]),
                estimate=float(share.estimate), ci_low=lo, ci_high=hi, true_value=truth,
                covered=float(lo <= truth <= hi) if np.isfinite([lo, hi, truth]).all() else np.nan,
                explained_joint=float(cov.loc["explained_joint", "estimate"]), true_joint=float(true_joint),
                tau_share_selected=float(1 - np.var(tau[idx] - F1 @ beta) / var_tau) if var_tau > 0 else np.nan)


def run_repetition(design: CoverageDesign, rep: int, seed: int = 0, modes: Sequence[str] = MODES,
                   overrides: Sequence[str] = ()) -> pd.DataFrame:
    """One draw, analysed by identify → effects in every mode; one row per mode (see :data:`COLUMNS`)."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, zlib.crc32(design.name.encode()), int(rep)])
    units, neurons, x = design.draw(np.random.default_rng(ss), experiment_id=f"{design.name}-{rep}")
    tau = design.tau(x)
    out = []
    for mode in modes:
        start = time.perf_counter()
        r = stage_coverage(coverage_config(mode, design, overrides), units, neurons, tau)
        r.update(design=design.name, n=design.n, m=design.m, rep=rep, mode=mode,
                 selected=",".join(map(str, r["selected"])), seconds=time.perf_counter() - start)
        out.append({k: r[k] for k in COLUMNS})
    return pd.DataFrame(out, columns=COLUMNS)


def summarize(rows: pd.DataFrame) -> pd.DataFrame:
    """Per design × n × mode: CI coverage of the truth (Wilson 95 %), mean estimate − truth, mean truth, share of
    repetitions with a CI, warning rate."""
    from .study import wilson_interval

    recs = []
    for key, g in rows.groupby(["design", "n", "mode"], sort=True):
        ok = g["covered"].notna()
        k, n = int(g.loc[ok, "covered"].sum()), int(ok.sum())
        lo, hi = wilson_interval(k, n) if n else (np.nan, np.nan)
        recs.append(dict(zip(["design", "n", "mode"], key), reps=len(g), with_ci=n,
                         ci_covers=k / n if n else np.nan, ci_covers_low=lo, ci_covers_high=hi,
                         mean_estimate=float(g["estimate"].mean()), mean_truth=float(g["true_value"].mean()),
                         mean_bias=float((g["estimate"] - g["true_value"]).mean()),
                         mean_ci_width=float((g["ci_high"] - g["ci_low"]).mean()),
                         warning_rate=float(g["warning"].mean()), mean_selected=float(g["n_selected"].mean())))
    return pd.DataFrame(recs)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--n", type=int, nargs="+", default=[2000])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", nargs="+", default=list(MODES))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--summarize", nargs="*", help="summarize these row CSVs instead of running")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    import os

    os.makedirs(a.out, exist_ok=True)  # a local folder for the CSVs of a command-line study run
    if a.summarize:
        rows = pd.concat([pd.read_csv(p) for p in a.summarize], ignore_index=True)
    else:
        parts = []
        for n in a.n:
            design = CoverageDesign(n=n)
            for rep in range(a.first, a.first + a.reps):
                parts.append(run_repetition(design, rep, a.seed, a.modes, a.overrides))
                pd.concat(parts, ignore_index=True).to_csv(f"{a.out}/coverage_rows_{a.first}.csv", index=False)
        rows = pd.concat(parts, ignore_index=True)
    summary = summarize(rows)
    summary.to_csv(f"{a.out}/coverage_summary.csv", index=False)
    print(summary.to_string(index=False))


if __name__ == "__main__":
    main()
