"""The represent stage end to end on small planted tables: neurons round trip through Delta and the MLflow
registry, neuron statistics against numpy, labels against the planted topics, redaction of stored text."""
import numpy as np
import pandas as pd
import pytest

from tokens2policy.represent.sae import rows_to_csr

from ._lakehouse import TOPICS, planted_tables as _tables

# several Spark jobs, Delta commits and an MLflow registry round trip: well over 20 s on 2 cores
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stage(spark, tmp_path_factory):
    from tokens2policy.config import load_config
    from tokens2policy.represent import job

    data = tmp_path_factory.mktemp("represent_job")
    cfg = load_config(None, [f"data_dir={data}", "represent.n_latents=16", "represent.k=2", "represent.epochs=15",
                             "represent.batch_size=32", "represent.lr=0.004", "represent.num_threads=1",
                             "represent.label_top_docs=20", "represent.n_examples=3"])
    x, ids, topic = _tables(spark, cfg)
    summary = job.run(spark, cfg)
    return spark, cfg, summary, x, ids, topic


def test_neurons_round_trip_through_delta_and_the_registered_model(stage):
    import mlflow

    from tokens2policy.lakehouse import read_table
    from tokens2policy.tracking import configure_mlflow

    spark, cfg, summary, x, ids, _ = stage
    pdf = read_table(spark, cfg, "neurons").orderBy("unit_id").toPandas()
    assert pdf["unit_id"].tolist() == ids
    table_codes = rows_to_csr(pdf["indices"].tolist(), pdf["values"].tolist(), summary["n_latents"]).toarray()
    configure_mlflow(cfg)
    assert summary["registered_version"] == 1
    model = mlflow.pyfunc.load_model(f"models:/tokens2policy-represent/{summary['registered_version']}")
    pred = model.predict(pd.DataFrame({"vector": [r.tolist() for r in x]}))
    mem_codes = rows_to_csr(pred["indices"].tolist(), pred["values"].tolist(), summary["n_latents"]).toarray()
    np.testing.assert_allclose(table_codes, mem_codes, rtol=1e-6, atol=1e-6)
    assert (np.count_nonzero(table_codes, axis=1) <= 2).all()
    # the logged quality metrics are those of the registered model on these vectors
    rep = model.unwrap_python_model().rep
    m = rep.metrics(x)
    assert summary["normalized_mse"] == pytest.approx(m["normalized_mse"], rel=1e-4)
    assert summary["fraction_variance_explained"] == pytest.approx(m["fraction_variance_explained"], rel=1e-4)
    assert summary["mean_l0"] == pytest.approx(m["mean_l0"])
    assert summary["fraction_variance_explained"] > 0.9


def test_neuron_stats_match_numpy(stage):
    from tokens2policy.lakehouse import read_table

    spark, cfg, summary, *_ = stage
    neurons = read_table(spark, cfg, "neurons").toPandas()
    z = rows_to_csr(neurons["indices"].tolist(), neurons["values"].tolist(), summary["n_latents"]).toarray()
    st = read_table(spark, cfg, "neuron_stats").orderBy("neuron").toPandas()
    assert st["neuron"].tolist() == list(range(summary["n_latents"]))
    np.testing.assert_allclose(st["activation_frequency"], (z > 0).mean(0), atol=1e-12)
    np.testing.assert_allclose(st["mean_activation"], z.mean(0), rtol=1e-5, atol=1e-7)
    assert summary["dead_fraction"] == pytest.approx(np.mean(~(z > 0).any(0)))


def test_labels_name_the_planted_topics_and_store_no_personal_data(stage):
    from tokens2policy.lakehouse import read_table

    spark, cfg, summary, *_ = stage
    labels = read_table(spark, cfg, "neuron_labels").toPandas()
    assert len(labels) == summary["n_latents"]
    for topic, words in TOPICS.items():
        assert any(len(set(t) & set(words)) >= 3 for t in labels["top_terms"]), topic
    assert any(len(set(t) & set(TOPICS["sport"])) >= 2 for t in labels["top_tokens"])
    stored = labels.to_json()
    assert "Jane" not in stored and "example.org" not in stored
    assert any(len(d) == 3 for d in labels["top_docs"]) and any(len(d) == 3 for d in labels["bottom_docs"])


