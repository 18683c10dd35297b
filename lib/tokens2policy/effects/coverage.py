"""Heterogeneity coverage: how much of the detectable effect heterogeneity do the selected modifiers explain?

NEXIS answers with a short list of direct effect modifiers. A user reads that list as *the* answer, so the product
must also say how much of the heterogeneity that a flexible learner on all features can find is carried by the
list — and where the rest sits. All statements are on held-out predictions and cross-fitted doubly-robust scores.

Inputs (one outcome; pass the units the effects stage estimates on):

* ``phi``: cross-fitted AIPW scores, E[φ | X] = τ(X) (Robins, Rotnitzky & Zhao 1994; Kennedy 2023);
* ``s_selected``: out-of-fold CATE predictions of the learner on the selected modifiers (``dr_selected``);
* ``s_full``: out-of-fold CATE predictions of the full-feature learner (``dr_full``);
* ``folds`` (predictions are demeaned within each fold: a fold's model may shift all its predictions, which is not
  heterogeneity) and ``cluster`` (cluster-robust variances and a cluster bootstrap).

**Explained heterogeneity of a set of predictions S** (the BLP of Chernozhukov, Demirer, Duflo & Fernández-Val 2018
with several predictors): with S̃ the within-fold-demeaned predictions, the best linear predictor of τ given S̃ is
S̃β, β = Var(S̃)⁻¹Cov(S̃, τ) = Var(S̃)⁻¹Cov(S̃, φ) (φ's noise is mean-zero given X and S is out-of-fold), and the
heterogeneity it explains is Λ(S) = Var(S̃β) = β'Σβ, Σ = Var(S̃). The plug-in β̂'Σ̂β̂ is biased upwards by
tr(Σ Var(β̂)) — the noise in φ makes even useless predictions look informative — so the estimate is
Λ̂ = β̂'Σ̂β̂ − tr(Σ̂ V̂), V̂ the HC1 (CR1S with clusters) covariance of β̂.

**Coverage** = Λ(s_selected) / Λ(s_selected, s_full): the share of the heterogeneity detectable from both learners'
predictions together that the selected-set learner explains alone. It is 1 when the full learner finds nothing the
selected modifiers do not, and e.g. 0.5 when τ = x₁ + x₂ (independent, equal variance), x₁ is selected and the full
learner recovers x₂ perfectly. It is a share of *detectable* heterogeneity: heterogeneity that neither learner finds
is invisible to it (the share of the true Var(τ) can only be computed in simulations; docs/validation.md reports
both). CI: percentile bootstrap over units (clusters with ``cluster``), predictions held fixed as for RATE;
estimate and CI are clipped to [0, 1].

Also reported: the BLP coefficient of s_full given s_selected (``beyond_selected``; one-sided test that the
full-feature learner carries heterogeneity beyond the selected set), a Wald test that the joint BLP has any
heterogeneity, and a **residual scan**: the φ residual after the selected-set BLP regressed on each unselected
feature (e.g. SAE neuron) alone, HC1/CR1S t-statistics, Bonferroni over the tested features — where the residual
heterogeneity sits, for inspection (a screen, not a selection).

**Warning rule** (:func:`coverage_warning`): warn when the coverage estimate is below ``warn_below`` (default 0.8)
*and* the beyond-selection test rejects at ``alpha`` — low coverage that sampling noise does not explain. When the
joint BLP detects no heterogeneity (Wald p > alpha) there is nothing to cover: coverage is still reported, no
warning is raised, and the message says so.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from .calibration import CALIBRATION_COLUMNS

__all__ = ["CoverageResult", "explained_heterogeneity", "heterogeneity_coverage", "residual_scan",
           "coverage_warning", "coverage_frame"]


def _codes(x, n, name):
    if x is None:
        return np.zeros(n, dtype=np.int64), 1
    x = np.asarray(x).ravel()
    if x.shape[0] != n:
        raise ValueError(f"{name} has length {x.shape[0]}, expected {n}")
    _, codes = np.unique(x, return_inverse=True)
    return codes.ravel().astype(np.int64), int(codes.max()) + 1


def _demean(values: np.ndarray, folds: np.ndarray, n_folds: int, w: np.ndarray) -> np.ndarray:
    """Weighted within-fold demeaning of the columns of ``values`` (n, p)."""
    wsum = np.bincount(folds, weights=w, minlength=n_folds)
    out = np.empty_like(values)
    for j in range(values.shape[1]):
        means = np.bincount(folds, weights=w * values[:, j], minlength=n_folds) / np.maximum(wsum, 1e-300)
        out[:, j] = values[:, j] - means[folds]
    return out


@dataclass
class _Fit:
    beta: np.ndarray          # (p,)
    cov: np.ndarray           # (p, p) robust covariance of beta
    sigma: np.ndarray         # (p, p) Var of the demeaned predictions
    explained: float          # debiased beta' Sigma beta - tr(Sigma V)
    df: float                 # reference df (inf: normal)
    resid: np.ndarray         # (n,) phi residual after the fit


def _blp(phi, S, folds, n_folds, clusters=None, n_clusters=1, w=None) -> _Fit:
    """BLP of phi on the within-fold-demeaned columns of S, with frequency weights ``w`` (bootstrap counts)."""
    w = np.ones(phi.shape[0]) if w is None else w
    return _blp_demeaned(_demean(phi[:, None], folds, n_folds, w)[:, 0], _demean(S, folds, n_folds, w), n_folds,
                         clusters, n_clusters, w)


def _blp_demeaned(pt, St, n_folds, clusters, n_clusters, w) -> _Fit:
    """:func:`_blp` on the already demeaned ``pt`` and ``St`` (``_demean`` works column by column, so the
    columns of one demeaned S serve the BLPs on any subset of them)."""
    n = pt.shape[0]
    ntot = float(w.sum())
    A = (St * w[:, None]).T @ St
    keep = np.diag(A) > 1e-12 * max(1.0, ntot)
    p = St.shape[1]
    beta, cov = np.zeros(p), np.zeros((p, p))
    resid = pt.copy()
    if keep.any():
        Ak = A[np.ix_(keep, keep)]
        Ainv = np.linalg.pinv(Ak)
        bk = Ainv @ ((St[:, keep] * w[:, None]).T @ pt)
        resid = pt - St[:, keep] @ bk
        k = int(keep.sum()) + n_folds  # slopes + fold intercepts
        if clusters is None:
            meat = (St[:, keep] * (w * resid ** 2)[:, None]).T @ St[:, keep]
            scale = ntot / max(ntot - k, 1.0)
            df = np.inf
        else:
            # a cluster drawn c times by the bootstrap counts as c clusters: sum_g c_g u_g u_g'
            u = np.zeros((n_clusters, int(keep.sum())))
            np.add.at(u, clusters, St[:, keep] * resid[:, None])
            cw = np.zeros(n_clusters)
            np.maximum.at(cw, clusters, w)
            meat = (u * cw[:, None]).T @ u
            g = float(cw.sum())
            scale = g / max(g - 1, 1.0) * (ntot - 1) / max(ntot - k, 1.0)
            df = g - 1
        ck = scale * Ainv @ meat @ Ainv
        beta[keep] = bk
        cov[np.ix_(keep, keep)] = ck
    else:
        df = np.inf
    sigma = A / ntot
    explained = float(beta @ sigma @ beta - np.trace(sigma @ cov))
    return _Fit(beta, cov, sigma, explained, df, resid)


def explained_heterogeneity(phi, S, folds=None, cluster=None, debias: bool = True) -> float:
    """Debiased variance of the best linear predictor of τ given the columns of ``S`` (see the module docstring).
    ``debias=False``: the plug-in β'Σβ — for a noise-free target such as the true τ of a simulation."""
    phi = np.asarray(phi, float).ravel()
    S = np.asarray(S, float).reshape(phi.shape[0], -1)
    f, K = _codes(folds, phi.shape[0], "folds")
    c, G = _codes(cluster, phi.shape[0], "cluster") if cluster is not None else (None, 1)
    fit = _blp(phi, S, f, K, c, G)
    return fit.explained if debias else float(fit.beta @ fit.sigma @ fit.beta)


