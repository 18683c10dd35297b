"""Calibration of CATE predictions, all on doubly-robust scores φᵢ (E[φ | X] = τ(X)).

The effects stage passes, for the estimation units (``tokens2policy.honesty``), out-of-fold predictions S — the
final stage fitted without the unit's fold on pseudo-outcomes whose nuisances never saw that fold either (nested
cross-fitting, ``learners``) — and the units' cross-fitted AIPW scores φ. So no outcome of a unit's fold enters
its S, and (with ``honesty.mode=split``) no outcome that selected the modifiers S is built on: the statements are
about held-out performance. With ``honesty.mode=none`` the selection used every unit and they are not. The
functions themselves compute the statistics for whatever S and φ they are given.

* **BLP** (Chernozhukov, Demirer, Duflo & Fernández-Val 2018, "Generic machine learning inference on heterogeneous
  treatment effects"; score form as in Semenova & Chernozhukov 2021 and grf's ``test_calibration``):
  ``φ = β₁ + β₂ (S − S̄) + ε``. β₁ is the ATE; β₁/S̄ the *mean prediction* coefficient (1 if the average is right);
  β₂ the *differential prediction* coefficient (1 if the heterogeneity is well calibrated, > 0 if S carries any
  signal — the one-sided test of heterogeneity).
* **GATES** by quantile of S: mean φ in each quantile group (sorted groups, ties broken at random with a seed),
  and the top − bottom contrast; HC1/CR1S SEs.
* **RATE** (Yadlowsky, Fleming, Shah, Brunskill & Wager 2021): TOC(q) = E[φ | S in top q] − E[φ];
  AUTOC = ∫₀¹ TOC(q) dq, Qini = ∫₀¹ q·TOC(q) dq. Units tied in S share their group's mean score (the expectation
  over random tie-breaking). SEs by the (cluster) bootstrap holding S fixed, CIs estimate ± z·SE, as grf does.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import pandas as pd
from scipy import stats

from .ols import ols

CALIBRATION_COLUMNS = ["metric", "group", "estimate", "se", "ci_low", "ci_high", "p_value", "null_hypothesis", "n"]


def _check(phi, s):
    phi = np.asarray(phi, dtype=float).ravel()
    s = np.asarray(s, dtype=float).ravel()
    if phi.shape != s.shape:
        raise ValueError(f"scores and predictions must have the same length, got {phi.shape[0]} and {s.shape[0]}")
    if not (np.isfinite(phi).all() and np.isfinite(s).all()):
        raise ValueError("scores and predictions must be finite")
    if phi.shape[0] < 10:
        raise ValueError(f"calibration needs at least 10 units, got {phi.shape[0]}")
    return phi, s


def _row(metric, group, est, se, lo, hi, p, null, n):
    return dict(metric=metric, group=group, estimate=float(est), se=float(se), ci_low=float(lo), ci_high=float(hi),
                p_value=float(p), null_hypothesis=null, n=int(n))


def blp_test(phi, s, cluster=None, alpha: float = 0.05) -> pd.DataFrame:
    """Best linear predictor of the CATE given S: rows ``ate`` (H0: 0), ``mean_prediction`` (H0: 1, NaN when
    |S̄| is negligible), ``differential_prediction`` (H0: ≤ 0, one-sided)."""
    phi, s = _check(phi, s)
    n = phi.shape[0]
    sbar = float(s.mean())
    dev = s - sbar
    if dev.std() == 0:
        X = np.ones((n, 1))
    else:
        X = np.column_stack([np.ones(n), dev])
    res = ols(X, phi, cluster=cluster)
    crit = res.critical_value(alpha)
    rows = []
    est, se, lo, hi, p = (float(v[0]) for v in res.linear_combination(np.eye(X.shape[1])[0], alpha))
    rows.append(_row("blp", "ate", est, se, lo, hi, p, "= 0", n))
    if abs(sbar) > 1e-8 * max(1.0, float(np.abs(s).max())):
        m, m_se = est / sbar, se / abs(sbar)
        rows.append(_row("blp", "mean_prediction", m, m_se, m - crit * m_se, m + crit * m_se,
                         float(res.p_value((m - 1) / m_se)), "= 1", n))
    else:
        rows.append(_row("blp", "mean_prediction", np.nan, np.nan, np.nan, np.nan, np.nan, "= 1", n))
    if X.shape[1] == 2:
        b, b_se = float(res.coef[1]), float(res.se[1])
        z = b / b_se if b_se > 0 else np.inf
        p_one = float(stats.norm.sf(z) if np.isinf(res.df) else stats.t.sf(z, res.df))
        rows.append(_row("blp", "differential_prediction", b, b_se, b - crit * b_se, b + crit * b_se, p_one, "<= 0", n))
    else:  # constant predictions carry no heterogeneity signal
        rows.append(_row("blp", "differential_prediction", np.nan, np.nan, np.nan, np.nan, np.nan, "<= 0", n))
    return pd.DataFrame(rows, columns=CALIBRATION_COLUMNS)


def quantile_groups(s, n_groups: int = 5, seed: int = 0) -> np.ndarray:
    """Group 0 (lowest S) … n_groups−1 (highest), equal sizes; ties broken at random (seeded)."""
    s = np.asarray(s, dtype=float).ravel()
    tiebreak = np.random.default_rng(seed).permutation(s.shape[0])
    order = np.lexsort((tiebreak, s))
    groups = np.empty(s.shape[0], dtype=int)
    groups[order] = np.arange(s.shape[0]) * n_groups // s.shape[0]
    return groups


def gates_by_quantile(phi, s, n_groups: int = 5, cluster=None, alpha: float = 0.05, seed: int = 0) -> pd.DataFrame:
    """GATES (Chernozhukov et al. 2018): mean DR score per quantile group of S, and the top − bottom contrast."""
    phi, s = _check(phi, s)
    if not 2 <= n_groups <= phi.shape[0] // 2:
        raise ValueError(f"n_groups must be in [2, n/2], got {n_groups}")
    g = quantile_groups(s, n_groups, seed)
    D = np.eye(n_groups)[g]
    res = ols(D, phi, cluster=cluster)
    rows = []
    for k in range(n_groups):
        est, se, lo, hi, p = (float(v[0]) for v in res.linear_combination(np.eye(n_groups)[k], alpha))
        rows.append(_row("gates", f"q{k + 1}", est, se, lo, hi, p, "= 0", int((g == k).sum())))
    L = np.zeros(n_groups)
    L[-1], L[0] = 1.0, -1.0
    est, se, lo, hi, p = (float(v[0]) for v in res.linear_combination(L, alpha))
    rows.append(_row("gates", f"q{n_groups} - q1", est, se, lo, hi, p, "= 0", int(((g == 0) | (g == n_groups - 1)).sum())))
    return pd.DataFrame(rows, columns=CALIBRATION_COLUMNS)


def _sorted_ties(s):
    order = np.argsort(-s, kind="stable")
    ss = s[order]
    starts = np.flatnonzero(np.r_[True, ss[1:] != ss[:-1]])
    sizes = np.diff(np.r_[starts, ss.shape[0]])
    return order, starts, sizes


def _rate_from_weights(W, phi_sorted, starts, sizes, grid):
    """AUTOC, Qini and TOC(grid) for each row of unit weights W (B, n), units sorted by decreasing S."""
    Wp = W * phi_sorted
    gsum = np.add.reduceat(Wp, starts, axis=1)
    gw = np.add.reduceat(W, starts, axis=1)
    gmean = np.divide(gsum, gw, out=np.zeros_like(gsum), where=gw > 0)
    phi_adj = np.repeat(gmean, sizes, axis=1)
    cum_w = np.cumsum(W, axis=1)
    cum_p = np.cumsum(W * phi_adj, axis=1)
    total = cum_w[:, -1:]
    mean_all = cum_p[:, -1:] / total
    toc = np.divide(cum_p, cum_w, out=np.zeros_like(cum_p), where=cum_w > 0) - mean_all
    frac = W / total
    autoc = (frac * toc).sum(axis=1)
    qini = (frac * (cum_w / total) * toc).sum(axis=1)
    toc_grid = np.empty((W.shape[0], grid.shape[0]))
    for b in range(W.shape[0]):
        idx = np.minimum(np.searchsorted(cum_w[b], grid * total[b, 0] - 1e-9, side="left"), W.shape[1] - 1)
        toc_grid[b] = toc[b, idx]
    return autoc, qini, toc_grid


def rate(phi, s, cluster=None, n_bootstrap: int = 200, alpha: float = 0.05, seed: int = 0,
         n_grid: int = 100, batch: int = 50) -> Dict[str, object]:
    """RATE with AUTOC and Qini weights, with bootstrap SEs, plus TOC and Qini curves on a grid of q.

    Returns ``{"table": DataFrame(CALIBRATION_COLUMNS), "curves": DataFrame(q, toc, toc_se, qini, qini_se)}``.
    The bootstrap resamples units (or whole clusters when ``cluster`` is given)."""
    phi, s = _check(phi, s)
    if n_bootstrap < 20:
        raise ValueError(f"n_bootstrap must be at least 20, got {n_bootstrap}")
    n = phi.shape[0]
    order, starts, sizes = _sorted_ties(s)
    phi_sorted = phi[order]
    grid = np.arange(1, n_grid + 1) / n_grid
    autoc, qini, toc = _rate_from_weights(np.ones((1, n)), phi_sorted, starts, sizes, grid)
    rng = np.random.default_rng(seed)
    if cluster is not None:
        _, codes = np.unique(np.asarray(cluster)[order], return_inverse=True)
        n_units_draw = int(codes.max()) + 1
    else:
        codes, n_units_draw = None, n
    boot = {"autoc": [], "qini": [], "toc": []}
    for start in range(0, n_bootstrap, batch):
        b = min(batch, n_bootstrap - start)
        counts = rng.multinomial(n_units_draw, np.full(n_units_draw, 1.0 / n_units_draw), size=b).astype(float)
        W = counts if codes is None else counts[:, codes]
        a, q, t = _rate_from_weights(W, phi_sorted, starts, sizes, grid)
        boot["autoc"].append(a), boot["qini"].append(q), boot["toc"].append(t)
    z = stats.norm.ppf(1 - alpha / 2)
    rows = []
    for name, est in (("autoc", autoc[0]), ("qini", qini[0])):
        se = float(np.std(np.concatenate(boot[name]), ddof=1))
        p = float(2 * stats.norm.sf(abs(est) / se)) if se > 0 else np.nan
        rows.append(_row("rate", name, est, se, est - z * se, est + z * se, p, "= 0", n))
    toc_se = np.std(np.vstack(boot["toc"]), axis=0, ddof=1)
    curves = pd.DataFrame({"q": grid, "toc": toc[0], "toc_se": toc_se, "qini": grid * toc[0], "qini_se": grid * toc_se})
    return {"table": pd.DataFrame(rows, columns=CALIBRATION_COLUMNS), "curves": curves}


def calibration_table(phi, s, cluster=None, n_groups: int = 5, n_bootstrap: int = 200, alpha: float = 0.05,
                      seed: int = 0) -> Dict[str, pd.DataFrame]:
    """BLP + GATES + RATE rows in one table, and the TOC/Qini curves."""
    r = rate(phi, s, cluster=cluster, n_bootstrap=n_bootstrap, alpha=alpha, seed=seed)
    table = pd.concat([blp_test(phi, s, cluster, alpha), gates_by_quantile(phi, s, n_groups, cluster, alpha, seed),
                       r["table"]], ignore_index=True)
    return {"table": table, "curves": r["curves"]}
