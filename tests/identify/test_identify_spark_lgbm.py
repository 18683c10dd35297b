"""GCM with LightGBM nuisances on Spark: fold k's models are trained in one Spark task on the other folds' rows, and
the Spark path equals the in-memory ``nexis(..., test="gcm", nuisance="lgbm")`` on the rows sorted by unit_id."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

pytest.importorskip("lightgbm")

from tokens2policy.config import IdentifyConfig  # noqa: E402
from tokens2policy.identify import marginal, nexis  # noqa: E402
from tokens2policy.identify import engine  # noqa: E402
from tokens2policy.identify.job import SparkSource, identify_frame  # noqa: E402
from tokens2policy.identify.stats import Block  # noqa: E402

FRAME_SCHEMA = ("unit_id string, y double, treatment double, fold int, age double, indices array<int>, "
                "values array<double>")
FOLD_LEVELS = (2, 5, 7)  # stored fold ids need not be 0..K-1


def make_problem(n=360, m=6, seed=0):
    """Sparse neurons, one covariate; neuron 1 modifies the effect (through a threshold), neuron 3 only shifts y.
    Returned in unit_id order; the Spark frame gets the rows shuffled."""
    rng = np.random.default_rng(seed)
    active = rng.random((n, m)) < 0.5
    Z = np.where(active, rng.exponential(1.0, (n, m)), 0.0)
    age = rng.normal(40, 10, n)
    t = (rng.random(n) < 0.5).astype(float)
    y = 0.5 * Z[:, 3] + t * (2.0 * (Z[:, 1] > 0.7) + 0.02 * (age - 40)) + rng.normal(size=n)
    fold = np.asarray(FOLD_LEVELS)[rng.permutation(np.arange(n) % len(FOLD_LEVELS))]
    uid = np.array([f"u{i:04d}" for i in range(n)])
    return uid, y, t, Z, age, fold


def spark_frame(spark, uid, y, t, Z, age, fold, n_partitions=3, seed=1):
    rows = []
    for i in np.random.default_rng(seed).permutation(len(y)):  # Spark delivers rows in no particular order
        nz = np.flatnonzero(Z[i])
        rows.append((str(uid[i]), float(y[i]), float(t[i]), int(fold[i]), float(age[i]), nz.tolist(),
                     Z[i, nz].tolist()))
    return spark.createDataFrame(rows, FRAME_SCHEMA).repartition(n_partitions)


def spec_for(Z):
    return {"m": Z.shape[1], "covariates": ["age"], "fold_codes": {v: i for i, v in enumerate(FOLD_LEVELS)}}


def test_fold_models_and_gcm_sums_equal_in_memory(spark):
    """One conditioning set S = {age, z1, z3}: the per-fold Spark tasks (one partition per fold) train the very
    models the in-memory cross-fit trains, and the partition-summed GCM statistics equal the in-memory engine's."""
    uid, y, t, Z, age, fold = make_problem()
    src = SparkSource(spark_frame(spark, uid, y, t, Z, age, fold), spec_for(Z))
    S = [0, 1 + 1, 1 + 3]  # global ids: W first (age = 0), then z_j = 1 + j
    K = len(FOLD_LEVELS)
    e = t.mean()
    m_models, g_models = src.lgbm_nuisances(S, K, e, seed=0)

    # every fit ran in its own Spark task: K distinct partitions per nuisance
    assert [len(f["partitions"]) for f in src.fold_tasks] == [K, K]

    # the in-memory engine on the same rows (unit_id order), through its own LightGBM branch
    codes = np.unique(fold, return_inverse=True)[1]
    block = Block(y, t, age[:, None], sp.csc_matrix(Z), folds=codes)
    tester = engine.Tester(engine.Source([block]), "gcm", 0, K, "lgbm", 0, with_nnz=False)
    kind, phi_res = tester._gcm_residual(S)
    assert kind == "resid"

    # the models are bit-identical to fits on the other folds' rows in unit_id order
    import lightgbm

    from tokens2policy.identify.nuisance import LGBM_PARAMS

    XS = block.columns(S)
    for k in range(K):
        tr = codes != k
        ref = lightgbm.LGBMRegressor(**LGBM_PARAMS, random_state=0).fit(XS[tr], y[tr])
        np.testing.assert_array_equal(lightgbm.Booster(model_str=m_models[k]).predict(XS), ref.predict(XS))
        assert m_models[k] != m_models[(k + 1) % K]  # really one model per fold

    from tokens2policy.identify.job import lgbm_gcm_block_sums

    got = src.reduce(lambda b: lgbm_gcm_block_sums(b, S, m_models, g_models, e))  # summed over the partitions
    want = block.gcm_sums(S, phi_res)
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-11, atol=1e-9 * np.abs(want[name]).max())


