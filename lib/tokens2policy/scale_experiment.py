"""A synthetic randomized experiment at any size, written straight into the lakehouse: ``units`` and ``neurons``.

For benchmarking the causal stages (identify → effects → policy) at 10^5–10^6+ units without embedding or
training a dictionary first: each unit's sparse code is drawn directly with the shape of SAE codes, and the
outcome has planted direct effect modifiers, so a run can be checked against the truth.

The design (everything from ``seed``; the defaults are those of ``benchmarks/bench_pipeline_scale.py``):

* **codes**: ``m`` neurons (4,096), exactly ``k`` (32) active per unit, drawn without replacement with
  probabilities ∝ popularity, a Zipf-like law ``(rank + 1)^-zipf`` over a random permutation of the neuron ids
  (SAE latents are used very unequally: a few fire on a large share of the inputs, most on well under 1 %);
  active values ~ LogNormal(0, 0.5). Indices are ascending, values float32 — the ``neurons`` contract
  (docs/represent.md).
* **planted modifiers**: ``len(effects)`` neurons at the popularity ranks ``planted_ranks``; the unit's effect is
  ``τ = base_effect + Σ_p effects[p] · z_p`` (z_p its code value, 0 when inactive).
* **proxies**: for each planted neuron one *proxy* neuron that is switched on (in place of a non-planted active
  neuron, so still k active) in ``proxy_share`` of the units where the planted one is active. A proxy is
  marginally associated with the effect but is not a direct modifier: NEXIS should not select it.
* **prognostic neurons**: ``len(prognostic)`` other neurons with main effects on the outcome only.
* **covariates and clusters**: ``tenure_days`` ~ 1 + Gamma(2, 180), ``prior_sessions`` ~ Poisson(2 + tenure/60)
  (prognostic), ``cluster`` one of ``n_clusters`` communities with a N(0, cluster_sd²) outcome shift.
* **outcome** ``engagement = μ0 + t·τ + N(0, 1)``, ``μ0 = 1 + 0.3 (log1p(tenure) − 5) + 0.05 (sessions − 5) +
  cluster shift + Σ prognostic``; treatment an exact half within each block of units, completely at random.
* **folds**: the ingest stage's own rule (:func:`tokens2policy.ingest.folds.assign_folds`: balanced within each arm).

Generation runs **in Spark tasks**: the driver only creates ``ceil(n / block)`` block ids; each task draws its
blocks with ``numpy.random.default_rng([seed, block])``, so the tables are the same whatever the partitioning, and
1M units never pass through the driver.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

UNIT_WIDTH = 9  # unit ids "u000000042": lexicographic order = numeric order up to 10^9 units


@dataclass(frozen=True)
class ScaleDesign:
    """The generator's parameters; :meth:`truth` gives the planted neuron ids they imply."""

    n: int
    m: int = 4096
    k: int = 32
    seed: int = 0
    experiment_id: str = "scale"
    zipf: float = 0.7
    planted_ranks: Tuple[int, ...] = (8, 24, 48, 96, 160)
    effects: Tuple[float, ...] = (0.3, -0.25, 0.25, -0.2, 0.2)
    base_effect: float = 0.2
    proxy_share: float = 0.8
    prognostic: Tuple[float, ...] = (0.3, -0.3, 0.2, 0.2, -0.2)
    cluster_sd: float = 0.3
    n_clusters: Optional[int] = None  # None: max(20, n // 500)
    noise_sd: float = 1.0
    block: int = 8192

    def __post_init__(self):
        if self.n < 1 or self.k < 1 or self.m <= self.k:
            raise ValueError(f"need n >= 1 and 1 <= k < m, got n={self.n}, k={self.k}, m={self.m}")
        if len(self.planted_ranks) != len(self.effects):
            raise ValueError("planted_ranks and effects must have the same length")
        if 2 * len(self.effects) + len(self.prognostic) > self.m // 2:
            raise ValueError("too many special neurons for m")

    @property
    def clusters(self) -> int:
        return self.n_clusters or max(20, self.n // 500)

    def truth(self) -> Dict[str, object]:
        """Neuron ids: ``planted`` (with ``effects``), their ``proxies``, ``prognostic``; popularity law."""
        rng = np.random.default_rng([self.seed, 0xC0DE])
        neuron_of_rank = rng.permutation(self.m)
        weights = np.empty(self.m)
        weights[neuron_of_rank] = (np.arange(self.m) + 1.0) ** -self.zipf
        planted = [int(neuron_of_rank[r]) for r in self.planted_ranks]
        taken = set(planted)
        # proxies and prognostic neurons: mid-popularity ranks not already used
        spare = [int(j) for j in neuron_of_rank[20:400] if int(j) not in taken]
        order = rng.permutation(len(spare))
        picks = [spare[i] for i in order[: len(planted) + len(self.prognostic)]]
        return {
            "planted": planted,
            "effects": dict(zip(planted, self.effects)),
            "proxies": dict(zip(planted, picks[: len(planted)])),
            "prognostic": dict(zip(picks[len(planted):], self.prognostic)),
            "weights": weights / weights.sum(),
            "cluster_shift": rng.normal(0.0, self.cluster_sd, self.clusters),
        }


def sample_without_replacement(rng, cdf: np.ndarray, size: int, k: int) -> np.ndarray:
    """(size, k) int32: per row k distinct categories drawn successively with probabilities ∝ ``diff(cdf)``.

    Draws with replacement and keeps the first k distinct values of each row, which is the distribution of
    successive draws without replacement (a repeat is simply skipped); a row with fewer than k distinct values
    among its draws (rare with 3k draws unless k is near the number of popular categories) is drawn again with
    twice as many.
    """
    out = np.empty((size, k), dtype=np.int32)
    todo, draws = np.arange(size), 3 * k
    top = len(cdf) - 1
    while todo.size:
        cand = np.minimum(np.searchsorted(cdf, rng.random((todo.size, draws)) * cdf[-1], side="right"), top)
        order = np.argsort(cand, axis=1, kind="stable")  # equal values keep draw order: the first one is kept
        ranked = np.take_along_axis(cand, order, axis=1)
        repeat_sorted = np.zeros(ranked.shape, dtype=bool)
        repeat_sorted[:, 1:] = ranked[:, 1:] == ranked[:, :-1]
        repeat = np.empty_like(repeat_sorted)
        np.put_along_axis(repeat, order, repeat_sorted, axis=1)
        ok = (~repeat).sum(axis=1) >= k
        rows = np.where(ok)[0]
        first = np.argsort(repeat[rows], axis=1, kind="stable")[:, :k]  # positions of the first k distinct draws
        out[todo[rows]] = np.take_along_axis(cand[rows], first, axis=1)
        todo, draws = todo[~ok], draws * 2
    return out


def draw_block(design: ScaleDesign, truth: Dict[str, object], block: int) -> Dict[str, np.ndarray]:
    """The units of one block (numpy): ids, treatment, covariates, cluster, codes (indices/values), τ, μ0, y."""
    start = block * design.block
    size = min(design.block, design.n - start)
    rng = np.random.default_rng([design.seed, block])
    k = design.k
    idx = sample_without_replacement(rng, np.cumsum(truth["weights"]), size, k)
    special = np.array(sorted(set(truth["planted"]) | set(truth["proxies"].values())))
    for p, q in truth["proxies"].items():  # co-activate the proxy with its planted neuron
        rows = np.where((idx == p).any(axis=1) & ~(idx == q).any(axis=1) & (rng.random(size) < design.proxy_share))[0]
        free = ~np.isin(idx[rows], special)  # replace a random active neuron that is not planted or a proxy
        rows, free = rows[free.any(axis=1)], free[free.any(axis=1)]
        idx[rows, np.argmax(free * rng.random(free.shape), axis=1)] = q
    idx.sort(axis=1)
    val = rng.lognormal(0.0, 0.5, size=(size, k)).astype(np.float32)

    def code(j):
        hit = idx == j
        return np.where(hit.any(axis=1), (val * hit).sum(axis=1), 0.0)

    tenure = np.round(rng.gamma(2.0, 180.0, size)) + 1.0
    sessions = rng.poisson(2.0 + tenure / 60.0).astype(np.float64)
    cluster = rng.integers(0, design.clusters, size)
    treatment = np.zeros(size, dtype=np.int32)
    treatment[rng.permutation(size)[: size // 2 + (rng.random() < 0.5) * (size % 2)]] = 1
    tau = design.base_effect + sum(b * code(p) for p, b in truth["effects"].items())
    mu0 = (1.0 + 0.3 * (np.log1p(tenure) - 5.0) + 0.05 * (sessions - 5.0) + truth["cluster_shift"][cluster]
           + sum(g * code(j) for j, g in truth["prognostic"].items()))
    y = mu0 + treatment * tau + rng.normal(0.0, design.noise_sd, size)
    return {"unit_no": np.arange(start, start + size), "treatment": treatment, "engagement": y,
            "tenure_days": tenure, "prior_sessions": sessions, "cluster": cluster, "indices": idx, "values": val,
            "true_cate": tau, "mu0": mu0}


def unit_id(number: int) -> str:
    return f"u{int(number):0{UNIT_WIDTH}d}"


def generate(spark, cfg, design: ScaleDesign, partitions: Optional[int] = None) -> Dict[str, object]:
    """Write ``units`` and ``neurons`` (overwritten) for ``design`` into ``cfg``'s lakehouse; return the truth.

    ``units`` follows docs/tables.md (experiment_id, unit_id, treatment, engagement, text, tenure_days,
    prior_sessions, cluster, fold); ``neurons`` docs/represent.md (experiment_id, unit_id, indices, values,
    pooled_tokens). Also ``scale_truth`` (experiment_id, unit_id, true_cate, mu0) for checks.
    """
    import pandas as pd
    from pyspark import StorageLevel
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    from tokens2policy.ingest.folds import assign_folds
    from tokens2policy.lakehouse import write_table

    truth = design.truth()
    n_blocks = math.ceil(design.n / design.block)
    parts = partitions or max(spark.sparkContext.defaultParallelism, math.ceil(design.n / 250_000))
    schema = T.StructType([
        T.StructField("experiment_id", T.StringType(), False), T.StructField("unit_id", T.StringType(), False),
        T.StructField("treatment", T.IntegerType(), False), T.StructField("engagement", T.DoubleType(), False),
        T.StructField("text", T.StringType(), False), T.StructField("tenure_days", T.DoubleType(), False),
        T.StructField("prior_sessions", T.DoubleType(), False), T.StructField("cluster", T.StringType(), False),
        T.StructField("indices", T.ArrayType(T.IntegerType(), False), False),
        T.StructField("values", T.ArrayType(T.FloatType(), False), False),
        T.StructField("true_cate", T.DoubleType(), False), T.StructField("mu0", T.DoubleType(), False)])
    exp = design.experiment_id

    def blocks_to_units(batches):
        for pdf in batches:
            for b in pdf["id"].tolist():
                d = draw_block(design, truth, int(b))
                ids = [unit_id(u) for u in d["unit_no"]]
                yield pd.DataFrame({
                    "experiment_id": exp, "unit_id": ids, "treatment": d["treatment"],
                    "engagement": d["engagement"], "text": [f"synthetic unit {u}" for u in ids],
                    "tenure_days": d["tenure_days"], "prior_sessions": d["prior_sessions"],
                    "cluster": [f"c{c:05d}" for c in d["cluster"]],
                    "indices": list(d["indices"]), "values": list(d["values"]),
                    "true_cate": d["true_cate"], "mu0": d["mu0"]})

    rows = (spark.range(0, n_blocks, numPartitions=min(parts, n_blocks))
            .mapInPandas(blocks_to_units, schema).persist(StorageLevel.MEMORY_AND_DISK))
    units = assign_folds(rows.select("experiment_id", "unit_id", "treatment", "engagement", "text", "tenure_days",
                                     "prior_sessions", "cluster"), cfg.ingest.n_folds, cfg.seed)
    write_table(units, cfg, "units", mode="overwrite", partition_by=["experiment_id"], overwrite_schema=True)
    write_table(rows.select("experiment_id", "unit_id", "indices", "values",
                            F.lit(0).cast("int").alias("pooled_tokens")),
                cfg, "neurons", mode="overwrite", partition_by=["experiment_id"], overwrite_schema=True)
    write_table(rows.select("experiment_id", "unit_id", "true_cate", "mu0"), cfg, "scale_truth", mode="overwrite",
                overwrite_schema=True)
    rows.unpersist()
    out = {k: v for k, v in truth.items() if k not in ("weights", "cluster_shift")}
    out["design"] = asdict(design)
    return out
