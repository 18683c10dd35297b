"""The fitted linear final stages of the effects stage, kept as data (as EconML keeps ``model_final_``).

A ``*_selected`` learner's final stage is a weighted OLS of its pseudo-outcome on ``[1, Z]`` (Z: the selected
modifiers in the ``effects.modifier_encoding`` design, :func:`tokens2policy.effects.gates.encode_modifiers`) with an
HC1/CR1S covariance (:mod:`tokens2policy.effects.ols`). Its CATE is τ̂(z) = [1, z]β and its CI
τ̂(z) ± c·√([1, z] V [1, z]'). The effects stage writes β, V, c and what they are about — one row per
(experiment, outcome, learner) of table ``cate_final_stages`` — so whatever serves the CATE later (the policy
stage's registered model) reads the fitted numbers instead of refitting them from stored nuisances.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from .ols import OLSResult

INTERCEPT = "(intercept)"
COLUMNS = ("experiment_id", "outcome", "learner", "terms", "coef", "cov", "se_type", "n_clusters",
           "critical_value", "alpha", "encoding", "n", "estimated_on")


@dataclass(frozen=True)
class LinearFinalStage:
    """One fitted linear final stage: ``coef``/``cov`` over ``terms`` (``(intercept)`` first, then the design
    columns of the selected modifiers), the CI's ``critical_value`` at level ``alpha``, the modifier
    ``encoding`` of the design, the number of units ``n`` it was fitted on and which units those were
    (``estimated_on``, :func:`tokens2policy.honesty.estimated_on`)."""

    experiment_id: str
    outcome: str
    learner: str
    terms: List[str]
    coef: List[float]
    cov: List[List[float]]
    se_type: str
    n_clusters: Optional[int]
    critical_value: float
    alpha: float
    encoding: str
    n: int
    estimated_on: str

    def __post_init__(self):
        k = len(self.terms)
        if len(self.coef) != k or np.shape(self.cov) != (k, k):
            raise ValueError(f"final stage {self.experiment_id}/{self.outcome}/{self.learner}: {k} terms but "
                             f"{len(self.coef)} coefficients and a {np.shape(self.cov)} covariance")

    @classmethod
    def from_learner(cls, experiment_id: str, outcome: str, learner_name: str, learner, design_names: Sequence[str],
                     encoding: str, estimated_on: str) -> "LinearFinalStage":
        """The final stage of a fitted learner with ``final="linear"`` (its ``model_``), fitted on ``[1, Z]`` with
        Z's columns named ``design_names``."""
        model = getattr(learner, "model_", None)
        if not isinstance(model, OLSResult):
            raise ValueError(f"learner '{learner_name}' has no fitted linear final stage (final={learner.final!r})")
        return cls(str(experiment_id), str(outcome), learner_name, [INTERCEPT, *design_names],
                   [float(c) for c in model.coef], np.asarray(model.cov, dtype=float).tolist(), model.se_type,
                   None if model.n_clusters is None else int(model.n_clusters),
                   float(model.critical_value(learner.alpha)), float(learner.alpha), encoding, int(model.n),
                   estimated_on)

    @classmethod
    def from_row(cls, row: Mapping) -> "LinearFinalStage":
        """From a ``cate_final_stages`` row (a pandas row, a dict or a Spark Row's ``asDict()``)."""
        get = row.get if hasattr(row, "get") else row.__getitem__
        n_clusters = get("n_clusters")
        return cls(str(get("experiment_id")), str(get("outcome")), str(get("learner")), [str(t) for t in get("terms")],
                   [float(c) for c in get("coef")], [[float(v) for v in r] for r in get("cov")], str(get("se_type")),
                   None if n_clusters is None or pd.isna(n_clusters) else int(n_clusters),
                   float(get("critical_value")), float(get("alpha")), str(get("encoding")), int(get("n")),
                   str(get("estimated_on")))

    def row(self) -> dict:
        return {c: getattr(self, c) for c in COLUMNS}

    @property
    def design_names(self) -> List[str]:
        """The terms after the intercept: the design columns of the selected modifiers."""
        return list(self.terms[1:])


def final_stage_frame(stages: Sequence[LinearFinalStage]) -> pd.DataFrame:
    """``cate_final_stages`` rows (an empty frame with the table's columns when there are none)."""
    return pd.DataFrame([s.row() for s in stages], columns=list(COLUMNS))


def find_final_stage(frame: pd.DataFrame, experiment_id: str, outcome: str, learner: str) -> LinearFinalStage:
    """The stored final stage of (experiment, outcome, learner) from a ``cate_final_stages`` frame; a one-line
    ValueError when it is missing (or stored twice)."""
    if frame is None or frame.empty:
        hits = frame
    else:
        hits = frame[(frame["experiment_id"].astype(str) == str(experiment_id))
                     & (frame["outcome"].astype(str) == str(outcome)) & (frame["learner"] == learner)]
    if hits is None or len(hits) == 0:
        raise ValueError(f"table 'cate_final_stages' has no fitted final stage for experiment {experiment_id!r}, "
                         f"outcome {outcome!r}, learner {learner!r} (policy.learner): run the effects stage "
                         "(`t2p run effects --force effects`) so it writes its fitted final stages")
    if len(hits) > 1:
        raise ValueError(f"table 'cate_final_stages' holds {len(hits)} final stages for experiment "
                         f"{experiment_id!r}, outcome {outcome!r}, learner {learner!r}; its key allows one")
    return LinearFinalStage.from_row(hits.iloc[0])
