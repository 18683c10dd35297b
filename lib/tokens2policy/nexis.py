"""NEXIS as a scikit-learn style estimator over in-memory arrays: ``Nexis(alpha=0.05, test="hc2").fit(y, t, z)``.

A thin shell around :func:`tokens2policy.identify.nexis` (the engine the Spark stage reduces to): the constructor
only stores the engine's settings, :meth:`Nexis.fit` hands them and the data to the engine once — which validates
both and raises ``ValueError`` with one line — and keeps what it returns as fitted attributes ending in ``_``.
The constructor's defaults are read from the engine's signature, so the estimator and the engine cannot disagree
(a test checks that the names and defaults are the same).
"""
from __future__ import annotations

import inspect
from typing import Any, List, Optional

import numpy as np
from sklearn.base import BaseEstimator

from tokens2policy.identify import nexis

# nexis() arguments that are data (passed to fit), not settings
DATA_ARGUMENTS = ("y", "t", "z", "w", "cluster", "folds")
_ENGINE = inspect.signature(nexis).parameters


def _default(name: str) -> Any:
    return _ENGINE[name].default


def engine_settings() -> dict:
    """The engine's settings and their defaults: every keyword of :func:`nexis` that is not data or private."""
    return {name: p.default for name, p in _ENGINE.items()
            if name not in DATA_ARGUMENTS and not name.startswith("_")}


def _columns(x) -> tuple:
    """(array or sparse matrix, column names or None): a pandas DataFrame gives its column names."""
    if x is None:
        return None, None
    if hasattr(x, "columns") and hasattr(x, "to_numpy"):
        return x.to_numpy(dtype=float), np.asarray([str(c) for c in x.columns], dtype=object)
    return x, None


def _vector(x):
    return x.to_numpy() if hasattr(x, "to_numpy") else x


class Nexis(BaseEstimator):
    """Select the direct effect modifiers of a randomized treatment among the columns of ``z`` (and ``w``).

    Parameters (the engine's; see ``docs/identify.md``)
    ----------
    alpha : level of Gate 1 (forward) and of the backward step.
    test : "linear", "hc2", "cluster" (needs ``cluster`` at fit) or "gcm".
    adjust : Gate 1 multiplicity: "FWER" (Bonferroni over the candidates tested), "FDR" or None.
    rho : Gate 2 (spectral gap) ratio; None switches it off.
    backward : backward elimination after each forward pass.
    nuisance, z_nuisance, n_folds, seed : GCM cross-fitted learners of the outcome side and of the tested column
        ("spline", "poly2", "linear" or "lgbm"; docs/identify.md), folds and their seed.
    max_rounds : forward/backward rounds at most.
    min_active : columns with fewer non-zero entries are skipped (recorded in ``trace_``).

    Fitted attributes
    -----------------
    selected_ : column indices of ``z`` selected, in order of addition.
    pvalues_, tstats_ : each selected column's test given all the other selected ones, p(j | S∖{j}).
    round_added_ : the round each selected column entered.
    selected_w_, pvalues_w_, tstats_w_ : the same for the columns of ``w`` (empty without ``w``).
    trace_ : every decision of the search (skip, add, stop with the gate that stopped it, drop) as dicts;
        ``pandas.DataFrame(est.trace_)`` shows it as a table.
    converged_ : whether the forward/backward search reached a fixed point within ``max_rounds``.
    n_features_in_ : number of columns of ``z``; feature_names_in_ / selected_names_ : their names when ``z`` was
        a pandas DataFrame (likewise ``w_names_in_`` / ``selected_w_names_`` for ``w``).
    result_ : the engine's :class:`tokens2policy.identify.NexisResult`.
    """

    def __init__(self, alpha=_default("alpha"), test=_default("test"), adjust=_default("adjust"),
                 rho=_default("rho"), backward=_default("backward"), nuisance=_default("nuisance"),
                 z_nuisance=_default("z_nuisance"), n_folds=_default("n_folds"), max_rounds=_default("max_rounds"), seed=_default("seed"),
                 min_active=_default("min_active")):
        self.alpha = alpha
        self.test = test
        self.adjust = adjust
        self.rho = rho
        self.backward = backward
        self.nuisance = nuisance
        self.z_nuisance = z_nuisance
        self.n_folds = n_folds
        self.max_rounds = max_rounds
        self.seed = seed
        self.min_active = min_active

    def fit(self, y, t, z, w=None, *, cluster=None, folds=None) -> "Nexis":
        """Run the search on outcome ``y``, 0/1 treatment ``t``, candidates ``z`` (n × m array, scipy.sparse
        matrix or DataFrame; never densified when sparse) and optional covariates ``w`` (searched first).
        ``cluster``: cluster ids for ``test="cluster"``; ``folds``: stored fold ids for GCM cross-fitting."""
        z_values, z_names = _columns(z)
        w_values, w_names = _columns(w)
        result = nexis(_vector(y), _vector(t), z_values, w=w_values, cluster=_vector(cluster),
                       folds=_vector(folds), **self.get_params())
        self.result_ = result
        self.selected_ = result.selected
        self.pvalues_ = result.pvalues
        self.tstats_ = result.tstats
        self.round_added_ = result.round_added
        self.selected_w_ = result.selected_w
        self.pvalues_w_ = result.pvalues_w
        self.tstats_w_ = result.tstats_w
        self.trace_ = result.trace
        self.converged_ = result.converged
        self.n_features_in_ = int(z_values.shape[1])
        if z_names is not None:
            self.feature_names_in_ = z_names
            self.selected_names_ = z_names[result.selected].tolist()
        if w_names is not None:
            self.w_names_in_ = w_names
            self.selected_w_names_ = w_names[result.selected_w].tolist()
        return self

    def get_support(self, indices: bool = False):
        """Boolean mask over the columns of ``z`` (or their indices, in order of addition) of the selection."""
        self._check_fitted()
        if indices:
            return np.asarray(self.selected_, dtype=int)
        mask = np.zeros(self.n_features_in_, dtype=bool)
        mask[self.selected_] = True
        return mask

    def transform(self, z):
        """The selected columns of ``z`` (same kind as given: array, sparse matrix or DataFrame)."""
        self._check_fitted()
        if z.shape[1] != self.n_features_in_:
            raise ValueError(f"z has {z.shape[1]} columns; the selection was made on {self.n_features_in_}")
        if hasattr(z, "iloc"):
            return z.iloc[:, self.selected_]
        return z[:, self.selected_]

    def _check_fitted(self) -> None:
        if not hasattr(self, "selected_"):
            raise ValueError("this Nexis instance is not fitted yet: call fit(y, t, z) first")

    def summary(self) -> List[dict]:
        """One dict per selected column of ``z``: index, name (when known), t, p given the rest, round added."""
        self._check_fitted()
        names: Optional[List[str]] = getattr(self, "selected_names_", None)
        return [{"feature": int(j), "name": names[i] if names else None, "t": float(self.tstats_[i]),
                 "p_value": float(self.pvalues_[i]), "round_added": int(self.round_added_[i])}
                for i, j in enumerate(self.selected_)]
