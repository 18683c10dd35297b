"""Simple targeting rules on a CATE prediction.

* threshold: treat when τ̂(x) > cost — the plug-in optimal rule when treating costs ``cost`` per unit
  (Manski 2004; Kitagawa & Tetenov 2018).
* budget: treat the top share q of the units by τ̂ (optionally only those with τ̂ > cost) — the capacity-constrained
  rule whose gain is what the TOC/RATE curves measure (Yadlowsky et al. 2021).

**Ties at the budget's cutoff.** With the default indicator encoding of neurons a linear CATE takes at most 2^k
values, so many units can share the cutoff value. The budget rule is therefore a pair (cutoff c, tie share p),
learned on the training units so that it fills the budget exactly: with k = ⌈q·n⌉, c is the k-th largest τ̂,
and p = (k − #{τ̂ > c}) / #{τ̂ = c}. A unit is treated when τ̂ > c, or when τ̂ = c and its **tie draw** — a
uniform number from a seeded hash of its unit id (:func:`tie_draws`) — is below p. The draw is a function of the
unit id alone, so the policy job's ``assignments`` and the served model (``policy/pyfunc.py``) treat the same
units, a unit gets the same decision in every batch, and the expected treated share among the tied units is p.
τ̂ values within ``TIE_TOLERANCE`` (relative) of c count as tied, so a CATE recomputed in another batch shape
(last-bit differences) takes the same branch.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

from tokens2policy.honesty import stable_uniform

TIE_TOLERANCE = 1e-9
TIE_SALT = "budget-tie"


def _cate(cate) -> np.ndarray:
    cate = np.asarray(cate, dtype=float).ravel()
    if not np.isfinite(cate).all():
        raise ValueError("cate must be finite")
    return cate


def threshold_policy(cate, cost: float = 0.0) -> np.ndarray:
    """1 where the predicted effect exceeds the per-unit cost, else 0."""
    return (_cate(cate) > cost).astype(int)


def tie_draws(unit_ids: Sequence, seed: int = 0) -> np.ndarray:
    """The budget rule's per-unit tie draw: uniform on [0, 1) from sha256("budget-tie␟<unit_id>␟<seed>")."""
    return stable_uniform(((u,) for u in unit_ids), seed, TIE_SALT)


class TieDrawCache:
    """The tie draws of one list of units, each unit hashed at most once: the policy stage applies the budget
    rule to overlapping sets of these units (the deployable rule, one per fold, the rule table), each time
    drawing for the units tied at that rule's cutoff — at 10^6 units the hashing dominated the stage.
    ``cache.on(rows)`` is :func:`budget_assign`'s ``draws`` for the units ``rows`` (a boolean mask or index
    array into the list; None: all of them, in order)."""

    def __init__(self, unit_ids: Sequence, seed: int = 0):
        self.unit_ids = np.asarray(unit_ids, dtype=object)
        self.seed = seed
        self._draw = np.full(self.unit_ids.shape[0], np.nan)

    def on(self, rows=None):
        if rows is None:
            idx = np.arange(self.unit_ids.shape[0])
        else:
            rows = np.asarray(rows)
            idx = np.flatnonzero(rows) if rows.dtype == bool else rows.astype(np.int64)

        def draws(mask: np.ndarray) -> np.ndarray:
            want = idx[mask]
            todo = want[np.isnan(self._draw[want])]
            if todo.size:
                self._draw[todo] = tie_draws(self.unit_ids[todo], self.seed)
            return self._draw[want]

        return draws


def budget_branches(cate, cutoff: float) -> Tuple[np.ndarray, np.ndarray]:
    """(above, tied) masks of the budget rule: τ̂ > c beyond the tolerance, and |τ̂ − c| within it."""
    cate = np.asarray(cate, dtype=float)
    if not np.isfinite(cutoff):
        return np.zeros(cate.shape, bool), np.zeros(cate.shape, bool)
    tol = TIE_TOLERANCE * max(1.0, abs(cutoff))
    return cate > cutoff + tol, np.abs(cate - cutoff) <= tol


