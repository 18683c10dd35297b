"""The pipeline's own path (validate/pipeline_path.py): select → effects → policy as the stages run them.

CI size: a few repetitions of the small designs, with bounds fixed in advance from binomial tails (false-failure
probability ≤ 0.5 % each, treating CIs as independent), so the test can fail but does not fail by chance. The
full study (≥ 500 repetitions, docs/validation.md) makes the precise statements.
"""
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from tokens2policy.validate.pipeline_path import (
    ROW_COLUMNS, PathDesign, designs, run_repetition, summarize,
)


def _lower(n, rate, fail=0.005):
    return int(stats.binom.ppf(fail, n, rate))


def _upper(n, rate, fail=0.005):
    return int(stats.binom.ppf(1 - fail, n, rate))


@pytest.fixture(scope="module")
def ci_rows():
    null, alt = designs("ci")
    rows = [run_repetition(null, r, seed=7, modes=("split",), n_truth=5000) for r in range(4)]
    rows += [run_repetition(alt, r, seed=7, modes=("split",), n_truth=5000) for r in range(4)]
    return pd.concat(rows, ignore_index=True)


def test_ci_size_false_claims_and_coverage_within_honest_bounds(ci_rows):
    rows = ci_rows
    assert list(rows.columns) == list(ROW_COLUMNS)
    null = rows[(rows.design == "null") & (rows.kind == "claim") & ~rows.estimand.str.startswith("per-unit")]
    for (selector, estimand), g in null.groupby(["selector", "estimand"]):
        assert g.claim.sum() <= _upper(len(g), 0.05), (selector, estimand, g.claim.tolist())
    cov = rows[(rows.kind == "coverage") & rows.covered.notna()]
    gate = cov[cov.estimand.str.startswith(("gate", "joint"))]
    value = cov[cov.estimand.str.startswith("value")]
    assert len(value) == 3 * 12  # three rules; 4 null repetitions x 2 selectors + 4 alternative ones
    assert value.covered.sum() >= _lower(len(value), 0.95), value[["design", "estimand", "covered"]]
    if len(gate):
        assert gate.covered.sum() >= _lower(len(gate), 0.95), gate[["design", "estimand", "covered"]]
    # the learned rules' value CIs use the cross-fitting variance: never narrower than the per-unit ones
    width = cov.assign(w=cov.ci_high - cov.ci_low).set_index(["design", "selector", "rep", "estimand"])["w"]
    for pol in ("tree", "threshold", "budget"):
        crossfit = width.xs(f"value {pol}", level="estimand")
        per_unit = width.xs(f"per-unit SE: value {pol}", level="estimand").reindex(crossfit.index)
        assert (crossfit >= per_unit - 1e-12).all(), pol
    # the summary: Wilson intervals contain the rates; one row per cell
    s = summarize(rows)
    assert ((s.ci_low <= s.rate + 1e-12) & (s.rate <= s.ci_high + 1e-12)).all()
    assert not s.duplicated(["design", "mode", "selector", "estimand"]).any()
    # every row says which units its numbers came from
    assert (rows.n_estimation + rows.n_selection == rows.n).all()
    assert ((rows.n_estimation > 0.3 * rows.n) & (rows.n_estimation < 0.7 * rows.n)).all()


def test_truths_are_the_closed_forms_by_monte_carlo():
    d = PathDesign("alternative", n=100, m=5, effect=0.8)
    x = d.features(np.random.default_rng(0), 400000)
    tau = d.tau(x)
    for j in range(3):
        act = x[:, j] > 0
        assert tau[act].mean() == pytest.approx(d.gate_truth(j, "active"), abs=0.01)
        assert tau[~act].mean() == pytest.approx(d.gate_truth(j, "inactive"), abs=0.01)
    # the joint regression's truth: the projection of tau on [1, 1{x0 > 0}, 1{x1 > 0}, 1{x2 > 0}]
    M = np.column_stack([np.ones(len(x)), (x[:, :3] > 0)])
    beta = np.linalg.lstsq(M, tau, rcond=None)[0]
    np.testing.assert_allclose(beta[1:], [d.effect * d.weight(j) for j in range(3)], atol=1e-9)


@pytest.mark.slow  # a Spark job: the validation job's hook writes the rows the in-memory path computes
def test_validate_job_hook_writes_the_in_memory_rows(spark, make_cfg):
    from tokens2policy.lakehouse import read_table
    from tokens2policy.validate.pipeline_path import run_in_study, run_study

    cfg = make_cfg("validate.pipeline_path_repetitions=1")
    import mlflow

    from tokens2policy.tracking import stage_run

    with stage_run(cfg, "validate") as run:
        metrics = run_in_study(spark, cfg, run.info.run_id, cfg.data_path / "validation")
    got = read_table(spark, cfg, "validation_pipeline_path").toPandas().drop(columns="run_id")
    want = run_study(1, cfg.seed, "ci")
    key = ["design", "mode", "selector", "estimand", "estimate"]
    got = got.sort_values(key).reset_index(drop=True)[list(ROW_COLUMNS)]
    want = want.sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(got.drop(columns="seconds"), want.drop(columns="seconds"), check_dtype=False)
    assert any(k.startswith("pipeline_path.null.split.nexis.") for k in metrics)
    assert mlflow.get_run(run.info.run_id).data.metrics
