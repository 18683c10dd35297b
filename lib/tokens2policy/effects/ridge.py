"""The effects stage's ridge: sklearn's ``RidgeCV`` leave-one-out alpha choice at O(n p) per alpha.

Its own module so that importing :mod:`tokens2policy.effects` does not import sklearn (``learners.make_regressor``
imports it when a ridge is made).
"""
from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin


class GramRidgeCV(RegressorMixin, BaseEstimator):
    """sklearn's ``RidgeCV(alphas)`` (the default efficient leave-one-out over ``alphas``, intercept not
    penalised, weights as in sklearn: rows centred on the weighted means and scaled by √w) from ONE
    eigendecomposition of the centred Gram matrix X'X = V diag(λ) V'. With W = X V, the hat matrix of
    alpha is W diag(1/(λ + α)) W', so its diagonal costs O(n p) per alpha; sklearn's ``gcv_mode="cov"``
    (its choice when n > p) forms X (V diag V') X' row sums at O(n p²) per alpha, which made the 15-alpha
    ridge fits most of the effects stage's time at 10⁵–10⁶ units. Same leave-one-out errors and
    coefficients up to rounding, so the same alpha (tests/effects/test_effects_learners.py compares)."""

    def __init__(self, alphas=(0.1, 1.0, 10.0)):
        self.alphas = alphas

    def fit(self, X, y, sample_weight=None):
        X = np.asarray(X, dtype=float)
        y = np.asarray(y, dtype=float).ravel()
        n = X.shape[0]
        if sample_weight is None:
            sqrt_sw = np.ones(n)
            x_off, y_off = X.mean(axis=0), y.mean()
        else:
            sw = np.asarray(sample_weight, dtype=float).ravel()
            sqrt_sw = np.sqrt(sw)
            x_off, y_off = np.average(X, axis=0, weights=sw), np.average(y, weights=sw)
        Xc = (X - x_off) * sqrt_sw[:, None]
        yc = (y - y_off) * sqrt_sw
        lam, V = np.linalg.eigh(Xc.T @ Xc)
        W = Xc @ V
        W2, Wy, Ws = W ** 2, W.T @ yc, W.T @ sqrt_sw
        sw_sum = float(sqrt_sw @ sqrt_sw)
        best = None
        for alpha in np.atleast_1d(np.asarray(self.alphas, dtype=float)).tolist():
            D = 1.0 / (lam + alpha)
            c = yc - W @ (D * Wy)
            d = 1.0 - W2 @ D - (sqrt_sw - W @ (D * Ws)) * sqrt_sw / sw_sum
            score = -float(np.mean((c / d) ** 2))
            if best is None or score > best[0]:  # the first of equal scores, as sklearn
                best = (score, alpha, V @ (D * Wy))
        self.best_score_, self.alpha_, self.coef_ = best
        self.intercept_ = float(y_off - x_off @ self.coef_)
        self.n_features_in_ = X.shape[1]
        return self

    def predict(self, X):
        return np.asarray(X, dtype=float) @ self.coef_ + self.intercept_