def budget_cutoff(cate, budget: float) -> Tuple[float, float]:
    """(cutoff, tie share) of the top-``budget`` rule on these predictions: treating τ̂ > cutoff and a share
    ``tie share`` of the units tied at the cutoff treats ⌈budget·n⌉ units in expectation (cutoff +inf: none)."""
    cate = _cate(cate)
    if not 0 <= budget <= 1:
        raise ValueError(f"budget must be a share in [0, 1], got {budget}")
    k = int(np.ceil(budget * cate.shape[0] - 1e-12))
    if k == 0:
        return float("inf"), 0.0
    cutoff = float(np.sort(cate)[::-1][k - 1])
    above, tied = budget_branches(cate, cutoff)
    share = (k - int(above.sum())) / int(tied.sum())
    return cutoff, float(min(1.0, max(0.0, share)))


def budget_assign(cate, cutoff: float, tie_share: float, unit_ids: Sequence, seed: int = 0,
                  draws=None) -> np.ndarray:
    """The budget rule (cutoff, tie share) applied to units: 1 when τ̂ > cutoff, or τ̂ ties the cutoff and the
    unit's tie draw is below ``tie_share``. ``draws``: the tie draws of these units from a
    :class:`TieDrawCache` (``cache.on(rows)``; the same numbers as hashing ``unit_ids`` with ``seed`` here)."""
    cate = _cate(cate)
    above, tied = budget_branches(cate, cutoff)
    if tied.any():
        unit_ids = np.asarray(unit_ids, dtype=object)
        if unit_ids.shape[0] != cate.shape[0]:
            raise ValueError(f"unit_ids has {unit_ids.shape[0]} entries, cate {cate.shape[0]}")
        draw = np.ones(cate.shape[0])
        draw[tied] = tie_draws(unit_ids[tied], seed) if draws is None else draws(tied)
        above = above | (tied & (draw < tie_share))
    return above.astype(int)


def budget_policy(cate, budget: float, cost: Optional[float] = None, unit_ids: Optional[Sequence] = None,
                  seed: int = 0) -> np.ndarray:
    """Treat the top ``budget`` share by τ̂; with ``cost``, also require τ̂ > cost.

    With ``unit_ids`` (as the policy job and the served model): :func:`budget_cutoff` on these units, then
    :func:`budget_assign` — ties at the cutoff by the seeded per-unit draw. Without them (in-memory use on a
    fixed set): exactly ⌈budget·n⌉ units, ties broken by position."""
    cate = _cate(cate)
    if unit_ids is not None:
        cutoff, share = budget_cutoff(cate, budget)
        treat = budget_assign(cate, cutoff, share, unit_ids, seed)
    else:
        if not 0 <= budget <= 1:
            raise ValueError(f"budget must be a share in [0, 1], got {budget}")
        k = int(np.ceil(budget * cate.shape[0] - 1e-12))
        treat = np.zeros(cate.shape[0], dtype=int)
        treat[np.argsort(-cate, kind="stable")[:k]] = 1
    if cost is not None:
        treat &= (cate > cost).astype(int)
    return treat


def budget_rule_text(cutoff: float, tie_share: float, budget: float) -> str:
    """The budget rule as it is applied (job and served model alike)."""
    if not np.isfinite(cutoff):
        return "IF never (budget 0) THEN treat ELSE control"
    tie = (f"; IF cate = {cutoff:.4g} THEN treat with probability {tie_share:.4g} (a seeded hash of unit_id "
           f"decides, per unit)" if 0 < tie_share < 1 else "")
    op = ">=" if tie_share >= 1 else ">"
    return f"IF cate {op} {cutoff:.4g} THEN treat{tie} (top {budget:.0%}) ELSE control"


def budget_fired(cate, treat, cutoff: float, tie_share: float, budget: float) -> np.ndarray:
    """Per-unit text of the budget rule's branch that decided (the job's ``assignments.rule`` and the served
    model's ``rule`` output alike)."""
    above, tied = budget_branches(cate, cutoff)
    head = f"cate > {cutoff:.4g} (top {budget:.0%})"
    if tie_share >= 1:  # every tied unit is treated: no draw decided
        drawn = np.full(np.shape(above), f"cate >= {cutoff:.4g} (top {budget:.0%})", dtype=object)
    else:
        drawn = np.where(np.asarray(treat) == 1, f"cate = {cutoff:.4g}, tie drawn in (p = {tie_share:.4g})",
                         f"cate = {cutoff:.4g}, tie drawn out (p = {tie_share:.4g})")
    return np.where(above, head, np.where(tied, drawn, f"cate below top {budget:.0%}")).astype(object)
