"""`t2p score` end to end on a small registered policy: real Spark, Delta, MLflow (sqlite store + registry) and
the real text model through ``mlflow.pyfunc.spark_udf``.

The model is a policy pyfunc logged and registered the way the policy stage does (inside a run tagged
``t2p.stage=policy``, under the stage's registered name for the experiment/outcome), over a small fitted SAE and
one neuron + one covariate modifier. The reference for every scored row is the in-memory
:class:`~tokens2policy.policy.serving.PolicyScorer` on the same spec (no Spark, no MLflow); the pipeline test
(test_score_pipeline.py) compares with the policy stage's own ``assignments``.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tokens2policy.config import ConfigError

EXP = "exp' OR '1'='1 \\"  # a hostile experiment id: quotes, SQL, a trailing backslash
TEXTS = ["The football club won the league after a dramatic final match.",
         "Shares fell sharply as the central bank raised interest rates.",
         "The minister announced a new election campaign in parliament.",
         "A new smartphone chip doubles battery life, engineers say.",
         "The film festival opened with a star-studded premiere.",
         "The tennis champion retired after twenty years on tour.",
         "Oil prices rose on fears of supply cuts.",
         "Voters head to the polls in a tight race."]
GOOD_IDS = ["u0", "u'1", "u\\2", 'u"3; DROP TABLE scores; --', "u4\nx", "u5", "u6", "u7"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A small policy model (neuron + covariate, threshold rule, CI), logged by the policy stage's MLflow run of a
    fresh data_dir; returns the config, the spec, and an in-memory scorer of the same chain."""
    from tokens2policy.config import load_config
    from tokens2policy.effects.design import Modifier
    from tokens2policy.embed.models import resolve_model
    from tokens2policy.policy.pyfunc import log_policy_model
    from tokens2policy.policy.serving import PolicyScorer, PolicySpec, threshold_rule
    from tokens2policy.represent.sae import SparseAutoencoder
    from tokens2policy.tracking import model_name, stage_run

    data = tmp_path_factory.mktemp("score") / "data"
    cfg = load_config(None, [f"data_dir={data}", "embed.device=cpu", "spark.driver_memory=3g"])
    embed_spec = resolve_model(cfg.embed)
    embedder = embed_spec.load()
    vectors = np.stack(embedder.encode(TEXTS).vectors)
    sae = SparseAutoencoder(n_latents=8, k=2, epochs=3, batch_size=8, seed=0, num_threads=1).fit(vectors)
    codes = sae.encode(vectors)
    active = np.asarray((codes != 0).sum(axis=0)).ravel() if hasattr(codes, "toarray") else (codes != 0).sum(0)
    neuron = int(np.argmax((active > 0) & (active < len(TEXTS))))  # a neuron that splits the texts
    mods = [Modifier(f"neuron_{neuron}", "neuron", None, neuron, None),
            Modifier("tenure_days", "covariate", "tenure_days", None, None)]
    values = {f"neuron_{neuron}": np.zeros(4), "tenure_days": np.array([1.0, 2.0, 3.0, 6.0])}
    kinds = {f"neuron_{neuron}": "sparse", "tenure_days": "continuous"}
    spec = PolicySpec.from_fitted(embed_spec, mods, values, kinds, threshold_rule(0.3), coef=[0.1, 0.6, 0.05],
                                  cov=np.diag([0.01, 0.04, 0.001]), critical_value=1.96)
    with stage_run(cfg, "policy"):
        uri = log_policy_model(spec, sae, embed_spec.source, name="policy_model",
                               registered_model_name=model_name(cfg, "policy", EXP, "engagement"), alias="champion")
    return dict(cfg=cfg, spec=spec, uri=uri, scorer=PolicyScorer(spec, embedder, sae),
                name=model_name(cfg, "policy", EXP, "engagement"))


def _input(spark, path, extra=()):
    rows = [dict(experiment_id=EXP, unit_id=u, text=t, tenure_days=float(i % 5), prior_sessions=3.0)
            for i, (u, t) in enumerate(zip(GOOD_IDS, TEXTS))]
    rows += [
        dict(experiment_id=EXP, unit_id=None, text=TEXTS[0], tenure_days=1.0, prior_sessions=1.0),  # missing id
        dict(experiment_id=EXP, unit_id="b1", text=" \t ", tenure_days=1.0, prior_sessions=1.0),  # empty text
        dict(experiment_id=EXP, unit_id="b2", text=TEXTS[1], tenure_days=None, prior_sessions=1.0),  # covariate
        dict(experiment_id=EXP, unit_id="u5", text=TEXTS[5], tenure_days=0.0, prior_sessions=3.0),  # exact copy
        *extra,
    ]
    pdf = pd.DataFrame(rows)
    spark.createDataFrame(pdf, "experiment_id string, unit_id string, text string, tenure_days double, "
                               "prior_sessions double").repartition(2).write.mode("overwrite").parquet(str(path))
    return pdf


