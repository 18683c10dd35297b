"""Passes over the rows per NEXIS round do not grow with the number of selected features (issue 16).

The backward step tests every selected j given S∖{j}: |S| tests. Batched (``Tester.each_given_rest``), they share
their passes — one reduce for all robust meats (hc2 / cluster), two for all GCM basis nuisances (both ridges from
one pass) and sums (of the tested column only) — and give the results of |S| separate tests (identical for the
linear family; GCM to rounding). Counted twice: reduces of the in-memory Source, and Spark jobs of the
distributed path (a job tag around each step).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from tokens2policy.identify import engine
from tokens2policy.identify.engine import Source, _prepare

# reduces (= Spark jobs) of one backward evaluation of |S| tests, whatever |S|; per forward step (the new feature's
# cross-products, then the tests' own passes)
PASSES_BACKWARD = {"linear": 0, "hc2": 1, "cluster": 1, "gcm": 2}
PASSES_FORWARD = {"linear": 1, "hc2": 2, "cluster": 2, "gcm": 3}
PLANTED = (1, 4, 7, 10, 13)


def planted_problem(n=1500, m=18, seed=0):
    """Five direct modifiers with clear effects: the search selects all five, so |S| reaches 5."""
    rng = np.random.default_rng(seed)
    active = rng.random((n, m)) < 0.4
    Z = np.where(active, rng.exponential(1.0, (n, m)), 0.0)
    t = (rng.random(n) < 0.5).astype(float)
    y = 0.2 * t + 0.4 * Z[:, 2] + t * (Z[:, list(PLANTED)] @ np.array([1.0, -0.9, 0.8, 0.7, -0.7])) \
        + rng.normal(size=n)
    return y, t, Z, rng.integers(0, 60, n), rng.permutation(np.arange(n) % 5)


class CountingSource(Source):
    def __init__(self, blocks):
        super().__init__(blocks)
        self.calls = 0

    def reduce(self, method, *args, **kwargs):
        self.calls += 1
        return super().reduce(method, *args, **kwargs)


def _tester(test, nuisance="spline", n_blocks=2):
    y, t, Z, cl, folds = planted_problem()
    cl = cl if test == "cluster" else None   # the linear test refuses cluster ids; the others ignore them
    src, G, K, mw = _prepare(y, t, sp.csr_matrix(Z), None, cl, folds, test, "FWER", 0.05, 0.5, 5, 20, nuisance, 0,
                             n_blocks)
    src = CountingSource(src.blocks)
    return engine.Tester(src, test, G, K, nuisance, 0), src


@pytest.mark.parametrize("test,nuisance", [("linear", "spline"), ("hc2", "spline"), ("cluster", "spline"),
                                           ("gcm", "spline"), ("gcm", "poly2")])
def test_backward_tests_share_their_passes_and_equal_separate_tests(test, nuisance):
    tester, src = _tester(test, nuisance)
    for size in (2, 5):
        S = list(PLANTED[:size])
        tester.ensure(S)  # cross-products: once per feature, not part of the backward step
        before = src.calls
        batched = tester.each_given_rest(S)
        assert src.calls - before == PASSES_BACKWARD[test], (size, src.calls - before)
        for j in S:  # the reference: |S| separate calls, each its own passes
            before = src.calls
            tt, pp, ok = tester([s for s in S if s != j], np.array([j]))
            assert src.calls - before == PASSES_BACKWARD[test] - (test == "gcm" and len(S) == 1)
            if test == "gcm":  # the batch computes the tested column's sums alone: equal up to rounding
                assert batched[j][0] == pytest.approx(float(tt[0]), rel=1e-12)
                assert batched[j][1] == pytest.approx(float(pp[0]), rel=1e-9) and batched[j][2] == bool(ok[0])
            else:
                assert batched[j][:3] == (float(tt[0]), float(pp[0]), bool(ok[0]))
            assert batched[j][1] < 1e-6  # a planted modifier given the other planted ones


def _spark_frame(spark):
    y, t, Z, cl, folds = planted_problem()
    rows = [(float(y[i]), float(t[i]), int(folds[i]), f"c{cl[i]}", np.flatnonzero(Z[i]).tolist(),
             Z[i][Z[i] != 0].tolist()) for i in range(len(y))]
    df = spark.createDataFrame(rows, "y double, treatment double, fold int, cluster string, indices array<int>, "
                                     "values array<double>").repartition(3).cache()
    df.count()
    return df, Z.shape[1]


@pytest.mark.parametrize("test", ["hc2", pytest.param("gcm", marks=pytest.mark.slow)])
def test_spark_jobs_per_round_do_not_grow_with_the_selected_set(spark, test):
    """Spark jobs of the distributed search, attributed to the decision that follows them (trace records as they
    are made): a forward step costs at most PASSES_FORWARD jobs and a backward evaluation of all |S| tests
    PASSES_BACKWARD (+ the new feature's cross-products after an addition), with |S| = 5 (per-feature jobs: 5 times
    as many), and the final report none."""
    from tokens2policy.config import IdentifyConfig
    from tokens2policy.identify.job import frame_spec, identify_frame

    df, m = _spark_frame(spark)
    sc = spark.sparkContext
    ic = IdentifyConfig(test=test, min_active=5)
    spec = frame_spec(df, ic, m, [])
    tracker = sc._jsc.sc().statusTracker()
    steps, tag = [], f"passes-test-{test}"

    def on_decision(rec, selected):
        steps.append((rec["step"], rec["action"], len(tracker.getJobIdsForTag(tag))))

    sc.addJobTag(tag)
    try:
        res, _ = identify_frame(df, spec, ic, on_decision=on_decision)
    finally:
        sc.removeJobTag(tag)
        df.unpersist()
    assert sorted(res.selected.tolist()) == sorted(PLANTED)
    spent, prev = [], 1  # the column moments: one job before the first decision
    for step, action, jobs in steps:
        spent.append((step, action, jobs - prev))
        prev = jobs
    forward = [x for x in spent if x[0] == "forward"]
    assert len(forward) >= 6 and all(x[2] <= PASSES_FORWARD[test] for x in forward), spent
    # the stepwise check after each addition (|S| >= 2): one backward evaluation of all |S| tests, plus the new
    # feature's cross-products (once per feature that enters S: the check is the first to need them, so the next
    # forward step does not pay them); the final report reuses the last check's evaluation: no job
    backward = [x for x in spent if x[0] == "backward"]
    final = [x for x in spent if x[0] == "final"]
    assert [x[1] for x in backward] == ["keep"] * 4, str(spent)
    assert all(x[2] == PASSES_BACKWARD[test] + 1 for x in backward), str(spent)
    assert len(final) == 5 and all(x[2] == 0 for x in final), str(spent)
    # the marginal screen (after the search) reuses the first forward step's tests given S = ∅: no job
    assert len(tracker.getJobIdsForTag(tag)) == steps[-1][2]


def test_dense_single_pass_sums_equal_plain_numpy():
    """The row-blocked single pass over dense Z (many blocks: m = 700 gives 93 rows per block) equals the plain
    products, counts and ranges; the dense Block's moments equal the sparse Block's on the same matrix."""
    from tokens2policy.identify.stats import Block, dense_row_pass

    rng = np.random.default_rng(4)
    n, m = 1000, 700
    Z = np.where(rng.random((n, m)) < 0.3, rng.normal(size=(n, m)), 0.0)
    Z[:, 5] = 0.0  # a column without non-zeros
    V = rng.normal(size=(n, 4))
    d = dense_row_pass(Z, V, with_nnz=True, with_range=True)
    np.testing.assert_allclose(d["lin"], V.T @ Z, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(d["sq"], V[:, :2].T @ (Z * Z), rtol=1e-12, atol=1e-12)
    assert d["nnz"].tolist() == np.count_nonzero(Z, axis=0).tolist()
    masked = np.ma.masked_equal(Z, 0.0)
    assert d["min_nz"][5] == np.inf and d["max_nz"][5] == -np.inf
    keep = np.arange(m) != 5
    assert d["min_nz"][keep].tolist() == masked.min(0).data[keep].tolist()
    assert d["max_nz"][keep].tolist() == masked.max(0).data[keep].tolist()
    y, t = rng.normal(size=n), (rng.random(n) < 0.5).astype(float)
    dense, sparse = Block(y, t, None, Z).moments(), Block(y, t, None, sp.csr_matrix(Z)).moments()
    for key in dense:
        np.testing.assert_allclose(dense[key], sparse[key], rtol=1e-12, atol=1e-12)
    b = Block(y, t, None, Z)
    np.testing.assert_allclose(b.rmatvec(V[:, :2]), Z.T @ V[:, :2], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(b.rmatvec(V[:, :3], square=True), (Z * Z).T @ V[:, :3], rtol=1e-12, atol=1e-12)


@pytest.mark.slow  # 40 partitions x ~20 Spark jobs
def test_many_partitions_are_tree_combined_with_the_same_result(spark):
    """Above SparkSource.TREE_ABOVE partitions the partial statistics are combined in the executors (treeReduce):
    the GCM search on 40 partitions equals the in-memory one."""
    from tokens2policy.config import IdentifyConfig
    from tokens2policy.identify import nexis
    from tokens2policy.identify.job import SparkSource, frame_spec, identify_frame

    df, m = _spark_frame(spark)
    many = df.repartition(40)
    assert many.rdd.getNumPartitions() > SparkSource.TREE_ABOVE
    ic = IdentifyConfig(test="gcm", min_active=5)
    res, _ = identify_frame(many, frame_spec(many, ic, m, []), ic)
    df.unpersist()
    y, t, Z, cl, folds = planted_problem()
    ref = nexis(y, t, sp.csr_matrix(Z), test="gcm", folds=folds, min_active=5, alpha=ic.alpha, rho=ic.rho)
    assert res.selected.tolist() == ref.selected.tolist()
    np.testing.assert_allclose(res.pvalues, ref.pvalues, rtol=1e-9)