@pytest.mark.parametrize("backend", ["torch", "horovod"])
def test_distributed_fit_reads_staged_shards(spark, tmp_path, backend):
    """The stage's distributed path: stage the training view in Delta, 2 ranks (DDP or Horovod) read their own
    shards."""
    from tokens2policy.config import load_config
    from tokens2policy.lakehouse import read_table
    from tokens2policy.represent import job
    from tokens2policy.represent.distributed import horovod_available

    from ._synthetic import planted_sparse

    if backend == "horovod" and not horovod_available()[0]:
        pytest.skip(horovod_available()[1])
    x, _, _ = planted_sparse(n=1200, d=12, n_atoms=10, active=2, seed=2)
    cfg = load_config(None, [f"data_dir={tmp_path / 'data'}", f"represent.backend={backend}", "represent.num_processes=2",
                             "represent.n_latents=24", "represent.k=2", "represent.epochs=15",
                             "represent.batch_size=64", "represent.lr=0.004"])
    train_df = spark.createDataFrame(pd.DataFrame({"vector": [r.tolist() for r in x]}))
    rep = job._fit(spark, cfg, train_df)
    assert rep.training_info_ == {"backend": backend, "world": 2, "use_gpu": False}
    staged = read_table(spark, cfg, "represent_training")
    assert staged.count() == len(x) and len(staged.inputFiles()) == 4
    assert rep.metrics(x)["fraction_variance_explained"] > 0.8


def test_stage_tokens_maxpool_pools_sampled_units_and_keeps_the_rest(spark, tmp_path):
    """encode=tokens_maxpool through the stage: sampled units get the max of their token codes, the others keep their
    document code (pooled_tokens = 0), and the logged counts say how many of each."""
    from tokens2policy.config import load_config
    from tokens2policy.lakehouse import read_table
    from tokens2policy.represent import job
    from tokens2policy.represent.baselines import load_representation

    cfg = load_config(None, [f"data_dir={tmp_path / 'data'}", "represent.encode=tokens_maxpool", "represent.n_latents=16",
                             "represent.k=2", "represent.epochs=3", "represent.batch_size=32", "represent.num_threads=1",
                             "represent.register_model=false", "represent.label_max_tokens=0"])
    x, ids, _ = _tables(spark, cfg, n=80)
    summary = job.run(spark, cfg)
    pdf = read_table(spark, cfg, "neurons").orderBy("unit_id").toPandas()
    tok = read_table(spark, cfg, "token_states").toPandas()
    assert pdf["unit_id"].tolist() == ids
    import mlflow

    from tokens2policy.tracking import configure_mlflow

    configure_mlflow(cfg)
    rep = mlflow.pyfunc.load_model(summary["model_uri"]).unwrap_python_model().rep
    got = rows_to_csr(pdf["indices"].tolist(), pdf["values"].tolist(), summary["n_latents"]).toarray()
    doc = rep.encode(x).toarray()
    for row, uid in enumerate(ids):
        mine = tok[tok["unit_id"] == uid]
        if len(mine):
            want = rep.encode(np.stack(mine["vector"].map(np.asarray).to_numpy())).toarray().max(axis=0)
        else:
            want = doc[row]
        np.testing.assert_allclose(got[row], want, rtol=1e-5, atol=1e-6)
        assert pdf["pooled_tokens"][row] == len(mine)
    n_sampled = tok["unit_id"].nunique()
    assert 0 < n_sampled < len(ids)
    assert summary["encode"] == "tokens_maxpool" and summary["units_document_code"] == len(ids) - n_sampled
