"""Simple targeting rules on a CATE prediction.

* threshold: treat when τ̂(x) > cost — the plug-in optimal rule when treating costs ``cost`` per unit
  (Manski 2004; Kitagawa & Tetenov 2018).
* budget: treat the top ⌈q·n⌉ units by τ̂ (optionally only those with τ̂ > cost) — the capacity-constrained
  rule whose held-out gain is what the TOC/RATE curves measure (Yadlowsky et al. 2021).
"""
from __future__ import annotations

from typing import Optional

import numpy as np


def _cate(cate) -> np.ndarray:
    cate = np.asarray(cate, dtype=float).ravel()
    if not np.isfinite(cate).all():
        raise ValueError("cate must be finite")
    return cate


def threshold_policy(cate, cost: float = 0.0) -> np.ndarray:
    """1 where the predicted effect exceeds the per-unit cost, else 0."""
    return (_cate(cate) > cost).astype(int)


def budget_policy(cate, budget: float, cost: Optional[float] = None) -> np.ndarray:
    """Treat the ⌈budget·n⌉ highest predictions (ties broken by position); with ``cost``, also require τ̂ > cost."""
    cate = _cate(cate)
    if not 0 <= budget <= 1:
        raise ValueError(f"budget must be a share in [0, 1], got {budget}")
    k = int(np.ceil(budget * cate.shape[0] - 1e-12))
    treat = np.zeros(cate.shape[0], dtype=int)
    treat[np.argsort(-cate, kind="stable")[:k]] = 1
    if cost is not None:
        treat &= (cate > cost).astype(int)
    return treat
