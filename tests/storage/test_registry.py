"""A registry Unity Catalog accepts: configurable (three-part in catalog mode) names per experiment/outcome,
signatures and input examples, the champion alias, the represent version pinned in the neurons' commit, requirements
on the built wheel, the tracking server's artifact location, and no secrets in the logged config.

Before: one shared one-level name, no signature on the represent model, ``models:/.../latest``, an unpinned
``tokens2policy`` requirement, a forced local ``file://`` artifact location, and the raw config (spark.conf keys,
credentials in URIs) logged."""
from __future__ import annotations

import json
import os

import mlflow
import numpy as np
import pytest
from pyspark.sql import Row

from tokens2policy.config import ConfigError, load_config
from tokens2policy.lakehouse import write_table
from tokens2policy.tracking import artifact_root, configure_mlflow, model_name, package_requirement, stage_run


def test_model_names_per_experiment_and_three_part_in_catalog_mode(tmp_path):
    path = load_config(None, [f"data_dir={tmp_path}"])
    assert model_name(path, "represent") == "tokens2policy-represent"
    assert model_name(path, "policy", "exp_1", "clicks") == "tokens2policy-policy-exp_1-clicks"
    hostile = {model_name(path, "policy", e, "y") for e in ("o'brien", "o_brien", "x\\' OR 1=1 --", "a b")}
    assert len(hostile) == 4 and all(set(n) <= set("abcdefghijklmnopqrstuvwxyz0123456789_-ABCDEFGHIJKLMNOPQRSTUVWXYZ")
                                     for n in hostile)
    uc = load_config(None, [f"data_dir={tmp_path}", "lakehouse.mode=catalog", "lakehouse.catalog=main",
                            "lakehouse.schema=t2p"])
    assert model_name(uc, "represent") == "main.t2p.represent"
    assert model_name(uc, "policy", "BBC-News", "engagement") == "main.t2p.policy_bbc_news_" + \
        model_name(uc, "policy", "BBC-News", "engagement").split("policy_bbc_news_")[1]
    assert model_name(uc, "policy", "bbc", "engagement") == "main.t2p.policy_bbc_engagement"
    custom = load_config(None, [f"data_dir={tmp_path}", "tracking.policy_model_name=ml.models.{experiment}_{outcome}"])
    assert model_name(custom, "policy", "e", "y") == "ml.models.e_y"


def _fitted_sae(dim=8):
    from tokens2policy.represent.sae import SparseAutoencoder

    x = np.random.default_rng(0).normal(size=(64, dim)).astype(np.float32)
    return SparseAutoencoder(n_latents=16, k=4, epochs=1, batch_size=32, seed=0, aux_k=0).fit(x), x


def test_represent_model_has_signature_example_alias_and_is_pinned_in_neurons(spark, tmp_path):
    from tokens2policy.represent.job import _log_model, represent_model_uri

    cfg = load_config(None, [f"data_dir={tmp_path / 'data'}", "lakehouse.mode=path"])
    configure_mlflow(cfg)
    sae, x = _fitted_sae()
    with mlflow.start_run():
        info, uri = _log_model(cfg, sae, x.shape[1], register=True)
        # what represent does: the neurons' commit records the exact model version
        write_table(spark.createDataFrame([Row(experiment_id="e", unit_id="1")]), cfg, "neurons",
                    user_metadata=json.dumps({"represent_model_uri": uri}))
    assert uri == "models:/tokens2policy-represent/1"
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias("tokens2policy-represent", "champion").version) == "1"
    assert represent_model_uri(spark, cfg, 0) == uri
    model = mlflow.models.Model.load(uri)
    assert model.signature is not None
    assert model.signature.inputs.input_names() == ["vector"]
    assert model.signature.outputs.input_names() == ["indices", "values"]
    assert model.saved_input_example_info is not None
    loaded = mlflow.pyfunc.load_model(uri)
    out = loaded.predict(__import__("pandas").DataFrame({"vector": [x[0].tolist(), x[1].tolist()]}))
    np.testing.assert_allclose(out["values"][0], sae.encode(x[:1]).data, rtol=1e-6)
    # a second version moves the alias
    with mlflow.start_run():
        _, uri2 = _log_model(cfg, sae, x.shape[1], register=True)
    assert uri2.endswith("/2")
    assert str(client.get_model_version_by_alias("tokens2policy-represent", "champion").version) == "2"
    assert represent_model_uri(spark, cfg, 0) == uri  # the neurons still name the version that wrote them


