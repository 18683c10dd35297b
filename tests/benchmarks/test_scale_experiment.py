"""The scale benchmark's experiment generator: the lakehouse contract of units/neurons and the planted truth."""
import numpy as np
import pandas as pd
import pytest
from pyspark.sql import types as T

from tokens2policy.scale_experiment import ScaleDesign, draw_block, generate, sample_without_replacement


def test_sampling_without_replacement_matches_successive_draws():
    """Frequencies of each category among the k draws equal the exact successive-draw probabilities (k = 2)."""
    w = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
    rng = np.random.default_rng(1)
    got = sample_without_replacement(rng, np.cumsum(w), 200_000, 2)
    assert (got[:, 0] != got[:, 1]).all()
    # P(j among 2) = w_j + sum_{i != j} w_i w_j / (1 - w_i)
    exact = np.array([w[j] + sum(w[i] * w[j] / (1 - w[i]) for i in range(5) if i != j) for j in range(5)])
    freq = np.bincount(got.ravel(), minlength=5) / len(got)
    assert np.abs(freq - exact).max() < 4 * np.sqrt(exact * (1 - exact) / len(got)).max()


def test_block_codes_are_sae_like_and_the_truth_is_planted():
    design = ScaleDesign(n=30_000, block=30_000, seed=3)
    truth = design.truth()
    d = draw_block(design, truth, 0)
    idx, val = d["indices"], d["values"]
    assert idx.shape == (30_000, 32) and (np.diff(idx, axis=1) > 0).all() and (val > 0).all()
    freq = np.bincount(idx.ravel(), minlength=design.m) / len(idx)
    assert freq.max() > 0.2 and np.median(freq) < 0.01  # a few common neurons, most rare
    for p, q in truth["proxies"].items():  # the proxy co-activates with its planted neuron
        has_p, has_q = (idx == p).any(1), (idx == q).any(1)
        assert has_q[has_p].mean() > 0.75 > 5 * has_q[~has_p].mean()
    # the outcome model: OLS of y on [1, t, covariates' mu0, z_p, t z_p] recovers the planted effects
    z = np.stack([np.where(idx == p, val, 0).sum(1) for p in truth["planted"]], axis=1)
    t = d["treatment"]
    X = np.column_stack([np.ones(len(t)), t, d["mu0"], z, t[:, None] * z])
    beta, *_ = np.linalg.lstsq(X, d["engagement"], rcond=None)
    resid = d["engagement"] - X @ beta
    se = np.sqrt(np.diag(np.linalg.inv(X.T @ X)) * resid.var())
    k = len(truth["planted"])
    effects = np.array([truth["effects"][p] for p in truth["planted"]])
    assert np.all(np.abs(beta[-k:] - effects) < 4 * se[-k:])
    assert abs(beta[1] - design.base_effect) < 4 * se[1] and abs(t.mean() - 0.5) < 1e-4


def test_generated_tables_follow_the_contract_and_do_not_depend_on_partitioning(spark, make_cfg):
    from tokens2policy.lakehouse import read_table

    design = ScaleDesign(n=2_500, block=1_000, seed=5)
    cfg = make_cfg()
    truth = generate(spark, cfg, design, partitions=3)
    units = read_table(spark, cfg, "units")
    neurons = read_table(spark, cfg, "neurons")
    types = dict((f.name, f.dataType) for f in units.schema.fields)
    assert types == {"experiment_id": T.StringType(), "unit_id": T.StringType(), "treatment": T.IntegerType(),
                     "engagement": T.DoubleType(), "text": T.StringType(), "tenure_days": T.DoubleType(),
                     "prior_sessions": T.DoubleType(), "cluster": T.StringType(), "fold": T.IntegerType()}
    assert [f.name for f in neurons.schema.fields] == ["experiment_id", "unit_id", "indices", "values",
                                                        "pooled_tokens"]
    u = units.toPandas().sort_values("unit_id").reset_index(drop=True)
    nz = neurons.toPandas().sort_values("unit_id").reset_index(drop=True)
    assert len(u) == len(nz) == 2_500 and u["unit_id"].is_unique and (u["unit_id"] == nz["unit_id"]).all()
    assert (u["text"].str.len() > 0).all() and set(u["treatment"]) == {0, 1}
    sizes = u.groupby(["treatment", "fold"]).size().unstack()
    assert sizes.shape == (2, cfg.ingest.n_folds) and (sizes.max(axis=1) - sizes.min(axis=1) <= 1).all()
    idx = np.stack(nz["indices"].to_numpy())
    assert idx.shape == (2_500, 32) and (np.diff(idx, axis=1) > 0).all() and (nz["pooled_tokens"] == 0).all()
    # the same rows as drawing the blocks directly (the driver never held them; partitions do not matter)
    ref = pd.concat([pd.DataFrame({"treatment": b["treatment"], "engagement": b["engagement"],
                                   "first": b["indices"][:, 0]})
                     for b in (draw_block(design, design.truth(), i) for i in range(3))], ignore_index=True)
    assert np.array_equal(u["treatment"].to_numpy(), ref["treatment"].to_numpy())
    assert np.allclose(u["engagement"].to_numpy(), ref["engagement"].to_numpy(), rtol=0, atol=0)
    assert np.array_equal(idx[:, 0], ref["first"].to_numpy())
    assert set(truth["planted"]) == set(truth["effects"]) and len(truth["planted"]) == 5
