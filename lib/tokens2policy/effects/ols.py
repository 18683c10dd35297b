"""Least squares with heteroskedasticity- and cluster-robust covariance — the one regression every estimate here uses.

* ``HC1`` (White 1980; MacKinnon & White 1985): ``n/(n-k) · (X'X)⁻¹ X' diag(e²) X (X'X)⁻¹``. Under randomization the
  saturated regression ``Y ~ 1 + T`` with HC1 reproduces Neyman's conservative variance (up to the n/(n-k) factor),
  which is why it is the default for experiments (Athey & Imbens 2017, "The econometrics of randomized experiments").
* ``CR1S`` (Liang & Zeger 1986; the Stata small-sample form, Cameron & Miller 2015):
  ``G/(G-1) · (n-1)/(n-k) · (X'X)⁻¹ Σ_g X_g'e_g e_g'X_g (X'X)⁻¹``, with t(G-1) critical values.

Confidence intervals use the normal quantile for HC1 and Student t with G-1 degrees of freedom for CR1S.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class OLSResult:
    coef: np.ndarray  # (k,)
    cov: np.ndarray  # (k, k) robust covariance
    n: int
    n_clusters: Optional[int]
    se_type: str  # "HC1" or "CR1S"

    @property
    def se(self) -> np.ndarray:
        return np.sqrt(np.clip(np.diag(self.cov), 0.0, None))

    @property
    def df(self) -> float:
        """Degrees of freedom of the reference distribution (inf = normal)."""
        return float(self.n_clusters - 1) if self.n_clusters is not None else np.inf

    def critical_value(self, alpha: float = 0.05) -> float:
        return float(stats.norm.ppf(1 - alpha / 2) if np.isinf(self.df) else stats.t.ppf(1 - alpha / 2, self.df))

    def p_value(self, z: np.ndarray) -> np.ndarray:
        z = np.abs(np.asarray(z, dtype=float))
        return 2 * (stats.norm.sf(z) if np.isinf(self.df) else stats.t.sf(z, self.df))

    def linear_combination(self, L: np.ndarray, alpha: float = 0.05):
        """Estimate, SE, CI bounds and p-value of each row of ``L @ coef`` (L: (m, k) or (k,))."""
        L = np.atleast_2d(np.asarray(L, dtype=float))
        est = L @ self.coef
        se = np.sqrt(np.clip(np.einsum("ij,jk,ik->i", L, self.cov, L), 0.0, None))
        crit = self.critical_value(alpha)
        with np.errstate(divide="ignore", invalid="ignore"):
            p = self.p_value(est / se)
        return est, se, est - crit * se, est + crit * se, p


def _cluster_codes(cluster) -> np.ndarray:
    _, codes = np.unique(np.asarray(cluster), return_inverse=True)
    return codes.ravel()


def ols(X: np.ndarray, y: np.ndarray, cluster=None, weights: Optional[np.ndarray] = None) -> OLSResult:
    """Fit ``y ~ X`` (X includes any intercept) by (weighted) least squares with HC1, or CR1S when ``cluster`` is given.

    Raises ValueError on shape mismatch, non-finite input or fewer rows than columns. A rank-deficient design uses
    the pseudo-inverse (the aliased coefficient's SE is then not meaningful; callers drop constant columns first).
    """
    X = np.asarray(X, dtype=float)
    y = np.asarray(y, dtype=float).ravel()
    if X.ndim != 2 or X.shape[0] != y.shape[0]:
        raise ValueError(f"ols: X must be (n, k) with n = len(y); got X{X.shape}, y({y.shape[0]},)")
    n, k = X.shape
    if n <= k:
        raise ValueError(f"ols: need more rows than columns, got n={n}, k={k}")
    if not (np.isfinite(X).all() and np.isfinite(y).all()):
        raise ValueError("ols: X and y must be finite (drop or impute missing values first)")
    if weights is not None:
        w = np.sqrt(np.asarray(weights, dtype=float).ravel())
        X, y = X * w[:, None], y * w
    xtx_inv = np.linalg.pinv(X.T @ X)
    coef = xtx_inv @ (X.T @ y)
    resid = y - X @ coef
    if cluster is None:
        meat = (X * (resid**2)[:, None]).T @ X
        cov = n / (n - k) * xtx_inv @ meat @ xtx_inv
        return OLSResult(coef, cov, n, None, "HC1")
    codes = _cluster_codes(cluster)
    if codes.shape[0] != n:
        raise ValueError(f"ols: cluster must have length n={n}, got {codes.shape[0]}")
    g = int(codes.max()) + 1
    if g < 2:
        raise ValueError("ols: cluster-robust SEs need at least 2 clusters")
    scores = np.zeros((g, k))
    np.add.at(scores, codes, X * resid[:, None])
    cov = g / (g - 1) * (n - 1) / (n - k) * xtx_inv @ (scores.T @ scores) @ xtx_inv
    return OLSResult(coef, cov, n, g, "CR1S")


def mean_with_se(values: np.ndarray, cluster=None, alpha: float = 0.05):
    """Mean of ``values`` with its (cluster-)robust SE and CI: the intercept-only regression. Returns
    ``(estimate, se, ci_low, ci_high, p_value)``."""
    values = np.asarray(values, dtype=float).ravel()
    res = ols(np.ones((values.shape[0], 1)), values, cluster=cluster)
    est, se, lo, hi, p = res.linear_combination(np.array([1.0]), alpha)
    return float(est[0]), float(se[0]), float(lo[0]), float(hi[0]), float(p[0])