def test_requirements_point_at_the_built_wheel(tmp_path):
    wheel = tmp_path / "tokens2policy-9.9.9-py3-none-any.whl"
    wheel.write_bytes(b"PK")
    cfg = load_config(None, [f"data_dir={tmp_path}", f"tracking.package_wheel={wheel}"])
    assert package_requirement(cfg) == (f"artifacts/{wheel.name}", {"package_wheel": str(wheel)})
    from tokens2policy import __version__

    none = load_config(None, [f"data_dir={tmp_path}", f"tracking.package_wheel=null"])
    line, extra = package_requirement(none)
    assert line in (f"tokens2policy=={__version__}",) or line.startswith("artifacts/tokens2policy-")
    with pytest.raises(ConfigError, match="make dist"):
        package_requirement(load_config(None, [f"data_dir={tmp_path}", f"tracking.package_wheel={tmp_path}/no.whl"]))


def test_artifact_location_is_left_to_the_tracking_server(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = load_config(None, [f"data_dir={tmp_path / 'data'}"])
    assert artifact_root(local) == (tmp_path / "data" / "mlflow" / "artifacts").as_uri()  # the embedded store
    server = load_config(None, [f"data_dir={tmp_path / 'data'}", f"tracking.tracking_uri=sqlite:///{tmp_path}/s.db",
                                "tracking.experiment_name=served"])
    assert artifact_root(server) is None
    exp_id = configure_mlflow(server)
    location = mlflow.get_experiment(exp_id).artifact_location
    assert "data/mlflow/artifacts" not in location  # the store's own default, not forced under data_dir
    chosen = load_config(None, [f"data_dir={tmp_path / 'data'}", f"tracking.tracking_uri=sqlite:///{tmp_path}/s.db",
                                "tracking.experiment_name=chosen", "tracking.artifact_root=s3://bucket/mlflow"])
    assert mlflow.get_experiment(configure_mlflow(chosen)).artifact_location == "s3://bucket/mlflow"


def test_logged_config_has_no_secrets(tmp_path):
    cfg = load_config(None, [
        f"data_dir={tmp_path / 'data'}",
        "spark.conf={spark.hadoop.fs.s3a.secret.key: S3CRET, spark.hadoop.fs.s3a.access.key: AKIA123, "
        "spark.hadoop.fs.azure.account.key.acct.dfs.core.windows.net: AZK3Y, spark.executor.memory: 2g}",
        "source.kind=parquet", "source.path=abfss://c@acct.dfs.core.windows.net/logs?sv=2024&sig=SIGNATURE",
        "lakehouse.root=s3a://user:PASSWORD@bucket/lake"])
    with stage_run(cfg, "ingest") as run:
        pass
    client = mlflow.MlflowClient()
    path = client.download_artifacts(run.info.run_id, "config.json", str(tmp_path))
    text = open(path).read()
    params = json.dumps(client.get_run(run.info.run_id).data.params)
    for secret in ("S3CRET", "AKIA123", "AZK3Y", "SIGNATURE", "PASSWORD"):
        assert secret not in text and secret not in params, secret
    logged = json.loads(text)
    assert logged["spark"]["conf"]["spark.executor.memory"] == "2g"
    assert logged["lakehouse"]["root"] == "s3a://***@bucket/lake"
