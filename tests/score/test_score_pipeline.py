"""Scoring against the policy stage's own output: a small demo pipeline (ingest → … → policy, registering the
policy model as the stage does) with some demo units held back from ingest; then ``t2p score`` on the held-back
units and on units the policy stage assigned.

Checked against the tables the policy stage wrote, never against a re-implementation of its rule: for assigned
units the recommendation equals ``assignments.treat`` of the recommended policy (and the CATE its ``cate``); for
held-back units the fired rule is one of the ``policy_rules`` of that policy, and the recommendation is that
rule's action.
"""
from __future__ import annotations

import numpy as np
import pytest

STAGES = ["ingest", "embed", "represent", "identify", "effects", "policy"]
SMALL = ["demo.n_units=400", "represent.epochs=2", "effects.n_bootstrap=20", "spark.driver_memory=3g",
         "report.log_to_mlflow=false", "ingest.expected_treated_share=0.5"]
N_HELD = 25


@pytest.mark.slow  # a six-stage pipeline on 400 demo units, then one scoring run (several minutes under load)
def test_scores_equal_the_policy_stages_assignments_and_rules(spark, tmp_path):
    from pyspark.sql import functions as F

    from tokens2policy import api
    from tokens2policy.config import load_config
    from tokens2policy.ingest.demo import ensure_demo
    from tokens2policy.lakehouse import read_table

    data = tmp_path / "data"
    demo_cfg = load_config(None, [f"data_dir={data}", *SMALL])
    logs = ensure_demo(spark, demo_cfg)
    once = logs.groupBy("unit_id").count().where("count = 1").select("unit_id")
    ok = (logs.join(once, "unit_id").where(F.length(F.trim("text")) > 20)
          .where(F.col("tenure_days").isNotNull() & F.col("prior_sessions").isNotNull()))
    held = [r.unit_id for r in ok.select("unit_id").orderBy(F.sha2("unit_id", 256)).limit(N_HELD).collect()]
    train_path, score_path = str(tmp_path / "logs.parquet"), str(tmp_path / "new_units.parquet")
    logs.where(~F.col("unit_id").isin(held)).write.parquet(train_path)
    cfg = load_config(None, [f"data_dir={data}", *SMALL, "source.kind=parquet", f"source.path={train_path}",
                             "source.assigned_at_col=assigned_at", "source.measured_at_col=measured_at"])
    api.run(STAGES, config=cfg, spark=spark)

    p = cfg.policy
    assigned = read_table(spark, cfg, "assignments").where(F.col("recommended"))
    some_assigned = [r.unit_id for r in assigned.join(ok.select("unit_id"), "unit_id").select("unit_id")
                     .orderBy(F.sha2("unit_id", 256)).limit(40).collect()]
    pre = ["experiment_id", "unit_id", "text", "tenure_days", "prior_sessions"]  # no treatment, no outcome
    logs.where(F.col("unit_id").isin(held + some_assigned)).select(*pre).write.parquet(score_path)

    summary = api.score(score_path, config=cfg, spark=spark)
    assert summary["rows_in"] == summary["scored"] == len(held) + len(some_assigned)
    scores = read_table(spark, cfg, "scores").toPandas().set_index("unit_id")
    assert scores["model_version"].notna().all() and scores["model_uri"].str.startswith("models:/").all()

    ref = assigned.where(F.col("unit_id").isin(some_assigned)).toPandas().set_index("unit_id")
    got = scores.loc[ref.index]
    assert (ref["policy"] == p.recommended).all()
    np.testing.assert_array_equal(got["treat"].to_numpy(), ref["treat"].to_numpy())
    np.testing.assert_allclose(got["cate"].to_numpy(), ref["cate"].to_numpy(), rtol=0, atol=1e-6)
    assert list(got["rule"]) == list(ref["rule"])

    rules = read_table(spark, cfg, "policy_rules").where(F.col("policy") == p.recommended).toPandas()
    new = scores.loc[held]
    assert set(new["rule"]) <= set(rules["rule"]) | set(ref["rule"])
    if p.recommended == "tree":
        action = dict(zip(rules["leaf_id"], rules["treat"]))
        np.testing.assert_array_equal(new["treat"].to_numpy(), new["leaf_id"].map(action).to_numpy())
    assert ((new["ci_low"] <= new["cate"]) & (new["cate"] <= new["ci_high"])).all()
