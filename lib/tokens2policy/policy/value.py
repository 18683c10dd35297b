"""Doubly-robust (AIPW) value of a treatment policy, and its comparison with baselines.

With cross-fitted AIPW scores Γᵢ(a) (see :func:`tokens2policy.effects.learners.aipw_scores`) the value of a
(possibly randomised) policy πᵢ = P(treat unit i) net of a per-treatment cost c is

    V̂(π) = 1/n Σᵢ [πᵢ (Γᵢ(1) − c) + (1 − πᵢ) Γᵢ(0)],

asymptotically normal with variance estimated by the sample variance of the summands (Robins, Rotnitzky & Zhao
1994; Athey & Wager 2021, who also show that with π learned on other folds — cross-fitted policy learning — this
value is unbiased for the learned policies). The policy stage supplies exactly that: each unit's π is learned
without its fold (nested cross-fitting in the effects stage keeps the fold's outcomes out of the nuisances too),
on estimation units that did not select the modifiers. Differences V̂(π) − V̂(π') use the paired summands, so their
CIs account for the shared noise. Cluster ids switch every SE to CR1S (intercept-only regression).

Baselines: treat-all, treat-none and *random at the same budget* (each unit treated with probability equal to π's
treated share), so a targeting gain is separated from a mere change in how many are treated.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional

import numpy as np
import pandas as pd

from ..effects.ols import mean_with_se

VALUE_COLUMNS = ["policy", "comparison", "treated_share", "estimate", "se", "ci_low", "ci_high", "p_value", "n"]


def _check(scores, policy):
    scores = np.asarray(scores, dtype=float)
    if scores.ndim != 2 or scores.shape[1] != 2:
        raise ValueError(f"scores must be (n, 2) AIPW scores [Γ(0), Γ(1)], got shape {scores.shape}")
    pi = np.asarray(policy, dtype=float).ravel()
    if pi.shape[0] != scores.shape[0]:
        raise ValueError(f"policy has {pi.shape[0]} entries, scores have {scores.shape[0]} rows")
    if not ((pi >= 0) & (pi <= 1)).all():
        raise ValueError("policy entries must be treatment probabilities in [0, 1]")
    return scores, pi


def value_summands(scores, policy, cost: float = 0.0) -> np.ndarray:
    """Per-unit AIPW contributions to V̂(π) (their mean is the value)."""
    scores, pi = _check(scores, policy)
    return pi * (scores[:, 1] - cost) + (1 - pi) * scores[:, 0]


def policy_value(scores, policy, cost: float = 0.0, cluster=None, alpha: float = 0.05) -> Dict[str, float]:
    """V̂(π) with SE and CI: ``{"estimate", "se", "ci_low", "ci_high", "p_value", "treated_share", "n"}``."""
    v = value_summands(scores, policy, cost)
    est, se, lo, hi, p = mean_with_se(v, cluster=cluster, alpha=alpha)
    return dict(estimate=est, se=se, ci_low=lo, ci_high=hi, p_value=p,
                treated_share=float(np.mean(policy)), n=int(v.shape[0]))


def compare_policies(scores, policies: Mapping[str, np.ndarray], cost: float = 0.0, cluster=None,
                     alpha: float = 0.05) -> pd.DataFrame:
    """Value of each named policy and of the baselines, and each policy's value difference with every baseline.

    Rows with ``comparison == "value"`` hold V̂(π); rows ``"minus <baseline>"`` hold V̂(π) − V̂(baseline), where the
    baselines are ``treat_all``, ``treat_none`` and ``random_same_budget`` (π ≡ treated share of the policy)."""
    scores = np.asarray(scores, dtype=float)
    n = scores.shape[0]
    rows = []

    def add(name, comparison, share, summands):
        est, se, lo, hi, p = mean_with_se(summands, cluster=cluster, alpha=alpha)
        rows.append(dict(policy=name, comparison=comparison, treated_share=float(share), estimate=est, se=se,
                         ci_low=lo, ci_high=hi, p_value=p, n=n))

    for name, pi in (("treat_all", np.ones(n)), ("treat_none", np.zeros(n))):
        add(name, "value", pi.mean(), value_summands(scores, pi, cost))
    for name, pi in policies.items():
        pi = np.asarray(pi, dtype=float).ravel()
        v = value_summands(scores, pi, cost)
        share = float(pi.mean())
        add(name, "value", share, v)
        baselines = {"treat_all": np.ones(n), "treat_none": np.zeros(n), "random_same_budget": np.full(n, share)}
        for base, bpi in baselines.items():
            add(name, f"minus {base}", share, v - value_summands(scores, bpi, cost))
    return pd.DataFrame(rows, columns=VALUE_COLUMNS)