@dataclass
class CoverageResult:
    """Point estimates, bootstrap CIs and tests of :func:`heterogeneity_coverage`."""

    share: float
    share_ci: tuple
    explained: Dict[str, tuple]        # selected / full / joint -> (estimate, se, ci_low, ci_high)
    beyond: tuple                      # (coef of s_full given s_selected, se, ci_low, ci_high, one-sided p)
    heterogeneity: tuple               # (Wald statistic of the joint BLP, df, p)
    n: int
    alpha: float
    warn_below: float
    n_bootstrap: int
    residual: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def detected(self) -> bool:
        """Whether the joint BLP detects heterogeneity at ``alpha``."""
        return bool(np.isfinite(self.heterogeneity[2]) and self.heterogeneity[2] <= self.alpha)

    @property
    def warning(self) -> bool:
        return coverage_warning(self)


def _share(sel: float, joint: float) -> float:
    if not np.isfinite(joint) or joint <= 0:
        return np.nan
    return float(np.clip(sel / joint, 0.0, 1.0))


def heterogeneity_coverage(phi, s_selected, s_full, folds=None, cluster=None, alpha: float = 0.05,
                           n_bootstrap: int = 200, seed: int = 0, warn_below: float = 0.8,
                           features=None, feature_names: Optional[Sequence[str]] = None,
                           n_residual: int = 5, min_active: int = 0) -> CoverageResult:
    """Coverage of the detectable heterogeneity by the selected-set learner (module docstring), with its CI.

    ``features`` (optional, (n, m) dense or scipy.sparse; e.g. the unselected SAE neurons) are scanned for the
    residual heterogeneity (:func:`residual_scan`); ``feature_names`` names their columns.
    """
    phi = np.asarray(phi, float).ravel()
    n = phi.shape[0]
    s_sel = np.asarray(s_selected, float).ravel()
    s_full = np.asarray(s_full, float).ravel()
    if s_sel.shape[0] != n or s_full.shape[0] != n:
        raise ValueError(f"phi, s_selected and s_full must have the same length, got {n}, {s_sel.shape[0]}, "
                         f"{s_full.shape[0]}")
    if not (np.isfinite(phi).all() and np.isfinite(s_sel).all() and np.isfinite(s_full).all()):
        raise ValueError("phi and the predictions must be finite")
    if n < 20:
        raise ValueError(f"heterogeneity coverage needs at least 20 units, got {n}")
    if not 0 < warn_below <= 1:
        raise ValueError(f"warn_below must be in (0, 1], got {warn_below}")
    if n_bootstrap < 20:
        raise ValueError(f"n_bootstrap must be at least 20, got {n_bootstrap}")
    f, K = _codes(folds, n, "folds")
    c, G = _codes(cluster, n, "cluster") if cluster is not None else (None, 1)
    if cluster is not None and G < 2:
        raise ValueError("cluster-robust coverage needs at least 2 clusters")
    S = np.column_stack([s_sel, s_full])

    def estimates(w=None):
        # one demeaning of phi and of both prediction columns serves the three BLPs (the same numbers as three
        # separate _blp calls: _demean is column by column)
        w = np.ones(n) if w is None else w
        pt, St = _demean(phi[:, None], f, K, w)[:, 0], _demean(S, f, K, w)
        sel = _blp_demeaned(pt, St[:, :1], K, c, G, w)
        full = _blp_demeaned(pt, St[:, 1:], K, c, G, w)
        joint = _blp_demeaned(pt, St, K, c, G, w)
        return sel, full, joint

    sel, full, joint = estimates()
    share = _share(sel.explained, joint.explained)
    rng = np.random.default_rng(seed)
    boot = np.empty((n_bootstrap, 4))
    for b in range(n_bootstrap):
        if c is None:
            w = np.bincount(rng.integers(0, n, n), minlength=n).astype(float)
        else:
            w = np.bincount(rng.integers(0, G, G), minlength=G).astype(float)[c]
        bs, bf, bj = estimates(w)
        boot[b] = (_share(bs.explained, bj.explained), bs.explained, bf.explained, bj.explained)
    q = [100 * alpha / 2, 100 * (1 - alpha / 2)]

    def interval(col, est):
        v = boot[:, col]
        v = v[np.isfinite(v)]
        if len(v) < n_bootstrap // 2 or not np.isfinite(est):
            return est, np.nan, np.nan, np.nan
        lo, hi = np.percentile(v, q)
        return est, float(np.std(v, ddof=1)), float(lo), float(hi)

    share_est, _, share_lo, share_hi = interval(0, share)
    crit = stats.norm.ppf(1 - alpha / 2) if np.isinf(joint.df) else stats.t.ppf(1 - alpha / 2, joint.df)
    b_full, se_full = float(joint.beta[1]), float(np.sqrt(max(joint.cov[1, 1], 0.0)))
    if se_full > 0:
        zb = b_full / se_full
        p_beyond = float(stats.norm.sf(zb) if np.isinf(joint.df) else stats.t.sf(zb, joint.df))
    else:
        p_beyond = np.nan
    keep = np.diag(joint.cov) > 0
    if keep.any():
        wald = float(joint.beta[keep] @ np.linalg.pinv(joint.cov[np.ix_(keep, keep)]) @ joint.beta[keep])
        het = (wald, int(keep.sum()), float(stats.chi2.sf(wald, int(keep.sum()))))
    else:
        het = (np.nan, 0, np.nan)
    residual = pd.DataFrame()
    if features is not None:
        residual = residual_scan(sel.resid, features, f, K, c, G, names=feature_names, top=n_residual,
                                 min_active=min_active)
    return CoverageResult(
        share=share_est, share_ci=(share_lo, share_hi),
        explained={"selected": interval(1, sel.explained), "full": interval(2, full.explained),
                   "joint": interval(3, joint.explained)},
        beyond=(b_full, se_full, b_full - crit * se_full, b_full + crit * se_full, p_beyond),
        heterogeneity=het, n=n, alpha=alpha, warn_below=warn_below, n_bootstrap=n_bootstrap, residual=residual)


