"""GCM nuisance learners: ridge on the degree-2 polynomial basis (from per-fold Grams) and LightGBM.

The poly2 ridge is fit from additive per-fold Gram matrices: fold k's out-of-fold fit solves
(A - A_k + λ I') c_k = b - b_k, where A = Σ_k A_k, so a distributed job needs one pass per nuisance and the
fit is exactly the in-memory one. The intercept is not penalized (I' is the identity with a zero in the
intercept slot), so with S = ∅ the nuisance is the out-of-fold mean.
"""
from __future__ import annotations

import numpy as np

RIDGE = 1.0
LGBM_PARAMS = dict(n_estimators=100, learning_rate=0.1, num_leaves=15, min_child_samples=20,
                   subsample=1.0, colsample_bytree=1.0, n_jobs=1, deterministic=True, force_row_wise=True,
                   verbose=-1)


def ridge_from_grams(A, b, ridge=RIDGE):
    """Out-of-fold ridge coefficients, one row per fold, from per-fold Grams A (K x q x q) and b (K x q)."""
    K, q, _ = A.shape
    pen = ridge * np.eye(q)
    pen[0, 0] = 0.0
    At, bt = A.sum(0), b.sum(0)
    return np.stack([np.linalg.solve(At - A[k] + pen, bt - b[k]) for k in range(K)])


def lgbm_crossfit(XS, target, folds, n_folds, seed):
    """Out-of-fold LightGBM predictions of target from XS (the out-of-fold mean when XS has no columns)."""
    pred = np.empty(len(target))
    for k in range(n_folds):
        te = folds == k
        if XS.shape[1] == 0:
            pred[te] = target[~te].mean()
            continue
        try:
            import lightgbm
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ValueError("nuisance='lgbm' needs the lightgbm package (pip install lightgbm)") from exc
        model = lightgbm.LGBMRegressor(**LGBM_PARAMS, random_state=seed)
        model.fit(XS[~te], target[~te])
        pred[te] = model.predict(XS[te])
    return pred
