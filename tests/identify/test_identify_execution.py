"""Identify in memory (one collected Block, the engine's Tester: no Spark job) equals the Spark path (mapInPandas
reductions) on the same rows: the same decisions, p-values to 1e-9 relative (only the order of floating-point
sums differs: partitions summed on the driver vs one block)."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from test_identify_job import _write, make_tables  # noqa: E402


def _frames(spark, with_unit_id=False):
    units, neurons, *_ = make_tables(n=400, m=12, seed=1)
    pdf = units.merge(neurons[["unit_id", "indices", "values"]], on="unit_id", how="left")
    pdf = pdf.rename(columns={"outcome": "y"})
    cols = ["y", "treatment", "age", "fold", "cluster", "indices", "values"] + (["unit_id"] if with_unit_id else [])
    pdf = pdf[cols]
    pdf["treatment"] = pdf["treatment"].astype(float)
    pdf["indices"] = pdf["indices"].map(lambda v: v if isinstance(v, list) else None)
    pdf["values"] = pdf["values"].map(lambda v: v if isinstance(v, list) else None)
    schema = ("y double, treatment double, age double, fold int, cluster string, indices array<int>, "
              "values array<double>" + (", unit_id string" if with_unit_id else ""))
    df = spark.createDataFrame(pdf, schema).repartition(3)
    return df, df.toPandas()  # the in-memory path gets the rows as the job collects them (Arrow)


def _same(a, b):
    (res_a, mg_a), (res_b, mg_b) = a, b
    assert [(x["action"], x["feature"]) for x in res_a.trace] == [(x["action"], x["feature"]) for x in res_b.trace]
    assert res_a.selected.tolist() == res_b.selected.tolist() and {4, 9} <= set(res_a.selected.tolist())
    assert res_a.selected_w.tolist() == res_b.selected_w.tolist()
    np.testing.assert_allclose(res_a.pvalues, res_b.pvalues, rtol=1e-9)
    np.testing.assert_allclose(res_a.tstats, res_b.tstats, rtol=1e-9)
    np.testing.assert_allclose(mg_a.pvalues, mg_b.pvalues, rtol=1e-9)
    np.testing.assert_allclose(mg_a.tstats_w, mg_b.tstats_w, rtol=1e-9)


@pytest.mark.parametrize("test", ["gcm", "linear", "hc2", "cluster"])
def test_in_memory_identify_equals_the_spark_path(spark, test):
    from tokens2policy.config import IdentifyConfig
    from tokens2policy.identify.job import frame_spec, identify_frame, identify_pandas

    df, pdf = _frames(spark)
    ic = IdentifyConfig(test=test, min_active=5)
    spec = frame_spec(df, ic, 12, ["age"])
    assert frame_spec(pdf, ic, 12, ["age"]) == spec  # levels counted the same way over the collected rows
    _same(identify_pandas(pdf, spec, ic), identify_frame(df, spec, ic))


def test_in_memory_lgbm_gcm_equals_the_spark_fold_tasks(spark):
    pytest.importorskip("lightgbm")
    from tokens2policy.config import IdentifyConfig
    from tokens2policy.identify.job import frame_spec, identify_frame, identify_pandas

    df, pdf = _frames(spark, with_unit_id=True)
    ic = IdentifyConfig(test="gcm", nuisance="lgbm", min_active=5)
    spec = frame_spec(df, ic, 12, ["age"])
    # the in-memory path sorts by unit_id, as each Spark fold task does: a shuffled frame gives the same models
    _same(identify_pandas(pdf.sample(frac=1.0, random_state=3), spec, ic), identify_frame(df, spec, ic))


@pytest.mark.slow
@pytest.mark.parametrize("test", ["gcm", "cluster"])
def test_identify_job_writes_the_same_tables_in_memory_and_on_spark(spark, make_cfg, test):
    """The job forced to each path on the same tables: modifiers, selection_trace and marginal_screen equal
    (strings and integers exactly, floats to 1e-9 relative); the choice is in the summary and the MLflow run."""
    import mlflow

    from tokens2policy.identify import job
    from tokens2policy.lakehouse import read_table

    base = [f"identify.test={test}", "identify.min_active=5", "source.covariate_cols=[age]"]
    units, neurons, *_ = make_tables()
    units.loc[units.index[:7], "outcome"] = np.nan  # units without an outcome: skipped alike by both paths
    tables = {}
    for mode in ("spark", "memory"):
        cfg = make_cfg(*base, f"execution.mode={mode}")
        if mode == "spark":
            _write(spark, cfg, units, neurons)
        summary = job.run(spark, cfg)
        assert summary["execution"]["e1"]["mode"] == mode
        run = mlflow.search_runs(filter_string="tags.`t2p.stage` = 'identify'", output_format="list",
                                 order_by=["attributes.start_time DESC"])[0]
        assert run.data.params["execution.identify"] == mode and run.data.tags["t2p.execution.identify"] == mode
        tables[mode] = {name: read_table(spark, cfg, name).toPandas() for name in
                        ("modifiers", "selection_trace", "marginal_screen")}
    keys = {"modifiers": ["kind", "feature"], "selection_trace": ["seq"], "marginal_screen": ["kind", "feature"]}
    for name, key in keys.items():
        a = tables["spark"][name].sort_values(key).reset_index(drop=True)
        b = tables["memory"][name].sort_values(key).reset_index(drop=True)
        assert len(a) == len(b) > 0 and list(a.columns) == list(b.columns)
        for col in a.columns:
            if a[col].dtype.kind == "f":
                np.testing.assert_allclose(b[col].to_numpy(), a[col].to_numpy(), rtol=1e-9, err_msg=f"{name}.{col}")
            elif name == "selection_trace" and col == "detail":
                continue  # JSON of the same decisions whose floats may differ in the last digits
            else:
                assert a[col].tolist() == b[col].tolist(), f"{name}.{col}"