@pytest.mark.parametrize("n, m", [
    (240, 4),                                    # W-phase stops, neuron 1 added: 2 conditioning sets fit
    pytest.param(360, 6, marks=pytest.mark.slow),  # age added, neuron 1 added, age dropped backward: 4 sets
])
def test_spark_lgbm_search_equals_in_memory(spark, n, m):
    """The whole search (forward, backward, final p(j | S∖{j})) and the marginal screen: same decisions, same
    selections, p-values and t within 1e-9 relative."""
    uid, y, t, Z, age, fold = make_problem(n=n, m=m)
    df = spark_frame(spark, uid, y, t, Z, age, fold).cache()
    try:
        ic = IdentifyConfig(test="gcm", nuisance="lgbm", min_active=5)
        res, mg = identify_frame(df, spec_for(Z), ic, seed=0)
    finally:
        df.unpersist()
    kw = dict(test="gcm", nuisance="lgbm", folds=fold, min_active=5, alpha=ic.alpha, rho=ic.rho)
    ref = nexis(y, t, sp.csr_matrix(Z), w=age[:, None], **kw)
    assert 1 in ref.selected.tolist()  # the planted modifier (found through the threshold)
    assert [(x["action"], x["feature"]) for x in res.trace] == [(x["action"], x["feature"]) for x in ref.trace]
    assert res.selected.tolist() == ref.selected.tolist()
    assert res.selected_w.tolist() == ref.selected_w.tolist()
    np.testing.assert_allclose(res.pvalues, ref.pvalues, rtol=1e-9)
    np.testing.assert_allclose(res.tstats, ref.tstats, rtol=1e-9)
    tested = [x for x in ref.trace if x.get("p") is not None]
    np.testing.assert_allclose([x["p"] for x in res.trace if x.get("p") is not None], [x["p"] for x in tested],
                               rtol=1e-9)
    kw.pop("rho")
    mref = marginal(y, t, sp.csr_matrix(Z), w=age[:, None], **kw)
    np.testing.assert_allclose(mg.pvalues, mref.pvalues, rtol=1e-9)


def test_lgbm_frame_needs_the_unit_key(spark):
    uid, y, t, Z, age, fold = make_problem(n=40)
    df = spark_frame(spark, uid, y, t, Z, age, fold).drop("unit_id")
    with pytest.raises(ValueError, match="unit_id"):
        identify_frame(df, spec_for(Z), IdentifyConfig(test="gcm", nuisance="lgbm", min_active=0))


def test_fold_tasks_give_each_fold_its_own_partition_and_only_other_folds_rows(spark):
    """The shared per-fold machinery (also used by effects): K tasks in K partitions; ``training_only`` hands
    fold k's task exactly the rows of the other folds."""
    from tokens2policy.fold_tasks import run_fold_tasks

    pdf = pd.DataFrame({"unit_id": np.arange(50), "fold": np.arange(50) % 5 * 3})
    df = spark.createDataFrame(pdf).repartition(4)

    def task(rows, k):
        return pd.DataFrame({"n": [len(rows)], "folds": [",".join(map(str, sorted(set(rows["fold"]))))]})

    for training_only in (False, True):
        out = run_fold_tasks(spark, df, sorted(set(pdf.fold)), task, "n long, folds string",
                             training_only=training_only).toPandas().sort_values("task_fold")
        assert out.partition_id.nunique() == 5
        assert out.task_fold.tolist() == [0, 3, 6, 9, 12]
        if training_only:
            assert out.n.tolist() == [40] * 5
            assert [f.split(",") for f in out.folds] == [[str(g) for g in (0, 3, 6, 9, 12) if g != k]
                                                          for k in (0, 3, 6, 9, 12)]
        else:
            assert out.n.tolist() == [50] * 5


@pytest.mark.slow  # a full Spark job with MLflow and Delta writes
def test_identify_job_with_lgbm_nuisances(spark, make_cfg):
    """``t2p run identify`` with identify.test=gcm, identify.nuisance=lgbm reads units + neurons, fits the
    nuisances per fold across the cluster and writes the in-memory answer (rows in unit_id order)."""
    from tokens2policy.identify import job
    from tokens2policy.lakehouse import read_table, write_table

    # honesty.mode=none: the reference below runs on every unit (the selection split is tested on its own)
    cfg = make_cfg("identify.test=gcm", "identify.nuisance=lgbm", "identify.min_active=5",
                   "source.covariate_cols=[age]", "source.outcome_cols=[outcome]", "honesty.mode=none")
    uid, y, t, Z, age, fold = make_problem(n=240, m=4)
    units = [("e1", str(u), int(ti), float(yi), int(f), float(a)) for u, ti, yi, f, a in zip(uid, t, y, fold, age)]
    write_table(spark.createDataFrame(units[::-1], "experiment_id string, unit_id string, treatment int, "
                                      "outcome double, fold int, age double"), cfg, "units", mode="overwrite")
    nrows = [("e1", str(u), np.flatnonzero(r).tolist(), r[r != 0].tolist()) for u, r in zip(uid, Z)]
    write_table(spark.createDataFrame(nrows, "experiment_id string, unit_id string, indices array<int>, "
                                      "values array<float>"), cfg, "neurons", mode="overwrite")
    job.run(spark, cfg)

    Z32 = Z.astype(np.float32).astype(float)  # the neurons table stores float activations
    ref = nexis(y, t, sp.csr_matrix(Z32), w=age[:, None], test="gcm", nuisance="lgbm", folds=fold, min_active=5,
                alpha=cfg.identify.alpha, rho=cfg.identify.rho)
    mods = read_table(spark, cfg, "modifiers").toPandas()
    z_rows = mods[mods.kind == "Z"]
    assert sorted(z_rows.feature.astype(int)) == sorted(ref.selected.tolist()) and 1 in ref.selected
    got = dict(zip(z_rows.feature.astype(int), z_rows.p_value))
    for j, p in zip(ref.selected, ref.pvalues):
        assert got[int(j)] == pytest.approx(p, rel=1e-9)
    trace = read_table(spark, cfg, "selection_trace").toPandas().sort_values("seq")
    assert list(trace.action) == [x["action"] for x in ref.trace]