def residual_scan(resid, features, folds, n_folds, clusters=None, n_clusters=1, names=None, top: int = 5,
                  min_active: int = 0) -> pd.DataFrame:
    """Each feature's slope in a regression of the residual heterogeneity on it alone (within folds), with HC1
    (CR1S) t and Bonferroni p over the tested features; the ``top`` features by |t| (columns: feature, estimate,
    se, t, p_value, p_bonferroni, n_active, n_tested).

    Sparse algebra, O(non-zeros + folds x features (+ clusters x features)) whatever the number of units: a
    feature z demeaned within fold f is z - m_f, which on a unit where z is inactive is the fold constant -m_f.
    So every sum over units that the regression needs (S_zz = sum z~^2, sum z~ r, the HC1 meat sum z~^2 e^2 with
    e = r - b z~, the clusters' scores sum_g z~ e) is the sum as if z were inactive everywhere (per-fold sums of
    1, r, r^2 times powers of m_f) plus a correction on the stored non-zeros — the same numbers as the dense
    computation (tests/effects/test_effects_coverage.py checks it against one) without an n x features array."""
    import scipy.sparse as sp

    n = resid.shape[0]
    m = features.shape[1]
    names = list(names) if names is not None else [str(j) for j in range(m)]
    if len(names) != m:
        raise ValueError(f"feature_names has {len(names)} entries for {m} features")
    F = sp.csc_matrix(features, dtype=float, copy=True)
    F.eliminate_zeros()
    F.sort_indices()
    i, z = F.indices, F.data                                                    # non-zeros column by column
    j = np.repeat(np.arange(m), np.diff(F.indptr))
    r = np.asarray(resid, float)
    fold_n = np.bincount(folds, minlength=n_folds).astype(float)               # N_f
    r1 = np.bincount(folds, weights=r, minlength=n_folds)                       # sum_f r
    r2 = np.bincount(folds, weights=r * r, minlength=n_folds)                   # sum_f r^2
    P = sp.csr_matrix((np.ones(n), (folds, np.arange(n))), shape=(n_folds, n))
    M = np.asarray((P @ F).todense()) / np.maximum(fold_n, 1e-300)[:, None]    # (K, m) fold means m_f
    active = np.bincount(j, minlength=m)
    me = M[folds[i], j]                                                         # m_f of each non-zero
    ze, re = z - me, r[i]                                                       # z~ and r there
    col = lambda v: np.bincount(j, weights=v, minlength=m)  # noqa: E731 - sum over a column's non-zeros
    szz = fold_n @ M ** 2 + col(ze ** 2 - me ** 2)
    szr = -(r1 @ M) + col(ze * re + me * re)
    ok = (szz > 1e-12) & (active >= min_active)
    den = np.where(ok, szz, 1.0)
    b = np.where(ok, szr / den, 0.0)
    be = b[j]
    if clusters is None:
        # sum z~^2 (r - b z~)^2: at z = 0 it is m^2 (r + b m)^2 per unit
        base = r2 @ M ** 2 + 2 * b * (r1 @ M ** 3) + b ** 2 * (fold_n @ M ** 4)
        meat = base + col(ze ** 2 * (re - be * ze) ** 2 - me ** 2 * (re + be * me) ** 2)
        var = n / max(n - n_folds - 1, 1) * meat / den ** 2
    else:
        # cluster scores u_g = sum_{i in g} z~ (r - b z~): at z = 0 each unit adds -m r - b m^2
        cells = sp.csr_matrix((np.ones(n), (clusters, folds)), shape=(n_clusters, n_folds)).toarray()
        rsum = sp.csr_matrix((r, (clusters, folds)), shape=(n_clusters, n_folds)).toarray()
        fix = ze * re - be * ze ** 2 + me * re + be * me ** 2
        g = clusters[i]
        uu = np.empty(m)
        step = max(1, (1 << 22) // max(n_clusters, 1))  # clusters x step scores at a time
        for lo in range(0, m, step):
            hi = min(m, lo + step)
            a, e = F.indptr[lo], F.indptr[hi]
            u = -(rsum @ M[:, lo:hi]) - b[lo:hi] * (cells @ M[:, lo:hi] ** 2)
            u += sp.csr_matrix((fix[a:e], (g[a:e], j[a:e] - lo)), shape=(n_clusters, hi - lo)).toarray()
            uu[lo:hi] = (u ** 2).sum(0)
        var = n_clusters / max(n_clusters - 1, 1) * (n - 1) / max(n - n_folds - 1, 1) * uu / den ** 2
    se = np.sqrt(np.maximum(var, 0.0))
    rows = [(names[k], float(b[k]), float(se[k]), int(active[k])) for k in np.nonzero(ok)[0]]
    if not rows:
        return pd.DataFrame(columns=["feature", "estimate", "se", "t", "p_value", "p_bonferroni", "n_active",
                                     "n_tested"])
    df = pd.DataFrame(rows, columns=["feature", "estimate", "se", "n_active"])
    df["t"] = df["estimate"] / df["se"].where(df["se"] > 0)
    dof = np.inf if clusters is None else n_clusters - 1
    df["p_value"] = 2 * (stats.norm.sf(df["t"].abs()) if np.isinf(dof) else stats.t.sf(df["t"].abs(), dof))
    df["p_bonferroni"] = np.minimum(1.0, df["p_value"] * len(df))
    df["n_tested"] = len(df)
    df = df.sort_values("t", key=lambda s: -s.abs(), kind="stable").head(int(top)).reset_index(drop=True)
    return df[["feature", "estimate", "se", "t", "p_value", "p_bonferroni", "n_active", "n_tested"]]


def coverage_warning(res: CoverageResult) -> bool:
    """Low coverage that noise does not explain: share < ``warn_below`` and the beyond-selection test rejects at
    ``alpha``, with heterogeneity detected at all."""
    return bool(res.detected and np.isfinite(res.share) and res.share < res.warn_below
                and np.isfinite(res.beyond[4]) and res.beyond[4] <= res.alpha)


def coverage_message(res: CoverageResult, labels: Optional[Mapping[str, str]] = None,
                     detected: Optional[bool] = None, warning: Optional[bool] = None) -> str:
    """One line for the run summary / report (``detected`` / ``warning`` override the result's own flags, e.g.
    when the result was read back from the ``calibration`` table)."""
    detected = res.detected if detected is None else detected
    warning = res.warning if warning is None else warning
    if not detected or not np.isfinite(res.share):
        return (f"heterogeneity coverage: no heterogeneity detected on held-out folds (joint BLP p = "
                f"{res.heterogeneity[2]:.2g}); nothing for the selected modifiers to cover")
    lo, hi = res.share_ci
    line = (f"heterogeneity coverage: the selected modifiers explain {100 * res.share:.0f}% "
            f"(95% CI {100 * lo:.0f}–{100 * hi:.0f}%) of the heterogeneity detectable on held-out folds")
    if warning:
        names = []
        for r in res.residual.head(3).itertuples():
            lab = labels.get(str(r.feature)) if labels else None
            t = getattr(r, "t", np.nan)
            names.append(f"{r.feature}" + (f" '{lab}'" if lab else "") + (f" (t={t:.1f})" if np.isfinite(t) else ""))
        where = "; strongest unselected features: " + ", ".join(names) if names else ""
        line = ("WARNING: " + line + f" — the full-feature learner finds heterogeneity beyond them "
                f"(p = {res.beyond[4]:.2g}){where}")
    return line


def coverage_frame(res: CoverageResult, n_units: Optional[int] = None) -> pd.DataFrame:
    """The result as ``calibration`` table rows (:data:`~tokens2policy.effects.calibration.CALIBRATION_COLUMNS`):
    metric ``coverage`` (groups share_selected, explained_selected/full/joint, beyond_selected, heterogeneity,
    warning) and metric ``coverage_residual`` (one row per residual feature; p_value Bonferroni-adjusted)."""
    n = int(n_units if n_units is not None else res.n)
    rows = []

    def add(metric, group, est, se=np.nan, lo=np.nan, hi=np.nan, p=np.nan, null=""):
        rows.append(dict(metric=metric, group=group, estimate=float(est), se=float(se), ci_low=float(lo),
                         ci_high=float(hi), p_value=float(p), null_hypothesis=null, n=n))

    add("coverage", "share_selected", res.share, np.nan, res.share_ci[0], res.share_ci[1])
    for k in ("selected", "full", "joint"):
        est, se, lo, hi = res.explained[k]
        add("coverage", f"explained_{k}", est, se, lo, hi)
    b, se, lo, hi, p = res.beyond
    add("coverage", "beyond_selected", b, se, lo, hi, p, "<= 0")
    add("coverage", "heterogeneity", res.heterogeneity[0], np.nan, np.nan, np.nan, res.heterogeneity[2], "= 0")
    add("coverage", "detected", float(res.detected), null=f"joint BLP Wald p <= {res.alpha:g}")
    add("coverage", "warning", float(res.warning), null=f"share < {res.warn_below:g} and beyond_selected p <= "
                                                        f"{res.alpha:g}")
    for r in res.residual.itertuples():
        add("coverage_residual", str(r.feature), r.estimate, r.se, r.estimate - 1.96 * r.se,
            r.estimate + 1.96 * r.se, r.p_bonferroni, f"= 0 (Bonferroni over {int(r.n_tested)})")
    return pd.DataFrame(rows, columns=CALIBRATION_COLUMNS)


def neuron_candidates(indices: Sequence, values: Sequence, exclude: Sequence[int] = ()):
    """(sparse unit x neuron matrix of the neurons not in ``exclude``, their names ``neuron_<i>``) from per-unit
    index/value arrays (the ``neurons`` table layout)."""
    import scipy.sparse as sp

    lens = np.array([0 if ix is None else len(ix) for ix in indices], dtype=np.int64)
    cols = np.concatenate([np.asarray(ix, np.int64) for ix in indices if ix is not None and len(ix)]) \
        if lens.sum() else np.zeros(0, np.int64)
    vals = np.concatenate([np.asarray(v, float) for v in values if v is not None and len(v)]) \
        if lens.sum() else np.zeros(0)
    rows = np.repeat(np.arange(len(lens)), lens)
    m = int(cols.max()) + 1 if cols.size else 0
    Z = sp.csr_matrix((vals, (rows, cols)), shape=(len(lens), m))
    keep = np.setdiff1d(np.unique(cols), np.asarray(list(exclude), np.int64))
    return Z[:, keep].tocsc(), [f"neuron_{int(i)}" for i in keep]


def outcome_coverage(phi, s_selected, s_full, folds, cluster=None, indices=None, values=None,
                     selected_neurons: Sequence[int] = (), labels: Optional[Mapping[str, str]] = None,
                     alpha: float = 0.05, n_bootstrap: int = 200, seed: int = 0, warn_below: float = 0.8,
                     n_residual: int = 5, min_active: int = 20):
    """The effects stage's call: coverage of one outcome with the residual scan over the unselected neurons.

    Returns ``(result, calibration rows, MLflow metrics (un-prefixed), summary line)``."""
    features = names = None
    if indices is not None:
        features, names = neuron_candidates(indices, values, selected_neurons)
        if features.shape[1] == 0:
            features = names = None
    res = heterogeneity_coverage(phi, s_selected, s_full, folds, cluster, alpha=alpha, n_bootstrap=n_bootstrap,
                                 seed=seed, warn_below=warn_below, features=features, feature_names=names,
                                 n_residual=n_residual, min_active=min_active)
    metrics = {"coverage_share": res.share, "coverage_share_ci_low": res.share_ci[0],
               "coverage_share_ci_high": res.share_ci[1], "coverage_warning": float(res.warning),
               "coverage_explained_selected": res.explained["selected"][0],
               "coverage_explained_joint": res.explained["joint"][0], "coverage_beyond_p": res.beyond[4]}
    return res, coverage_frame(res), metrics, coverage_message(res, labels)


def coverage_facts(calibration: Optional[pd.DataFrame], labels: Optional[Mapping[str, str]] = None) -> Optional[dict]:
    """Headline of the ``coverage`` rows of one outcome's ``calibration`` rows (for the report and the run
    summary): share, CI, warning, the one-line message and the residual features with their labels."""
    if calibration is None or calibration.empty or "metric" not in calibration.columns:
        return None
    cov = calibration[calibration["metric"] == "coverage"].set_index("group")
    if "share_selected" not in cov.index:
        return None
    get = lambda g, c="estimate": float(cov.loc[g, c]) if g in cov.index else np.nan  # noqa: E731
    resid = calibration[calibration["metric"] == "coverage_residual"]
    residual = [{"feature": str(r.group), "label": (labels or {}).get(str(r.group)), "estimate": float(r.estimate),
                 "p_bonferroni": float(r.p_value)} for r in resid.itertuples()]
    res = CoverageResult(
        share=get("share_selected"), share_ci=(get("share_selected", "ci_low"), get("share_selected", "ci_high")),
        explained={k: (get(f"explained_{k}"), get(f"explained_{k}", "se"), get(f"explained_{k}", "ci_low"),
                       get(f"explained_{k}", "ci_high")) for k in ("selected", "full", "joint")},
        beyond=(get("beyond_selected"), get("beyond_selected", "se"), get("beyond_selected", "ci_low"),
                get("beyond_selected", "ci_high"), get("beyond_selected", "p_value")),
        heterogeneity=(get("heterogeneity"), 2, get("heterogeneity", "p_value")), n=int(cov["n"].iloc[0]),
        alpha=np.nan, warn_below=np.nan, n_bootstrap=0,
        residual=pd.DataFrame([{"feature": r["feature"], "t": np.nan, **r} for r in residual]))
    warning, detected = bool(get("warning") == 1.0), bool(get("detected") == 1.0)
    return {"share": res.share, "ci_low": res.share_ci[0], "ci_high": res.share_ci[1], "warning": warning,
            "detected": detected, "heterogeneity_p": res.heterogeneity[2], "beyond_p": res.beyond[4],
            "residual": residual, "line": coverage_message(res, labels, detected=detected, warning=warning)}
