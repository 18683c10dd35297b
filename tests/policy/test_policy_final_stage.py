"""The policy stage serves the effects stage's stored final stage (table ``cate_final_stages``), never a refit.

On a known-truth synthetic RCT run through the stages' own in-memory cores (``effects_in_memory``,
``policy_in_memory``): the serving chain built the way the stage builds it (``stage_policy_spec`` from the stored
row), scoring the training units' sparse codes, gives exactly the CATE and CI of the ``effects`` table and the
``assignments`` of the recommended rule. And a policy run whose (experiment, outcome, learner) has no stored final
stage stops before any work with one line saying so.
"""
import numpy as np
import pandas as pd
import pytest

from tokens2policy.effects.final_stage import find_final_stage
from tokens2policy.effects.job import effects_in_memory
from tokens2policy.effects.synthetic import make_synthetic_rct, write_synthetic_tables
from tokens2policy.policy import job as policy_job
from tokens2policy.policy.serving import PolicyScorer

SETTINGS = ("source.covariate_cols=[age, region]", "source.outcome_cols=[outcome]", "effects.n_bootstrap=20",
            "effects.nuisance_neurons=4")


@pytest.mark.parametrize("recommended", ["tree", "budget"])
def test_served_cate_and_ci_equal_the_effects_table(make_cfg, recommended):
    from tokens2policy.embed.models import resolve_model

    cfg = make_cfg(*SETTINGS, f"policy.recommended={recommended}", "policy.budget=0.3", "effects.se=cluster")
    data = make_synthetic_rct(n=800, seed=6)
    eff = effects_in_memory(cfg, data["units"], data["neurons"], data["modifiers"],
                            learners=["dr_selected"])["synth"]
    res = policy_job.policy_in_memory(cfg, data["units"], data["neurons"], data["modifiers"],
                                      eff["effects"])["synth"]["outcome"]
    final = find_final_stage(eff["final_stages"], "synth", "outcome", "dr_selected")
    spec = policy_job.stage_policy_spec(cfg, "synth", "outcome", res["sub"], res["mods"], res["values"],
                                        res["kinds"], res["tree"], res["budget_fit"], final, resolve_model(cfg.embed))
    assert spec.coef == final.coef and spec.cov == final.cov and spec.critical_value == final.critical_value
    assert spec.metadata["estimated_on"] == "estimation" and spec.metadata["n_estimation"] == final.n

    sub = res["sub"]  # every unit of the experiment (selection and estimation), unit_id order
    scorer = PolicyScorer(spec, embedder=None, sae=None)  # from the sparse codes on: no text model needed
    out = scorer.score_codes(sub["indices"].tolist(), sub["values"].tolist(), sub[["unit_id", "age", "region"]])
    table = eff["effects"].set_index("unit_id").loc[sub["unit_id"]]
    np.testing.assert_allclose(out["cate"], table["cate"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(out["ci_low"], table["ci_low"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(out["ci_high"], table["ci_high"], rtol=0, atol=1e-12)
    assert (out["ci_low"] < out["cate"]).all() and (out["cate"] < out["ci_high"]).all()
    asg = res["assignments"]
    asg = asg[asg.policy == recommended].set_index("unit_id").loc[sub["unit_id"]]
    np.testing.assert_array_equal(out["recommended"].to_numpy(), asg["treat"].to_numpy())
    assert list(out["rule"]) == list(asg["rule"])


def _write(spark, cfg, name, frame: pd.DataFrame):
    from tokens2policy.lakehouse import write_table
    from tokens2policy.lakehouse.schemas import table_spec

    schema = table_spec(name).schema()
    cols = [f.name for f in schema.fields]
    rows = frame[cols].astype(object).where(frame[cols].notna(), None).values.tolist()
    write_table(spark.createDataFrame(rows, schema), cfg, name, mode="overwrite")


@pytest.mark.slow  # two policy runs on Spark + Delta + MLflow (~90 s under load; the message: test_final_stage.py)
def test_policy_run_without_its_final_stage_fails_in_one_line(spark, make_cfg):
    cfg = make_cfg(*SETTINGS)
    data = make_synthetic_rct(n=300, seed=7)
    eff = effects_in_memory(cfg, data["units"], data["neurons"], data["modifiers"],
                            learners=["dr_selected", "r_selected"])["synth"]
    write_synthetic_tables(spark, cfg, data)
    _write(spark, cfg, "effects", eff["effects"])
    want = "no fitted final stage for experiment 'synth', outcome 'outcome', learner 'dr_selected'"
    # no cate_final_stages table at all (an effects table written before the stage kept its final stages)
    with pytest.raises(ValueError, match=want) as info:
        policy_job.run(spark, cfg)
    assert "\n" not in str(info.value)
    # the table exists, but holds only another learner's final stage
    finals = eff["final_stages"]
    _write(spark, cfg, "cate_final_stages", finals[finals.learner == "r_selected"])
    with pytest.raises(ValueError, match=want) as info:
        policy_job.run(spark, cfg)
    assert "\n" not in str(info.value)
