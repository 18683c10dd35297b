"""Cross-fitted CATE learners: DR-learner (Kennedy 2023) and R-learner (Nie & Wager 2021).

EconML-style separation (Chernozhukov et al. 2018, "Double/debiased machine learning"):

1. **Nuisances**, cross-fitted over the GIVEN fold ids: for each fold k, outcome regressions μ₀(x), μ₁(x) fitted on
   the other folds and predicted on fold k; the propensity e(x) is the known randomization share (the treated share
   of the training folds, or a configured constant) unless a model is requested. One fold's fit is the pure
   function :func:`fit_fold_nuisances` — the Spark job runs it as one task per fold, :func:`cross_fit_nuisances`
   runs it sequentially, and both give identical numbers because the fold's seed is derived from ``(seed, fold)``.
2. **Final stage** on pseudo-outcomes with weights:

   * DR-learner: the AIPW score φ = μ₁ − μ₀ + T(Y − μ₁)/e − (1 − T)(Y − μ₀)/(1 − e), weight 1; E[φ | X] = τ(X).
   * R-learner: Robinson residuals Ỹ = Y − m(X), T̃ = T − e(X) with m = eμ₁ + (1 − e)μ₀; minimising
     Σ (Ỹ − τ(X)T̃)² equals a regression of Ỹ/T̃ on X with weights T̃².

   ``final="linear"``: weighted OLS on ``[1, Z]`` (Z = the NEXIS-selected modifiers) with HC1/CR1S covariance V, so
   each unit gets τ̂(z) = [1, z]β̂ with CI from ``[1, z] V [1, z]'`` (the CI is for the best linear projection of τ
   on Z — Semenova & Chernozhukov 2021). ``final`` in {"ridge", "hgb", "forest"}: flexible comparison models on
   the full feature set (no per-unit CIs).

Out-of-fold final-stage predictions (``oof_cate_``) — final stage fit without fold k, predicted on fold k — feed
calibration (BLP, GATES, RATE) and the policy stage's cross-fitted rules. **Nested cross-fitting** makes them
truly held out: the pseudo-outcome of a unit in fold j ≠ k that trains fold k's final stage comes from nuisances
fitted without folds j *and* k (:func:`cross_fit_nuisances` with ``nested=True``, one fit per pair of folds), so
no outcome of fold k reaches fold k's prediction — not even through the other folds' nuisances, which plain
cross-fitting trains on fold k (a second-order leak). ``oof_nested_`` says which one a fit used.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .ols import OLSResult, ols

REGRESSORS = ("ridge", "hgb", "lgbm", "forest")
FINAL_STAGES = ("linear",) + REGRESSORS


@dataclass(frozen=True)
class NuisanceParams:
    """How one fold's nuisances are fitted.

    model: outcome regression family — ``ridge`` (standardised RidgeCV: :class:`.ridge.GramRidgeCV`), ``hgb``/``lgbm`` (sklearn's
      LightGBM-style histogram gradient boosting), ``forest`` (random forest).
    propensity: ``None`` → treated share of the training folds (the randomization share); a float → that known
      constant; ``"model"`` → logistic regression on X (observational data or adaptive designs).
    clip: propensities are clipped into [clip, 1 − clip].
    """

    model: str = "ridge"
    propensity: Union[None, float, str] = None
    clip: float = 0.01

    def __post_init__(self):
        if self.model not in REGRESSORS:
            raise ValueError(f"nuisance model must be one of {REGRESSORS}, got {self.model!r}")
        p = self.propensity
        if not (p is None or p == "model" or (isinstance(p, (int, float)) and 0 < float(p) < 1)):
            raise ValueError(f"propensity must be None, 'model' or a share in (0, 1), got {p!r}")
        if not 0 <= self.clip < 0.5:
            raise ValueError(f"clip must be in [0, 0.5), got {self.clip}")


def fold_seed(seed: int, *folds: int) -> int:
    """Deterministic per-fold seed: the same on the driver and in any executor. A nuisance fit that leaves out two
    folds (nested cross-fitting) is seeded by both: ``fold_seed(seed, j, k)``."""
    words = [int(seed) & 0xFFFFFFFF] + [int(f) & 0xFFFFFFFF for f in folds]
    return int(np.random.SeedSequence(words).generate_state(1)[0])


def nuisance_tasks(fold_ids: Sequence[int], nested: bool = True) -> List[Tuple[int, ...]]:
    """The folds each nuisance fit leaves out: ``(k,)`` for every fold (plain cross-fitting) and, with ``nested``,
    ``(j, k)`` for every pair j < k. A fit leaving out ``excl`` trains on the other folds and predicts the units
    of the folds in ``excl``."""
    ids = sorted(int(k) for k in fold_ids)
    tasks: List[Tuple[int, ...]] = [(k,) for k in ids]
    if nested:
        tasks += [(j, k) for a, j in enumerate(ids) for k in ids[a + 1:]]
    return tasks


def make_regressor(kind: str, seed: int):
    """A fresh sklearn regressor of the named family (all accept ``sample_weight``)."""
    if kind == "ridge":
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        from .ridge import GramRidgeCV

        return make_pipeline(StandardScaler(), GramRidgeCV(alphas=np.logspace(-3, 4, 15)))
    if kind in ("hgb", "lgbm"):
        from sklearn.ensemble import HistGradientBoostingRegressor

        return HistGradientBoostingRegressor(
            max_iter=200, learning_rate=0.05, max_leaf_nodes=15, min_samples_leaf=20,
            l2_regularization=1.0, early_stopping=False, random_state=seed,
        )
    if kind == "forest":
        from sklearn.ensemble import RandomForestRegressor

        return RandomForestRegressor(n_estimators=200, min_samples_leaf=5, max_features=0.5, n_jobs=1, random_state=seed)
    raise ValueError(f"regressor must be one of {REGRESSORS}, got {kind!r}")


def _fit_weighted(model, X, y, w=None):
    if w is None:
        return model.fit(X, y)
    if hasattr(model, "steps"):  # a Pipeline: route the weight to its last step
        return model.fit(X, y, **{f"{model.steps[-1][0]}__sample_weight": w})
    return model.fit(X, y, sample_weight=w)


def _as_2d(X, n=None, name="X") -> np.ndarray:
    X = np.asarray(X, dtype=float)
    if X.ndim == 1:
        X = X[:, None]
    if X.ndim != 2 or (n is not None and X.shape[0] != n):
        raise ValueError(f"{name} must be (n, p) with n={n}, got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError(f"{name} must be finite")
    return X


def fit_fold_nuisances(
    train: Tuple[np.ndarray, np.ndarray, np.ndarray],
    predict_X: np.ndarray,
    fold: Union[int, Sequence[int]],
    params: NuisanceParams,
    seed: int,
) -> Dict[str, np.ndarray]:
    """Fit the nuisances on ``train = (X, t, y)`` (the rows outside ``fold``) and predict ``predict_X`` (fold's rows).

    ``fold``: the left-out fold, or the tuple of left-out folds of a nested fit (it only seeds the fit).
    Pure: the result depends only on the arguments (row order included), so any executor reproduces it.
    Returns ``{"mu0", "mu1", "e"}`` arrays aligned with ``predict_X``."""
    X, t, y = train
    X = _as_2d(X, name="train X")
    n = X.shape[0]
    t = np.asarray(t).ravel()
    y = np.asarray(y, dtype=float).ravel()
    if t.shape[0] != n or y.shape[0] != n:
        raise ValueError("train X, t, y must have the same number of rows")
    predict_X = _as_2d(predict_X, name="predict X")
    if predict_X.shape[1] != X.shape[1]:
        raise ValueError(f"predict X has {predict_X.shape[1]} columns, train X has {X.shape[1]}")
    treated = t == 1
    if treated.sum() < 2 or (~treated).sum() < 2:
        raise ValueError(f"fold {fold}: training rows need at least 2 treated and 2 control units")
    s = fold_seed(seed, *np.atleast_1d(fold).tolist())
    out = {}
    for arm, mask in (("mu0", ~treated), ("mu1", treated)):
        model = make_regressor(params.model, s + (1 if arm == "mu1" else 0))
        out[arm] = _fit_weighted(model, X[mask], y[mask]).predict(predict_X)
    if params.propensity == "model":
        from sklearn.linear_model import LogisticRegression

        clf = LogisticRegression(C=1.0, max_iter=1000).fit(X, t.astype(int))
        e = clf.predict_proba(predict_X)[:, 1]
    else:
        share = float(treated.mean()) if params.propensity is None else float(params.propensity)
        e = np.full(predict_X.shape[0], share)
    out["e"] = np.clip(e, params.clip, 1 - params.clip)
    return out


def cross_fit_nuisances(X, t, y, folds, params: NuisanceParams = NuisanceParams(), seed: int = 0,
                        nested: bool = False) -> Dict[str, np.ndarray]:
    """Sequential cross-fitting: for each fold k, :func:`fit_fold_nuisances` on the rows with fold ≠ k.

    Returns ``{"mu0", "mu1", "e"}`` (each unit predicted by the fit without its own fold). With ``nested`` also
    ``"fold_ids"`` (the sorted fold ids) and ``"nested"``: ``{"mu0", "mu1", "e"}`` arrays of shape (n, K) whose
    column c holds, for a unit of fold j, the prediction of the fit without folds j and ``fold_ids[c]`` (the
    plain prediction when ``fold_ids[c] == j``) — what fold ``fold_ids[c]``'s held-out final stage trains on."""
    X = _as_2d(X)
    n = X.shape[0]
    t = np.asarray(t).ravel()
    y = np.asarray(y, dtype=float).ravel()
    folds = np.asarray(folds).ravel()
    if not (t.shape[0] == y.shape[0] == folds.shape[0] == n):
        raise ValueError("X, t, y and folds must have the same number of rows")
    uniq = np.unique(folds)
    if uniq.size < 2:
        raise ValueError(f"cross-fitting needs at least 2 folds, got {uniq.size}")
    if nested and uniq.size < 3:
        raise ValueError(f"nested cross-fitting needs at least 3 folds, got {uniq.size}")
    keys = ("mu0", "mu1", "e")
    out = {k: np.empty(n) for k in keys}
    cube = {k: np.full((n, uniq.size), np.nan) for k in keys}
    col = {int(k): c for c, k in enumerate(uniq)}
    for excl in nuisance_tasks(uniq, nested):
        test = np.isin(folds, excl)
        res = fit_fold_nuisances((X[~test], t[~test], y[~test]), X[test], excl if len(excl) > 1 else excl[0],
                                 params, seed)
        rows = np.flatnonzero(test)
        for key in keys:
            if len(excl) == 1:
                out[key][rows] = res[key]
                cube[key][rows, col[excl[0]]] = res[key]
            else:  # a unit of fold j predicted without (j, k): column k
                other = np.where(folds[rows] == excl[0], excl[1], excl[0])
                cube[key][rows, [col[int(o)] for o in other]] = res[key]
    if nested:
        out["fold_ids"] = uniq
        out["nested"] = cube
    return out


def aipw_scores(t, y, mu0, mu1, e) -> np.ndarray:
    """Doubly-robust (AIPW) score of each action, shape (n, 2): Γᵢ(a) = μ_a(Xᵢ) + 1{Tᵢ=a}(Yᵢ − μ_a(Xᵢ))/P(T=a|Xᵢ).

    mean Γ(a) estimates E[Y(a)]; Γ(1) − Γ(0) is the DR-learner pseudo-outcome (Robins, Rotnitzky & Zhao 1994)."""
    t = np.asarray(t, dtype=float).ravel()
    y = np.asarray(y, dtype=float).ravel()
    g1 = mu1 + t * (y - mu1) / e
    g0 = mu0 + (1 - t) * (y - mu0) / (1 - e)
    return np.column_stack([g0, g1])


class _CrossFitLearner:
    """Shared machinery: nuisances → (pseudo-outcome, weight) → final stage, plus out-of-fold final predictions."""

    def __init__(self, nuisance: NuisanceParams = NuisanceParams(), final: str = "linear", alpha: float = 0.05, seed: int = 0):
        if final not in FINAL_STAGES:
            raise ValueError(f"final must be one of {FINAL_STAGES}, got {final!r}")
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        self.nuisance = nuisance
        self.final = final
        self.alpha = alpha
        self.seed = seed

    def _pseudo(self, t, y, nu) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        raise NotImplementedError

    def _fit_final(self, Z, target, w, cluster, seed):
        if self.final == "linear":
            return ols(np.column_stack([np.ones(Z.shape[0]), Z]), target, cluster=cluster, weights=w)
        return _fit_weighted(make_regressor(self.final, seed), Z, target, w)

    def _predict_final(self, model, Z):
        if isinstance(model, OLSResult):
            return np.column_stack([np.ones(Z.shape[0]), Z]) @ model.coef
        return model.predict(Z)

    def fit(self, X, t, y, folds, Z=None, cluster=None, nuisances: Optional[Dict[str, np.ndarray]] = None):
        """Fit on nuisance features X and final-stage features Z (default X).

        ``nuisances``: precomputed cross-fitted ``{"mu0", "mu1", "e"}`` (e.g. from the Spark per-fold job), with
        ``"nested"`` and ``"fold_ids"`` for nested cross-fitting (:func:`cross_fit_nuisances`); else they are
        cross-fitted here over ``folds``, nested when there are at least 3 folds. ``cluster``: ids for CR1S
        covariance of the linear final stage."""
        y = np.asarray(y, dtype=float).ravel()
        n = y.shape[0]
        t = np.asarray(t).ravel()
        if t.shape[0] != n or not np.isin(t, (0, 1)).all():
            raise ValueError("t must be a binary 0/1 array with one entry per outcome")
        folds = np.asarray(folds).ravel()
        if folds.shape[0] != n:
            raise ValueError(f"folds has length {folds.shape[0]}, expected {n}")
        uniq = np.unique(folds)
        if nuisances is None:
            nuisances = cross_fit_nuisances(X, t, y, folds, self.nuisance, self.seed, nested=uniq.size >= 3)
        nu = {k: np.asarray(nuisances[k], dtype=float).ravel() for k in ("mu0", "mu1", "e")}
        if any(v.shape[0] != n for v in nu.values()):
            raise ValueError("nuisance arrays must have one entry per unit")
        nested = nuisances.get("nested")
        if nested is not None:
            ids = [int(k) for k in np.asarray(nuisances["fold_ids"]).ravel()]
            if sorted(set(int(k) for k in uniq)) != sorted(ids):
                raise ValueError(f"nested nuisances are for folds {ids}, the units have folds {uniq.tolist()}")
            nested = {k: np.asarray(nested[k], dtype=float).reshape(n, len(ids)) for k in ("mu0", "mu1", "e")}
        Z = _as_2d(X if Z is None else Z, n, "Z")
        self.nuisances_ = nu
        self.scores_ = aipw_scores(t, y, nu["mu0"], nu["mu1"], nu["e"])
        target, w = self._pseudo(t, y, nu)
        self.pseudo_outcome_, self.weight_ = target, w
        self.model_ = self._fit_final(Z, target, w, cluster, self.seed)
        oof = np.empty(n)
        self.fold_models_ = {}
        for k in uniq:
            test = folds == k
            if nested is not None:  # the training units' pseudo-outcomes from nuisances fitted without fold k too
                c = ids.index(int(k))
                tk, wk = self._pseudo(t[~test], y[~test], {key: v[~test, c] for key, v in nested.items()})
            else:
                tk, wk = target[~test], None if w is None else w[~test]
            if not np.isfinite(tk).all():
                raise ValueError(f"fold {k}: nested nuisances are missing for some training units")
            model = self._fit_final(Z[~test], tk, wk, None if cluster is None else np.asarray(cluster)[~test],
                                    fold_seed(self.seed, int(k)))
            self.fold_models_[int(k)] = model
            oof[test] = self._predict_final(model, Z[test])
        self.oof_cate_ = oof
        self.oof_nested_ = nested is not None
        return self

    def effect_without(self, Z, fold: int) -> np.ndarray:
        """τ̂(z) of the final stage fitted without ``fold`` (what ``oof_cate_`` holds for that fold's units)."""
        self._check_fitted()
        if int(fold) not in self.fold_models_:
            raise ValueError(f"no final stage was fitted without fold {fold}; folds: {sorted(self.fold_models_)}")
        return self._predict_final(self.fold_models_[int(fold)], _as_2d(Z, name="Z"))

    def effect(self, Z) -> np.ndarray:
        """τ̂(z) from the full-sample final stage."""
        self._check_fitted()
        return self._predict_final(self.model_, _as_2d(Z, name="Z"))

    def effect_interval(self, Z, alpha: Optional[float] = None) -> Tuple[np.ndarray, np.ndarray]:
        """Pointwise CI of τ̂(z); only the linear final stage has one (flexible stages return NaN)."""
        self._check_fitted()
        Z = _as_2d(Z, name="Z")
        if not isinstance(self.model_, OLSResult):
            nan = np.full(Z.shape[0], np.nan)
            return nan, nan.copy()
        _, _, lo, hi, _ = self.model_.linear_combination(np.column_stack([np.ones(Z.shape[0]), Z]), alpha or self.alpha)
        return lo, hi

    @property
    def coef_(self) -> np.ndarray:
        """Linear final stage coefficients ``[intercept, Z...]``."""
        self._check_fitted()
        if not isinstance(self.model_, OLSResult):
            raise ValueError(f"coef_ exists only for final='linear', this learner has final={self.final!r}")
        return self.model_.coef

    def _check_fitted(self):
        if not hasattr(self, "model_"):
            raise ValueError(f"{type(self).__name__} is not fitted; call fit() first")


class DRLearner(_CrossFitLearner):
    """DR-learner (Kennedy 2023): regress the AIPW pseudo-outcome on the modifiers. Oracle-efficient when the
    nuisances converge at rate n^-1/4; unbiased for E[τ|Z] under known propensity even if μ is misspecified."""

    def _pseudo(self, t, y, nu):
        g = aipw_scores(t, y, nu["mu0"], nu["mu1"], nu["e"])
        return g[:, 1] - g[:, 0], None


class RLearner(_CrossFitLearner):
    """R-learner (Nie & Wager 2021): minimise the Robinson-residual loss Σ(Ỹ − τ(X)T̃)², i.e. a T̃²-weighted
    regression of Ỹ/T̃. Quasi-oracle: final-stage error is unaffected by first-order nuisance errors."""

    def _pseudo(self, t, y, nu):
        e = nu["e"]
        m = e * nu["mu1"] + (1 - e) * nu["mu0"]
        t_res = np.asarray(t, dtype=float) - e
        return (y - m) / t_res, t_res**2
