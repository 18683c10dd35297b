"""Effects job on real Spark + Delta + MLflow: per-fold Spark tasks equal the sequential fit; outputs match truth."""
import mlflow
import numpy as np
import pytest

from tokens2policy.effects import job as effects_job
from tokens2policy.effects.design import build_feature_spec, feature_matrix
from tokens2policy.effects.learners import cross_fit_nuisances
from tokens2policy.effects.synthetic import make_synthetic_rct, write_synthetic_tables
from tokens2policy.honesty import unit_roles
from tokens2policy.lakehouse import read_table


@pytest.fixture
def synth(spark, make_cfg):
    cfg = make_cfg("source.covariate_cols=[age, region]", "source.outcome_cols=[outcome]", "effects.n_bootstrap=50", "effects.nuisance_neurons=8",
                   "effects.nuisance=hgb", "execution.mode=spark")  # the per-fold Spark tasks (auto: in memory)
    data = make_synthetic_rct(n=1500, seed=1)
    write_synthetic_tables(spark, cfg, data)
    return cfg, data


@pytest.mark.slow  # a full Spark job (~1 min on an idle 2-core machine)
def test_effects_job_tables_truth_and_parallel_folds(spark, synth):
    cfg, data = synth
    summary = effects_job.run(spark, cfg)
    exp = summary["experiments"][0]
    assert exp["nuisance_tasks"] == 15  # one Spark task (partition) per fold and per pair of folds (nested)
    assert exp["estimated_on"] == "estimation" and 0.4 * 1500 < exp["n_estimation"] < 0.6 * 1500

    eff = read_table(spark, cfg, "effects").toPandas().sort_values(["learner", "unit_id"])
    assert set(eff.learner) == {"dr_selected", "r_selected", "dr_full", "r_full"}
    assert list(eff.columns[:7]) == ["experiment_id", "unit_id", "outcome", "learner", "cate", "ci_low", "ci_high"]
    dr = eff[eff.learner == "dr_selected"].set_index("unit_id").loc[data["units"].unit_id]
    tau = data["tau"]
    assert np.corrcoef(dr.cate, tau)[0, 1] > 0.9
    assert np.mean((dr.cate - tau) ** 2) < 0.3 * np.var(tau)
    assert (dr.ci_low < dr.cate).all() and (dr.cate < dr.ci_high).all()
    assert eff[eff.learner == "dr_full"].ci_low.isna().all()

    # honesty: every unit has a row, marked with its role (the Spark role column equals the numpy twin)
    roles = unit_roles("synth", data["units"].unit_id, cfg.honesty)
    np.testing.assert_array_equal(dr["sample"].to_numpy(), roles)
    est = (roles == "estimation")
    assert dr.dr_score0_nested[~est].isna().all() and dr.dr_score0_nested[est].map(len).eq(5).all()

    # the distributed nuisances equal an in-memory sequential (nested) cross-fit on the estimation units
    pdf = data["units"].merge(data["neurons"].drop(columns="experiment_id"), on="unit_id").sort_values("unit_id")
    spec = build_feature_spec(pdf, ["age", "region"], [3, 7] + effects_job.top_neurons(pdf["indices"].tolist(), 8))
    spec.neurons = list(dict.fromkeys(spec.neurons))
    e = pdf[est]
    seq = cross_fit_nuisances(feature_matrix(e, spec), e.treatment.to_numpy(), e.outcome.to_numpy(),
                              e.fold.to_numpy(), effects_job.nuisance_params(cfg), cfg.seed, nested=True)
    np.testing.assert_allclose(dr.mu0.to_numpy()[est], seq["mu0"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dr.mu1.to_numpy()[est], seq["mu1"], rtol=1e-12, atol=1e-12)
    g0 = np.vstack(dr.dr_score0_nested[est].to_numpy())
    t, y = e.treatment.to_numpy()[:, None], e.outcome.to_numpy()[:, None]
    ref = seq["nested"]["mu0"] + (1 - t) * (y - seq["nested"]["mu0"]) / (1 - seq["nested"]["e"])
    np.testing.assert_allclose(g0, ref, rtol=1e-10, atol=1e-10)

    gates = read_table(spark, cfg, "gates").toPandas().set_index(["feature", "group"])
    assert set(gates.estimated_on) == {"estimation"} and gates.loc[("neuron_3", "active - inactive"), "n"] == est.sum()
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
    assert set(cal.metric) == {"blp", "gates", "rate", "toc_curve", "qini_curve", "coverage", "coverage_residual"}
    # every calibration row, the coverage rows included, is estimated on the estimation units only
    assert set(cal.estimated_on) == {"estimation"} and (cal[cal.metric == "blp"].n == est.sum()).all()
    assert (cal[cal.metric == "coverage"].n == est.sum()).all()
    # the selected modifiers (neurons 3 and 7: the whole of tau) cover the detectable heterogeneity
    cov = cal[cal.metric == "coverage"].set_index("group")
    assert cov.loc["share_selected", "estimate"] > 0.8 and cov.loc["warning", "estimate"] == 0.0
    assert cov.loc["detected", "estimate"] == 1.0
    assert "heterogeneity coverage" in summary["coverage"]["synth"]["outcome"]

    # the Spark job and the in-memory core (what the validation study runs) give the same tables
    mem = effects_job.effects_in_memory(cfg, data["units"], data["neurons"], data["modifiers"])["synth"]
    got = read_table(spark, cfg, "gates").toPandas().sort_values(["feature", "group"]).reset_index(drop=True)
    want = mem["gates"].sort_values(["feature", "group"]).reset_index(drop=True)
    np.testing.assert_allclose(got.estimate, want.estimate, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got.se, want.se, rtol=1e-9, atol=1e-12)
    got_eff = eff.sort_values(["learner", "unit_id"]).reset_index(drop=True)
    want_eff = mem["effects"].sort_values(["learner", "unit_id"]).reset_index(drop=True)
    np.testing.assert_allclose(got_eff.cate_oof, want_eff.cate_oof, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(got_eff["sample"], want_eff["sample"])
    # the fitted linear final stages, kept in cate_final_stages, are the in-memory core's (tests/effects/test_final_stage.py
    # checks them against an independent fit)
    finals = read_table(spark, cfg, "cate_final_stages").toPandas().sort_values("learner").reset_index(drop=True)
    want_finals = mem["final_stages"].sort_values("learner").reset_index(drop=True)
    assert list(finals.learner) == ["dr_selected", "r_selected"] and set(finals.se_type) == {"HC1"}
    assert [list(t) for t in finals.terms] == [list(t) for t in want_finals.terms]
    np.testing.assert_allclose(np.vstack(finals.coef), np.vstack(want_finals.coef), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.stack([np.vstack(c) for c in finals["cov"]]),
                               np.stack([np.vstack(c) for c in want_finals["cov"]]), rtol=1e-9, atol=1e-14)
    want_cov = mem["calibration"].query("metric == 'coverage'").set_index("group")
    assert want_cov.loc["share_selected", "estimate"] == pytest.approx(cov.loc["share_selected", "estimate"])

    run = mlflow.search_runs(filter_string="tags.`t2p.stage` = 'effects'", output_format="list")[0]
    assert run.data.metrics["synth.nuisance_tasks"] == 15
    assert "synth.outcome.dr_selected.autoc" in run.data.metrics
    assert run.data.metrics["synth.outcome.coverage_share"] == pytest.approx(cov.loc["share_selected", "estimate"])


@pytest.mark.slow  # two effects jobs
def test_effects_job_writes_the_same_tables_in_memory_and_on_spark(spark, synth):
    """The job forced to each execution on the same tables: the nuisances fitted in the driver
    (``cross_fit_local``) or one Spark task per fit give the same gates, effects and calibration — exactly: the same
    rows in the same unit_id order reach the same fits with the same seeds. The choice is in the summary and the run."""
    from tokens2policy.config import apply_overrides

    cfg, _ = synth
    tables, summaries = {}, {}
    for mode in ("spark", "memory"):
        run_cfg = apply_overrides(cfg, [f"execution.mode={mode}", "effects.nuisance=ridge"])
        summaries[mode] = effects_job.run(spark, run_cfg)
        tables[mode] = {name: read_table(spark, run_cfg, name).toPandas() for name in ("gates", "effects",
                                                                                        "calibration")}
        run = mlflow.search_runs(filter_string="tags.`t2p.stage` = 'effects'", output_format="list",
                                 order_by=["attributes.start_time DESC"])[0]
        assert run.data.params["execution.effects"] == mode and run.data.tags["t2p.execution.effects"] == mode
    assert [summaries[m]["experiments"][0]["execution"]["mode"] for m in ("spark", "memory")] == ["spark", "memory"]
    assert summaries["spark"]["experiments"][0]["nuisance_tasks"] == 15
    keys = {"gates": ["outcome", "feature", "group"], "effects": ["learner", "unit_id"],
            "calibration": ["learner", "metric", "group", "q"]}
    for name, key in keys.items():
        a = tables["spark"][name].sort_values(key, kind="stable").reset_index(drop=True)
        b = tables["memory"][name].sort_values(key, kind="stable").reset_index(drop=True)
        assert len(a) == len(b) > 0
        for col in a.columns:
            if a[col].dtype.kind == "f":
                np.testing.assert_array_equal(b[col].to_numpy(), a[col].to_numpy(), err_msg=f"{name}.{col}")
            else:
                assert a[col].astype(str).tolist() == b[col].astype(str).tolist(), f"{name}.{col}"


def test_fit_task_is_order_invariant_and_matches_local_loop(synth):
    cfg, data = synth
    pdf = data["units"].merge(data["neurons"].drop(columns="experiment_id"), on="unit_id")
    spec = build_feature_spec(pdf, ["age", "region"], [3, 7, 5])
    params = effects_job.nuisance_params(cfg)
    a = effects_job.fit_task(pdf, 2, spec, ["outcome"], params, 0)
    b = effects_job.fit_task(pdf.sample(frac=1.0, random_state=3), 2, spec, ["outcome"], params, 0)
    np.testing.assert_array_equal(a[["mu0", "mu1", "e"]].to_numpy(), b[["mu0", "mu1", "e"]].to_numpy())
    small = pdf.iloc[:400]
    full = effects_job.cross_fit_local(small, spec, ["outcome"], params, 0)
    own = full.merge(small[["unit_id", "fold"]], on="unit_id")
    own = own[own.without == own.fold]
    assert len(own) == len(small) and own.unit_id.is_unique
    assert len(full) == 5 * len(small)  # every unit: its own fold left out, then each of the 4 other folds too
    pair = effects_job.fit_task(pdf.sample(frac=1.0, random_state=5), (1, 3), spec, ["outcome"], params, 0)
    assert set(pair.without) == {1, 3} and len(pair) == int(pdf.fold.isin([1, 3]).sum())
    # a task only trains on estimation rows: marking fold-0 rows as selection changes fold 2's prediction
    sel = pdf.assign(sample=np.where(pdf.fold == 0, "selection", "estimation"))
    c = effects_job.fit_task(sel, 2, spec, ["outcome"], params, 0)
    assert not np.allclose(c.mu1.to_numpy(), a.mu1.to_numpy())


def test_top_neurons_counts_activity_and_breaks_ties_by_index():
    assert effects_job.top_neurons([[1, 2], [2, 5], [5], [2]], 2) == [2, 5]
    assert effects_job.top_neurons([[3], [1]], 5) == [1, 3]
    assert effects_job.top_neurons([[], None], 3) == []


def test_two_folds_fall_back_to_plain_cross_fitting(make_cfg):
    """Nesting needs a third fold to train on: with two stored folds the stage cross-fits plainly (and says so by
    leaving the nested scores empty) instead of failing."""
    cfg = make_cfg("source.covariate_cols=[age, region]", "source.outcome_cols=[outcome]", "effects.n_bootstrap=20",
                   "effects.nuisance_neurons=2")
    data = make_synthetic_rct(n=400, seed=3, n_folds=2)
    res = effects_job.effects_in_memory(cfg, data["units"], data["neurons"], data["modifiers"],
                                        learners=["dr_selected"])["synth"]
    eff = res["effects"]
    assert eff.dr_score0_nested.isna().all() and np.isfinite(eff.cate_oof).all()
    assert set(eff["sample"]) == {"selection", "estimation"}
