"""The Spark job runs one task per (design point, repetition), writes validation_runs, and equals the in-memory
runner for the same seeds; summaries and figures go to the MLflow run."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tokens2policy.validate.study import RESULT_COLUMNS, build_tasks, run_in_memory

OVERRIDES = [
    "validate.cells=[linear:gaussian]", "validate.n_values=[300]", "validate.effects=[0.8]",
    "validate.repetitions=2", "validate.null_repetitions=2", "validate.null_n=300", "validate.m=10",
    "validate.coverage_n=300", "validate.n_truth=2000", "validate.methods=[nexis_linear,nexis_gcm,marginal_bh]",
    "validate.figures=false", "validate.pipeline_path_repetitions=0",  # tested in test_pipeline_path.py
    "validate.calibration=[nonlinear]", "validate.calibration_repetitions=1",
    "validate.calibration_methods=[nexis_gcm,nexis_gcm_poly2_linz]",
]


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(["task_id", "kind", "method", "estimand"]).reset_index(drop=True)


@pytest.mark.slow  # ~1 min on an idle 2-core machine (Spark session, MLflow store, Delta write + read)
def test_spark_job_writes_validation_runs_equal_to_in_memory(spark, make_cfg):
    import mlflow

    from tokens2policy.lakehouse import read_table
    from tokens2policy.tracking import configure_mlflow
    from tokens2policy.validate.job import run, study_frame

    cfg = make_cfg(*OVERRIDES)
    tasks = build_tasks(cfg.validate_, cfg.seed)
    assert len(tasks) == 5   # 2 sweep + 2 null + 1 calibration (the nonlinear null of issue 13, finding 4)
    assert study_frame(spark, tasks, "x", "ci").rdd.getNumPartitions() == 5  # one Spark task per repetition

    summary = run(spark, cfg)
    stored = read_table(spark, cfg, "validation_runs").toPandas()
    assert set(stored["run_id"]) == {summary["run_id"]} and set(stored["study"]) == {"ci"}
    assert summary["rows"] == len(stored) and summary["tasks"] == 5

    got, want = _sorted(stored), _sorted(run_in_memory(tasks))
    # 3 methods per design-1 task, 7 CIs per covered task, 2 methods on the calibration task
    assert len(got) == len(want) and len(want) == 4 * 3 + 4 * 7 + 2
    for col, dtype in RESULT_COLUMNS.items():
        if col == "seconds":
            continue
        if dtype == "float64":
            np.testing.assert_allclose(got[col].to_numpy(float), want[col].to_numpy(float), rtol=1e-9, atol=1e-12,
                                       err_msg=col)
        else:
            assert got[col].tolist() == want[col].tolist(), col

    configure_mlflow(cfg)
    client = mlflow.MlflowClient()
    mlrun = client.get_run(summary["run_id"])
    assert mlrun.data.tags["t2p.stage"] == "validate"
    assert "fwer.gaussian.nexis_linear" in mlrun.data.metrics
    assert "fwer.cal-nonlinear.nexis_gcm" in mlrun.data.metrics
    arts = {a.path for a in client.list_artifacts(summary["run_id"], "validation")}
    assert {"validation/validation_selection_summary.csv", "validation/validation_coverage_summary.csv"} <= arts
    assert summary["figures"] == []  # validate.figures=false (the figures are tested without Spark)
