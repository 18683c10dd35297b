"""GCM nuisance learners: ridge on a basis of Z_S (spline or poly2, from per-fold Grams) and LightGBM.

The basis ridges are fit from additive per-fold Gram matrices: fold k's out-of-fold fit solves
(A - A_k + Λ) c_k = b - b_k, where A = Σ_k A_k, so a distributed job needs one pass per nuisance and the
fit is exactly the in-memory one. The intercept is not penalized, so with S = ∅ the nuisance is the out-of-fold
mean. The bases and penalties are in ``stats.py`` (``basis_matrix``, ``basis_penalty``).

LightGBM has no additive sufficient statistics: fold k's model is trained on the rows of the other folds. One
fold's fit is the pure function :func:`lgbm_fit` (training rows in, serialisable model out) and its use the pure
function :func:`lgbm_predict`; the in-memory cross-fit (:func:`lgbm_crossfit`) and the Spark job (one task per
fold, ``identify/job.py``) both go through them, so with the same training rows in the same order they produce
the same models bit for bit (LightGBM with ``deterministic=True, force_row_wise=True, n_jobs=1``).
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np
from scipy.linalg import lu_factor, lu_solve

LGBM_PARAMS = dict(n_estimators=100, learning_rate=0.1, num_leaves=15, min_child_samples=20,
                   subsample=1.0, colsample_bytree=1.0, n_jobs=1, deterministic=True, force_row_wise=True,
                   verbose=-1)

FoldModel = Union[str, float]  # a LightGBM model string, or the training mean when there are no features


def fold_factors(A, penalty):
    """The LU factors of fold k's ridge matrix Σ_l A_l - A_k + penalty, for each fold k (per-fold Grams A,
    K x q x q): what :func:`ridge_from_grams` solves with, kept when several right-hand sides share the matrices."""
    At = A.sum(0)
    return [lu_factor(At - A[k] + penalty) for k in range(A.shape[0])]


def ridge_from_grams(A, b, penalty, factors=None):
    """Out-of-fold ridge coefficients, one row per fold, from per-fold Grams A (K x q x q) and b (K x q, or
    K x q x r for r right-hand sides): fold k's fit solves (Σ_l A_l - A_k + penalty) c_k = Σ_l b_l - b_k
    (``stats.basis_penalty``: intercept unpenalized); ``factors``: :func:`fold_factors` of A and penalty."""
    factors = fold_factors(A, penalty) if factors is None else factors
    bt = b.sum(0)
    return np.stack([lu_solve(f, bt - b[k]) for k, f in enumerate(factors)])


def _lightgbm():
    try:
        import lightgbm
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ValueError("nuisance='lgbm' needs the lightgbm package (pip install lightgbm)") from exc
    return lightgbm


def lgbm_fit(X, target, seed) -> FoldModel:
    """One fold's nuisance, trained on its training rows (in the given order): a LightGBM model string, or the
    mean of ``target`` when X has no columns (S = ∅)."""
    X = np.ascontiguousarray(X, dtype=float)
    target = np.asarray(target, dtype=float)
    if X.shape[1] == 0:
        return float(target.mean())
    model = _lightgbm().LGBMRegressor(**LGBM_PARAMS, random_state=seed)
    model.fit(X, target)
    return model.booster_.model_to_string()


def lgbm_predict(model: FoldModel, X) -> np.ndarray:
    """Predictions of a :func:`lgbm_fit` model for the rows of X."""
    X = np.ascontiguousarray(X, dtype=float)
    if isinstance(model, float):
        return np.full(X.shape[0], model)
    return _lightgbm().Booster(model_str=model).predict(X)


def predict_out_of_fold(models: Sequence[FoldModel], X, folds) -> np.ndarray:
    """Row i predicted by the model of its own fold (``models[k]`` was trained without fold k)."""
    folds = np.asarray(folds)
    pred = np.empty(X.shape[0])
    for k, model in enumerate(models):
        rows = folds == k
        if rows.any():
            pred[rows] = lgbm_predict(model, X[rows])
    return pred


def lgbm_crossfit(XS, target, folds, n_folds, seed):
    """Out-of-fold LightGBM predictions of target from XS (the out-of-fold mean when XS has no columns)."""
    folds = np.asarray(folds)
    models = [lgbm_fit(XS[folds != k], target[folds != k], seed) for k in range(n_folds)]
    return predict_out_of_fold(models, XS, folds)


def pseudo_outcome(y, t, m_hat, e):
    """GCM pseudo-outcome φ = (y - m̂)(t - e)/(e(1 - e)) (the same arithmetic as the in-memory engine)."""
    return (y - m_hat) * (t - e) / (e * (1 - e))
