"""Group average treatment effects (GATEs) per selected effect modifier, and one joint interaction regression.

In a randomized experiment the average effect within a pre-treatment group g is identified by the difference in
means inside g (Athey & Imbens 2017). We estimate all groups of one modifier in ONE saturated regression

    Y = Σ_g α_g·1{G=g} + Σ_g τ_g·T·1{G=g} + ε,

so ``τ_g`` is exactly the within-group difference in means, and contrasts ``τ_g − τ_ref`` get their SEs from the
same (HC1 or cluster-robust CR1S) covariance. Groups are

* ``sparse`` (SAE neurons): active (value > 0) vs inactive — the natural split of a ReLU/top-k latent;
* ``continuous``: above vs at-or-below the median;
* ``categorical``: one group per level, contrasts against the most frequent level.

The joint regression ``Y ~ 1 + T + M + T·M`` (M centred at its mean, so the T coefficient is the effect at the
average modifier profile) reports each modifier's interaction *given the other selected modifiers*, with the same
robust covariance. What that coefficient means follows the encoding of M (:func:`encode_modifiers`): with neuron
*values* it is the interaction with the activation, the quantity NEXIS's linear test is about; with the active
*indicator* (the effects stage's default) it is the inactive → active change in the effect — a different quantity.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from .ols import ols

SPLIT_KINDS = ("sparse", "continuous", "categorical")
GATE_COLUMNS = [
    "feature", "split", "group", "n", "n_treated", "estimate", "se", "ci_low", "ci_high", "p_value", "se_type",
]


@dataclass
class GateRow:
    feature: str
    split: str  # sparse | continuous | categorical | joint
    group: str  # e.g. "active", "inactive", "active - inactive", "> median", "level=a", "T x feature"
    n: int
    n_treated: int
    estimate: float
    se: float
    ci_low: float
    ci_high: float
    p_value: float
    se_type: str


def infer_split_kind(values, source: str = "covariate", max_levels: int = 10) -> str:
    """A representation ``neuron`` → ``sparse``; a ``covariate`` → ``categorical`` when non-numeric or with at most
    ``max_levels`` distinct values, else ``continuous``."""
    if source == "neuron":
        return "sparse"
    arr = np.asarray(values)
    if arr.dtype.kind not in "biuf":
        return "categorical"
    return "categorical" if np.unique(arr[~pd.isna(arr)]).size <= max_levels else "continuous"


def split_groups(values, kind: str):
    """Group label per unit and the ordered group names (the first one is the contrast reference)."""
    if kind not in SPLIT_KINDS:
        raise ValueError(f"split kind must be one of {SPLIT_KINDS}, got {kind!r}")
    if kind == "categorical":
        arr = pd.Series(np.asarray(values, dtype=object)).astype(str).to_numpy()
        levels, counts = np.unique(arr, return_counts=True)
        order = [levels[np.argmax(counts)]] + [lv for lv in levels if lv != levels[np.argmax(counts)]]
        names = [f"level={lv}" for lv in order]
        lookup = {lv: f"level={lv}" for lv in levels}
        return np.array([lookup[a] for a in arr], dtype=object), names
    x = np.asarray(values, dtype=float)
    if not np.isfinite(x).all():
        raise ValueError("modifier values must be finite for sparse/continuous splits")
    if kind == "sparse":
        return np.where(x > 0, "active", "inactive").astype(object), ["inactive", "active"]
    med = float(np.median(x))
    return np.where(x > med, "> median", "<= median").astype(object), ["<= median", "> median"]


def _nan_row(feature, split, group, n, n_t, se_type):
    return GateRow(feature, split, group, n, n_t, np.nan, np.nan, np.nan, np.nan, np.nan, se_type)


def gate(y, t, values, kind: str, feature: str = "x", cluster=None, alpha: float = 0.05) -> List[GateRow]:
    """GATE per group of one modifier plus each group's contrast with the reference group.

    Groups without both treated and control units get NaN estimates (their row still reports n)."""
    y = np.asarray(y, dtype=float).ravel()
    t = _check_treatment(t, y.shape[0])
    labels, names = split_groups(values, kind)
    se_type = "CR1S" if cluster is not None else "HC1"
    counts = {g: (int((labels == g).sum()), int(((labels == g) & (t == 1)).sum())) for g in names}
    usable = [g for g in names if 0 < counts[g][1] < counts[g][0]]
    rows: List[GateRow] = []
    if not usable:
        return [_nan_row(feature, kind, g, *counts[g], se_type) for g in names]
    keep = np.isin(labels, usable)
    D = np.column_stack([(labels[keep] == g).astype(float) for g in usable])
    X = np.hstack([D, D * t[keep, None]])
    res = ols(X, y[keep], cluster=None if cluster is None else np.asarray(cluster)[keep])
    k = len(usable)
    for g in names:
        if g not in usable:
            rows.append(_nan_row(feature, kind, g, *counts[g], se_type))
            continue
        L = np.zeros(2 * k)
        L[k + usable.index(g)] = 1.0
        est, se, lo, hi, p = (float(v[0]) for v in res.linear_combination(L, alpha))
        rows.append(GateRow(feature, kind, g, *counts[g], est, se, lo, hi, p, res.se_type))
    ref = names[0]
    for g in names[1:]:
        label = f"{g} - {ref}"
        n_pair = counts[g][0] + counts[ref][0]
        nt_pair = counts[g][1] + counts[ref][1]
        if g not in usable or ref not in usable:
            rows.append(_nan_row(feature, kind, label, n_pair, nt_pair, se_type))
            continue
        L = np.zeros(2 * k)
        L[k + usable.index(g)], L[k + usable.index(ref)] = 1.0, -1.0
        est, se, lo, hi, p = (float(v[0]) for v in res.linear_combination(L, alpha))
        rows.append(GateRow(feature, kind, label, n_pair, nt_pair, est, se, lo, hi, p, res.se_type))
    return rows


def _check_treatment(t, n: int) -> np.ndarray:
    t = np.asarray(t).ravel()
    if t.shape[0] != n:
        raise ValueError(f"treatment has length {t.shape[0]}, outcome has {n}")
    if not np.isin(t, (0, 1)).all():
        raise ValueError("treatment must be binary 0/1")
    return t.astype(float)


def encode_modifiers(modifiers: Mapping[str, Sequence], kinds: Mapping[str, str], encoding: str = "value"):
    """Design columns for the joint regression: value (or active indicator with ``encoding='indicator'``) for
    sparse/continuous modifiers, one-hot minus the most frequent level for categorical ones."""
    if encoding not in ("value", "indicator"):
        raise ValueError(f"encoding must be 'value' or 'indicator', got {encoding!r}")
    cols, names = [], []
    for feat, vals in modifiers.items():
        kind = kinds[feat]
        if kind == "categorical":
            labels, levels = split_groups(vals, kind)
            for lv in levels[1:]:
                cols.append((labels == lv).astype(float))
                names.append(f"{feat}[{lv}]")
        else:
            x = np.asarray(vals, dtype=float)
            cols.append((x > 0).astype(float) if (encoding == "indicator" and kind == "sparse") else x)
            names.append(feat)
    n = len(next(iter(modifiers.values()))) if modifiers else 0
    return (np.column_stack(cols) if cols else np.zeros((n, 0))), names


def joint_interaction(y, t, M: np.ndarray, names: Sequence[str], cluster=None, alpha: float = 0.05) -> List[GateRow]:
    """``Y ~ 1 + T + M_c + T·M_c`` with M_c = M − mean(M): rows for the T coefficient (effect at the mean profile)
    and each interaction coefficient (the change in effect per unit of the modifier, holding the others fixed)."""
    y = np.asarray(y, dtype=float).ravel()
    t = _check_treatment(t, y.shape[0])
    M = np.asarray(M, dtype=float).reshape(y.shape[0], -1)
    if M.shape[1] != len(names):
        raise ValueError(f"M has {M.shape[1]} columns but {len(names)} names")
    const = M.std(axis=0) == 0
    Mc = (M - M.mean(axis=0))[:, ~const]
    kept = [nm for nm, c in zip(names, const) if not c]
    X = np.column_stack([np.ones_like(y), t, Mc, Mc * t[:, None]])
    res = ols(X, y, cluster=cluster)
    n, n_t = int(y.shape[0]), int(t.sum())
    k = X.shape[1]
    rows = []
    targets = [("(treatment)", "T at mean modifiers", 1)] + [
        (nm, f"T x {nm}", 2 + len(kept) + j) for j, nm in enumerate(kept)
    ]
    for feat, group, col in targets:
        L = np.zeros(k)
        L[col] = 1.0
        est, se, lo, hi, p = (float(v[0]) for v in res.linear_combination(L, alpha))
        rows.append(GateRow(feat, "joint", group, n, n_t, est, se, lo, hi, p, res.se_type))
    for nm in (nm for nm, c in zip(names, const) if c):
        rows.append(_nan_row(nm, "joint", f"T x {nm}", n, n_t, res.se_type))
    return rows


def gates_table(
    y,
    t,
    modifiers: Mapping[str, Sequence],
    kinds: Optional[Mapping[str, str]] = None,
    cluster=None,
    alpha: float = 0.05,
    joint: bool = True,
    joint_encoding: str = "value",
) -> pd.DataFrame:
    """All per-modifier GATE rows, then the joint interaction rows, as a DataFrame with :data:`GATE_COLUMNS`.

    ``kinds`` maps feature → split kind (default: :func:`infer_split_kind` treating every feature as a covariate)."""
    kinds = dict(kinds or {})
    for feat, vals in modifiers.items():
        kinds.setdefault(feat, infer_split_kind(vals, "covariate"))
    rows: List[GateRow] = []
    for feat, vals in modifiers.items():
        rows.extend(gate(y, t, vals, kinds[feat], feature=feat, cluster=cluster, alpha=alpha))
    if joint and modifiers:
        M, names = encode_modifiers(modifiers, kinds, joint_encoding)
        rows.extend(joint_interaction(y, t, M, names, cluster=cluster, alpha=alpha))
    return pd.DataFrame([asdict(r) for r in rows], columns=GATE_COLUMNS)
