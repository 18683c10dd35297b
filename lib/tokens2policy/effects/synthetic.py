"""A small synthetic RCT in the stage-table layout (units, neurons, modifiers) with a known CATE.

Used by the effects/policy job tests and the benchmark: the truth (τ per unit, the optimal rule) is returned with it.
τ = base + Σ_j coef_j · 1{neuron j active}; the baseline outcome depends on a covariate and another neuron so the
nuisance models have something to learn.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import pandas as pd


def make_synthetic_rct(n: int = 2000, n_neurons: int = 40, seed: int = 0, experiment_id: str = "synth",
                       base: float = -0.5, coefs: Optional[Dict[int, float]] = None, share: float = 0.5,
                       n_folds: int = 5, n_clusters: int = 50, noise: float = 1.0) -> Dict[str, object]:
    coefs = {3: 2.0, 7: -1.0} if coefs is None else coefs
    rng = np.random.default_rng(seed)
    rates = rng.uniform(0.05, 0.5, size=n_neurons)
    rates[list(coefs)] = 0.4
    active = rng.random((n, n_neurons)) < rates
    acts = np.where(active, rng.exponential(1.0, size=(n, n_neurons)), 0.0).astype(np.float32)
    age = rng.normal(40, 10, size=n)
    region = rng.choice(["north", "south", "west"], size=n)
    tau = base + sum(c * active[:, j] for j, c in coefs.items())
    mu0 = 0.05 * (age - 40) + 0.8 * (region == "south") + 0.7 * acts[:, 5 % n_neurons]
    t = (rng.random(n) < share).astype(int)
    y = mu0 + t * tau + rng.normal(size=n) * noise
    unit_id = np.array([f"u{i:06d}" for i in range(n)])
    units = pd.DataFrame({
        "experiment_id": experiment_id, "unit_id": unit_id, "treatment": t, "outcome": y,
        "fold": rng.permutation(np.arange(n) % n_folds).astype(np.int32),
        "cluster": np.array([f"c{c}" for c in rng.integers(0, n_clusters, size=n)]), "age": age, "region": region,
    })
    neurons = pd.DataFrame({
        "experiment_id": experiment_id, "unit_id": unit_id,
        "indices": [np.flatnonzero(row).astype(np.int32).tolist() for row in active],
        "values": [acts[i, row].tolist() for i, row in enumerate(active)],
    })
    mods = [dict(experiment_id=experiment_id, outcome="outcome", feature=str(j), kind="Z", source="neuron", label=f"topic {j}",
                 p_value=1e-6, t=5.0 * np.sign(c), direction="+" if c > 0 else "-", round_added=r + 1)
            for r, (j, c) in enumerate(coefs.items())]
    mods.append(dict(experiment_id=experiment_id, outcome="outcome", feature="age", kind="W", source="covariate", label="age",
                     p_value=0.01, t=2.5, direction="+", round_added=len(coefs) + 1))
    optimal = (tau > 0).astype(int)
    return {"units": units, "neurons": neurons, "modifiers": pd.DataFrame(mods), "tau": tau, "optimal": optimal,
            "mu0": mu0, "active": active}


UNITS_SCHEMA = ("experiment_id string, unit_id string, treatment int, outcome double, fold int, cluster string, "
                "age double, region string")
NEURONS_SCHEMA = "experiment_id string, unit_id string, indices array<int>, values array<float>"
MODIFIERS_SCHEMA = ("experiment_id string, outcome string, feature string, kind string, source string, label string, "
                    "p_value double, "
                    "t double, direction string, round_added int")


def write_synthetic_tables(spark, cfg, data: Dict[str, object]) -> None:
    """Write the synthetic frames as the ``units``/``neurons``/``modifiers`` Delta tables of ``cfg``."""
    from tokens2policy.lakehouse import write_table

    for name, schema in (("units", UNITS_SCHEMA), ("neurons", NEURONS_SCHEMA), ("modifiers", MODIFIERS_SCHEMA)):
        pdf = data[name]
        cols = [c.split(" ")[0] for c in schema.split(", ")]
        rows = [tuple(_py(v) for v in r) for r in pdf[cols].itertuples(index=False)]
        write_table(spark.createDataFrame(rows, schema), cfg, name, mode="overwrite")


def _py(v):
    if isinstance(v, np.generic):
        return v.item()
    return v
