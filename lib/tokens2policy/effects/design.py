"""Design matrices from the stage tables: the same code builds them on the driver and inside a Spark task.

* Nuisance features X: covariates (numeric as is with the driver's mean for missing values; strings one-hot on the
  driver's levels) + the dense activations of a fixed list of neurons (selected W modifiers and the most frequently
  active ones).
* Modifier features: each selected modifier's raw values (neuron activation, or the covariate column), used for
  GATEs, the interpretable final stage and the policy tree.

The :class:`FeatureSpec` is computed once on the driver and shipped to the tasks, so every task encodes identically.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd


@dataclass
class FeatureSpec:
    numeric: Dict[str, float] = field(default_factory=dict)  # column -> fill value
    categorical: Dict[str, List[str]] = field(default_factory=dict)  # column -> levels (one-hot, all levels)
    neurons: List[int] = field(default_factory=list)

    def names(self) -> List[str]:
        out = list(self.numeric)
        for col, levels in self.categorical.items():
            out += [f"{col}={lv}" for lv in levels]
        return out + [f"neuron_{i}" for i in self.neurons]


def build_feature_spec(pdf: pd.DataFrame, covariates: Sequence[str], neurons: Sequence[int]) -> FeatureSpec:
    """Encoding of the nuisance features, fitted on the full unit table (pre-treatment columns only)."""
    spec = FeatureSpec(neurons=[int(i) for i in neurons])
    for col in covariates:
        if col not in pdf.columns:
            raise ValueError(f"covariate column '{col}' is not in the units table")
        s = pdf[col]
        if pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s):
            vals = s.astype(float)
            spec.numeric[col] = float(vals.mean()) if vals.notna().any() else 0.0
        else:
            spec.categorical[col] = sorted(s.astype(str).unique().tolist())
    return spec


def neuron_matrix(indices: Sequence, values: Sequence, neurons: Sequence[int]) -> np.ndarray:
    """Dense (n, len(neurons)) activations from per-unit sparse ``indices``/``values`` arrays (missing = 0)."""
    neurons = np.asarray(list(neurons), dtype=np.int64)
    n = len(indices)
    out = np.zeros((n, neurons.size))
    if neurons.size == 0 or n == 0:
        return out
    lens = np.array([0 if ix is None else len(ix) for ix in indices])
    if lens.sum() == 0:
        return out
    rows = np.repeat(np.arange(n), lens)
    idx = np.concatenate([np.asarray(ix, dtype=np.int64) for ix in indices if ix is not None and len(ix)])
    val = np.concatenate([np.asarray(v, dtype=float) for v, ln in zip(values, lens) if ln])
    order = np.argsort(neurons)
    pos = np.searchsorted(neurons[order], idx)
    pos = np.minimum(pos, neurons.size - 1)
    hit = neurons[order][pos] == idx
    out[rows[hit], order[pos[hit]]] = val[hit]
    return out


def feature_matrix(pdf: pd.DataFrame, spec: FeatureSpec) -> np.ndarray:
    """Nuisance feature matrix for ``pdf`` rows (needs the covariate columns and ``indices``/``values``)."""
    cols = [pdf[c].astype(float).fillna(fill).to_numpy() for c, fill in spec.numeric.items()]
    for c, levels in spec.categorical.items():
        s = pdf[c].astype(str).to_numpy()
        cols += [(s == lv).astype(float) for lv in levels]
    parts = [np.column_stack(cols)] if cols else []
    if spec.neurons:
        parts.append(neuron_matrix(pdf["indices"].tolist(), pdf["values"].tolist(), spec.neurons))
    return np.hstack(parts) if parts else np.zeros((len(pdf), 0))


_INT = re.compile(r"(\d+)$")


def neuron_id(feature) -> int:
    """Neuron index of a W modifier's ``feature`` value: an int, "123", "neuron_123", "n123"."""
    if isinstance(feature, (int, np.integer)):
        return int(feature)
    m = _INT.search(str(feature))
    if not m:
        raise ValueError(f"cannot read a neuron index from modifier feature {feature!r}")
    return int(m.group(1))


@dataclass
class Modifier:
    feature: str  # display name used in tables and rules
    source: str  # "neuron" or "covariate"
    column: Optional[str]  # covariate column for Z
    neuron: Optional[int]  # neuron index for W
    label: Optional[str]


def modifier_source(kind, source=None) -> str:
    """``neuron`` or ``covariate``: the ``source`` column when present, else the NEXIS convention of the identify
    stage (``kind`` W = pre-treatment covariate, Z = representation neuron)."""
    if isinstance(source, str) and source in ("neuron", "covariate"):
        return source
    if kind == "Z":
        return "neuron"
    if kind == "W":
        return "covariate"
    raise ValueError(f"modifier kind must be 'W' (covariate) or 'Z' (neuron), got {kind!r}")


def resolve_modifiers(mods: pd.DataFrame, covariates: Sequence[str]) -> List[Modifier]:
    """Selected modifiers (rows of the ``modifiers`` table for one experiment/outcome) → column references."""
    out = []
    for r in mods.sort_values(["round_added", "feature"] if "round_added" in mods else ["feature"]).itertuples():
        label = getattr(r, "label", None)
        label = None if label is None or (isinstance(label, float) and np.isnan(label)) else str(label)
        src = modifier_source(r.kind, getattr(r, "source", None))
        if src == "neuron":
            i = neuron_id(r.feature)
            out.append(Modifier(f"neuron_{i}", "neuron", None, i, label))
        else:
            col = str(r.feature)
            if col not in covariates:
                try:
                    col = list(covariates)[int(col)]
                except (ValueError, IndexError):
                    raise ValueError(f"modifier covariate {r.feature!r} is neither a covariate column nor an index "
                                     f"into {list(covariates)}") from None
            out.append(Modifier(col, "covariate", col, None, label))
    return out


def modifier_values(pdf: pd.DataFrame, modifiers: Sequence[Modifier]) -> Dict[str, np.ndarray]:
    """Raw values of each modifier for ``pdf`` rows (neuron activation or covariate column)."""
    neurons = [m.neuron for m in modifiers if m.source == "neuron"]
    dense = neuron_matrix(pdf["indices"].tolist(), pdf["values"].tolist(), neurons) if neurons else None
    out, j = {}, 0
    for m in modifiers:
        if m.source == "neuron":
            out[m.feature] = dense[:, j]
            j += 1
        else:
            out[m.feature] = pdf[m.column].to_numpy()
    return out


def display_name(m: Modifier) -> str:
    return f"{m.feature} ({m.label})" if m.label else m.feature


def numeric_design(values: Dict[str, np.ndarray], kinds: Dict[str, str], encoding: str) -> Tuple[np.ndarray, List[str]]:
    """Modifier design for linear final stages and trees: numeric columns, categorical one-hot (see gates)."""
    from .gates import encode_modifiers

    return encode_modifiers(values, kinds, encoding)
