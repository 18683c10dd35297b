"""Effects job on real Spark + Delta + MLflow: per-fold Spark tasks equal the sequential fit; outputs match truth."""
import mlflow
import numpy as np
import pytest

from tokens2policy.effects import job as effects_job
from tokens2policy.effects.design import build_feature_spec, feature_matrix
from tokens2policy.effects.learners import cross_fit_nuisances
from tokens2policy.effects.synthetic import make_synthetic_rct, write_synthetic_tables
from tokens2policy.lakehouse import read_table


@pytest.fixture
def synth(spark, make_cfg):
    cfg = make_cfg("source.covariate_cols=[age, region]", "source.outcome_cols=[outcome]", "effects.n_bootstrap=50", "effects.nuisance_neurons=8",
                   "effects.nuisance=hgb")
    data = make_synthetic_rct(n=1500, seed=1)
    write_synthetic_tables(spark, cfg, data)
    return cfg, data


@pytest.mark.slow  # a full Spark job (~1 min on an idle 2-core machine)
def test_effects_job_tables_truth_and_parallel_folds(spark, synth):
    cfg, data = synth
    summary = effects_job.run(spark, cfg)
    exp = summary["experiments"][0]
    assert exp["nuisance_tasks"] == 5  # one Spark task (partition) per fold

    eff = read_table(spark, cfg, "effects").toPandas().sort_values(["learner", "unit_id"])
    assert set(eff.learner) == {"dr_selected", "r_selected", "dr_full", "r_full"}
    assert list(eff.columns[:7]) == ["experiment_id", "unit_id", "outcome", "learner", "cate", "ci_low", "ci_high"]
    dr = eff[eff.learner == "dr_selected"].set_index("unit_id").loc[data["units"].unit_id]
    tau = data["tau"]
    assert np.corrcoef(dr.cate, tau)[0, 1] > 0.9
    assert np.mean((dr.cate - tau) ** 2) < 0.3 * np.var(tau)
    assert (dr.ci_low < dr.cate).all() and (dr.cate < dr.ci_high).all()
    assert eff[eff.learner == "dr_full"].ci_low.isna().all()

    # the distributed nuisances equal an in-memory sequential cross-fit with the same seed
    pdf = data["units"].merge(data["neurons"].drop(columns="experiment_id"), on="unit_id").sort_values("unit_id")
    spec = build_feature_spec(pdf, ["age", "region"], [3, 7] + effects_job.top_neurons(pdf["indices"].tolist(), 8))
    spec.neurons = list(dict.fromkeys(spec.neurons))
    seq = cross_fit_nuisances(feature_matrix(pdf, spec), pdf.treatment.to_numpy(), pdf.outcome.to_numpy(),
                              pdf.fold.to_numpy(), effects_job.nuisance_params(cfg), cfg.seed)
    np.testing.assert_allclose(dr.mu0.to_numpy(), seq["mu0"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dr.mu1.to_numpy(), seq["mu1"], rtol=1e-12, atol=1e-12)

    gates = read_table(spark, cfg, "gates").toPandas().set_index(["feature", "group"])
    a3 = data["active"][:, 3]
    truth_diff = tau[a3].mean() - tau[~a3].mean()
    row = gates.loc[("neuron_3", "active - inactive")]
    assert row.ci_low < truth_diff < row.ci_high and row.label == "topic 3" and row.source == "neuron"
    assert ("age", "> median - <= median") in gates.index
    assert ("neuron_7", "T x neuron_7") in gates.index

    cal = read_table(spark, cfg, "calibration").toPandas()
    blp = cal[(cal.learner == "dr_selected") & (cal.metric == "blp")].set_index("group")
    assert blp.loc["differential_prediction", "ci_low"] < 1 < blp.loc["differential_prediction", "ci_high"]
    assert blp.loc["differential_prediction", "p_value"] < 1e-3
    assert set(cal.metric) == {"blp", "gates", "rate", "toc_curve", "qini_curve"}

    run = mlflow.search_runs(filter_string="tags.`t2p.stage` = 'effects'", output_format="list")[0]
    assert run.data.metrics["synth.nuisance_tasks"] == 5
    assert "synth.outcome.dr_selected.autoc" in run.data.metrics


def test_fit_task_is_order_invariant_and_matches_local_loop(synth):
    cfg, data = synth
    pdf = data["units"].merge(data["neurons"].drop(columns="experiment_id"), on="unit_id")
    spec = build_feature_spec(pdf, ["age", "region"], [3, 7, 5])
    params = effects_job.nuisance_params(cfg)
    a = effects_job.fit_task(pdf, 2, spec, ["outcome"], params, 0)
    b = effects_job.fit_task(pdf.sample(frac=1.0, random_state=3), 2, spec, ["outcome"], params, 0)
    np.testing.assert_array_equal(a[["mu0", "mu1", "e"]].to_numpy(), b[["mu0", "mu1", "e"]].to_numpy())
    full = effects_job.cross_fit_local(pdf, spec, ["outcome"], params, 0)
    assert len(full) == len(pdf) and full.unit_id.is_unique


def test_top_neurons_counts_activity_and_breaks_ties_by_index():
    assert effects_job.top_neurons([[1, 2], [2, 5], [5], [2]], 2) == [2, 5]
    assert effects_job.top_neurons([[3], [1]], 5) == [1, 3]
    assert effects_job.top_neurons([[], None], 3) == []