@pytest.mark.slow  # three scoring runs, each loading the text model in a Python worker (~3 min under load)
def test_score_end_to_end_quarantine_rerun_and_errors(spark, model, tmp_path):
    from tokens2policy import api
    from tokens2policy.lakehouse import read_table, table_version

    cfg = model["cfg"]
    path = tmp_path / "new_units.parquet"
    pdf = _input(spark, path)
    summary = api.score(str(path), config=cfg, spark=spark)
    name = model["name"]
    assert summary["models"] == {f"{EXP}/engagement": f"models:/{name}/1"}  # the policy run's version, pinned
    assert (summary["rows_in"], summary["scored"], summary["quarantined"]) == (len(pdf), 8, 4)
    assert summary["reasons"] == {"missing_unit_id": 1, "empty_text": 1, "missing_covariate": 1,
                                  "duplicate_unit_id": 1}

    got = read_table(spark, cfg, "scores").toPandas().set_index("unit_id").loc[GOOD_IDS]
    ref = model["scorer"].score(pdf.iloc[:8][["text", "tenure_days"]])
    assert (got["experiment_id"] == EXP).all() and (got["outcome"] == "engagement").all()
    np.testing.assert_array_equal(got["treat"].to_numpy(), ref["recommended"].to_numpy())
    np.testing.assert_allclose(got["cate"].to_numpy(), ref["cate"].to_numpy(), rtol=0, atol=1e-9)
    np.testing.assert_allclose(got[["ci_low", "ci_high"]].to_numpy(), ref[["ci_low", "ci_high"]].to_numpy(),
                               rtol=0, atol=1e-9)
    assert (got["ci_low"] < got["cate"]).all() and (got["cate"] < got["ci_high"]).all()
    assert list(got["rule"]) == list(ref["rule"]) and 0 < got["treat"].sum() < 8  # both actions occur
    assert (got["model_name"] == name).all() and (got["model_version"] == "1").all()
    assert got["input_fingerprint"].str.fullmatch(r"[0-9a-f]{64}").all() and got["input_fingerprint"].is_unique
    assert got["scored_at"].notna().all()

    q = read_table(spark, cfg, "score_quarantine").toPandas()
    assert sorted(q["reason"]) == sorted(summary["reasons"])
    assert set(q.loc[q.reason == "missing_covariate", "unit_id"]) == {"b2"}
    assert q["raw_json"].str.contains('"b1"').any()  # the original row is kept

    # rerun on the same input: no new rows, no commit to either table
    versions = (table_version(spark, cfg, "scores"), table_version(spark, cfg, "score_quarantine"))
    again = api.score(str(path), config=cfg, spark=spark)
    assert (again["inserted"], again["updated"]) == (0, 0)
    assert (table_version(spark, cfg, "scores"), table_version(spark, cfg, "score_quarantine")) == versions
    assert read_table(spark, cfg, "scores").count() == 8 and read_table(spark, cfg, "score_quarantine").count() == 4

    # one-line errors: a missing model, a missing input, no input
    for kwargs, pattern in [(dict(model_uri=f"models:/{name}/99"), "cannot load the policy model"),
                            (dict(input=str(tmp_path / "nowhere.parquet")), "cannot read source"),
                            (dict(input=" "), "nothing to score")]:
        with pytest.raises(ConfigError, match=pattern) as err:
            api.score(**{"input": str(path), **kwargs}, config=cfg, spark=spark)
        assert "\n" not in str(err.value)
    assert table_version(spark, cfg, "scores") == versions[0]


def test_cli_score_with_explicit_model_and_alias(spark, model, tmp_path, capsys):
    from tokens2policy.cli import main
    from tokens2policy.lakehouse import read_table

    cfg = model["cfg"]
    path = tmp_path / "units.json"
    pdf = pd.DataFrame({"unit_id": ["a", "b"], "text": TEXTS[:2], "tenure_days": [1.0, 4.0],
                        "prior_sessions": [0.0, 1.0]})
    spark.createDataFrame(pdf).coalesce(1).write.mode("overwrite").json(str(path))
    other = cfg.model_copy(update={"data_dir": str(tmp_path / "data2"),
                                   "tracking": cfg.tracking.model_copy(update={"tracking_uri": None})})
    # another lakehouse, the first one's MLflow registry: the model by alias, the experiment id from the flag
    tracking = f"sqlite:///{cfg.data_path / 'mlflow' / 'mlflow.db'}"
    rc = main(["score", "--input", str(path), "--model-uri", f"models:/{model['name']}@champion",
               "--experiment-id", "e2", "--set", f"data_dir={other.data_dir}", "--set",
               f"tracking.tracking_uri={tracking}", "--set", "spark.driver_memory=3g"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "scored 2 of 2 row(s)" in out.out
    got = read_table(spark, other, "scores").toPandas().set_index("unit_id").loc[["a", "b"]]
    ref = model["scorer"].score(pdf[["text", "tenure_days"]])
    np.testing.assert_array_equal(got["treat"].to_numpy(), ref["recommended"].to_numpy())
    assert (got["experiment_id"] == "e2").all() and (got["model_uri"] == f"models:/{model['name']}/1").all()

    # no policy run in this store: one line naming what to do
    rc = main(["score", "--input", str(path), "--experiment-id", "e2", "--set",
               f"data_dir={tmp_path / 'data3'}", "--set", "spark.driver_memory=3g"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("t2p: error")]
    assert rc == 2 and len(errors) == 1 and "no successful policy stage run" in errors[0]


def test_policy_without_modifiers_scores_every_row():
    """NEXIS may select no modifier: the served policy is then intercept-only and must still score each row (it
    raised a shape error in PolicyScorer before — found by the pipeline test on 400 demo units)."""
    from tokens2policy.embed.models import resolve_model
    from tokens2policy.config import load_config
    from tokens2policy.policy.serving import PolicyScorer, PolicySpec, threshold_rule

    embed_spec = resolve_model(load_config(None).embed)
    spec = PolicySpec.from_fitted(embed_spec, [], {}, {}, threshold_rule(0.1), coef=[0.25])
    spec.cov, spec.critical_value = [[0.01]], 2.0
    out = PolicyScorer(spec, None, None).score(pd.DataFrame({"text": ["a", "b", "c"]}))
    assert list(out["recommended"]) == [1, 1, 1] and np.allclose(out["cate"], 0.25)
    assert np.allclose(out["ci_low"], 0.05) and np.allclose(out["ci_high"], 0.45)
    assert list(out["embed_status"]) == ["not_needed"] * 3
