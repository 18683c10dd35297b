"""The represent stage's two executions (tokens2policy.execution, scope ``represent``) on the same small lakehouse:
in memory (keys and vectors collected once; encoding, quality metrics, neuron statistics and the labelling sample on
the driver) and on Spark (a Spark job for each) write the same ``neurons``, ``neuron_stats`` and ``neuron_labels``
and log the same MLflow metrics; the choice is recorded in the run."""
import numpy as np
import pandas as pd
import pytest

from ._lakehouse import planted_tables

# two stage runs per case (Spark jobs, Delta commits, MLflow runs): well over 20 s on 2 cores
pytestmark = pytest.mark.slow

CASES = {
    # 240 units, a labelling sample of about 150 of them (the hash sample key on both paths), top tokens labelled
    "document": ["represent.label_max_docs=150"],
    # codes max-pooled over the sampled units' token states (the pooled codes are read back on either path)
    "tokens_maxpool": ["represent.encode=tokens_maxpool"],
}


def _snapshot(spark, cfg):
    from tokens2policy.lakehouse import read_table

    def table(name, keys):
        return read_table(spark, cfg, name).toPandas().sort_values(keys).reset_index(drop=True)

    return {"neurons": table("neurons", ["experiment_id", "unit_id"]),
            "neuron_stats": table("neuron_stats", ["neuron"]),
            "neuron_labels": table("neuron_labels", ["neuron"]),
            "schemas": {n: read_table(spark, cfg, n).schema for n in ("neurons", "neuron_stats", "neuron_labels")}}


def _run_data(cfg, summary):
    """(metrics, per-step training metric, params) of the stage's MLflow run (the newest in the experiment)."""
    import mlflow

    from tokens2policy.tracking import configure_mlflow

    exp = configure_mlflow(cfg)
    client = mlflow.tracking.MlflowClient()
    run = client.search_runs([exp], order_by=["attributes.start_time DESC"], max_results=1)[0]
    history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train_mse_normalized_space")]
    return run.data.metrics, sorted(history), run.data.params


@pytest.mark.parametrize("case", sorted(CASES))
def test_memory_and_spark_paths_write_the_same_tables_and_metrics(spark, tmp_path, case):
    from tokens2policy.config import load_config
    from tokens2policy.represent import job

    base = [f"data_dir={tmp_path / 'data'}", "represent.n_latents=16", "represent.k=2", "represent.epochs=4",
            "represent.batch_size=32", "represent.lr=0.004", "represent.num_threads=1",
            "represent.register_model=false", "represent.label_top_docs=20", "represent.n_examples=3",
            *CASES[case]]
    planted_tables(spark, load_config(None, base))
    out = {}
    for mode in ("memory", "spark"):
        cfg = load_config(None, base + [f"execution.mode={mode}"])
        summary = job.run(spark, cfg)
        assert summary["execution"]["mode"] == mode and summary["execution"]["scope"] == "represent"
        metrics, history, params = _run_data(cfg, summary)
        assert params["execution.represent"] == mode and params["execution.represent.reason"].startswith(
            "execution.mode=" + mode)
        out[mode] = (summary, _snapshot(spark, cfg), metrics, history)
    (s_mem, t_mem, m_mem, h_mem), (s_sp, t_sp, m_sp, h_sp) = out["memory"], out["spark"]

    # the same trained model: the same training sequence on both paths
    assert h_mem == h_sp and len(h_mem) == 4
    assert t_mem["schemas"] == t_sp["schemas"]
    a, b = t_mem["neurons"], t_sp["neurons"]
    assert a[["experiment_id", "unit_id", "pooled_tokens"]].equals(b[["experiment_id", "unit_id", "pooled_tokens"]])
    assert [list(i) for i in a["indices"]] == [list(i) for i in b["indices"]]
    np.testing.assert_allclose(np.concatenate(a["values"].tolist()), np.concatenate(b["values"].tolist()),
                               rtol=1e-6, atol=1e-6)
    if case == "tokens_maxpool":
        assert (a["pooled_tokens"] > 0).any() and (a["pooled_tokens"] == 0).any()

    sa, sb = t_mem["neuron_stats"], t_sp["neuron_stats"]
    assert sa[["neuron", "n_active"]].equals(sb[["neuron", "n_active"]])
    for col in ("activation_frequency", "mean_activation", "mean_activation_when_active"):
        np.testing.assert_allclose(sa[col], sb[col], rtol=1e-9, atol=1e-12)

    la, lb = t_mem["neuron_labels"], t_sp["neuron_labels"]
    for col in ("neuron", "label", "top_terms", "top_tokens", "n_active_sample"):
        assert la[col].map(lambda v: list(v) if isinstance(v, np.ndarray) else v).tolist() == \
               lb[col].map(lambda v: list(v) if isinstance(v, np.ndarray) else v).tolist(), col
    for col in ("top_docs", "bottom_docs"):
        for da, db in zip(la[col], lb[col]):
            assert [(d["unit_id"], d["snippet"]) for d in da] == [(d["unit_id"], d["snippet"]) for d in db]
            np.testing.assert_allclose([d["activation"] for d in da], [d["activation"] for d in db], rtol=1e-6)
    np.testing.assert_allclose(np.concatenate([np.asarray(z, float) for z in la["top_term_z"]]),
                               np.concatenate([np.asarray(z, float) for z in lb["top_term_z"]]), rtol=1e-9)
    if case == "document":  # the labelling sample is a strict subset, the same on both paths
        assert 0 < la["n_active_sample"].sum() < 2 * 240
        assert lb["top_tokens"].map(len).sum() > 0

    assert set(m_mem) == set(m_sp)
    for key in (k for k in m_mem if not k.startswith("seconds.")):  # seconds.*: the phases' wall times
        assert m_mem[key] == pytest.approx(m_sp[key], rel=1e-9, abs=1e-12), key
    for key in ("n_units", "n_latents", "mean_l0", "dead_fraction", "units_document_code"):
        assert s_mem[key] == s_sp[key], key


def test_auto_chooses_by_size_and_distributed_backends_stay_on_spark():
    """``auto`` runs in memory within the execution bounds, on Spark above them; a distributed training backend is
    the Spark path whatever the size, and the reason says why."""
    from tokens2policy.config import load_config
    from tokens2policy.represent.job import execution_choice

    cfg = load_config(None, [])
    small = execution_choice(cfg, 20_000, 384)
    assert small.mode == "memory" and small.scope == "represent" and small.entries == 20_000 * 384
    big = execution_choice(load_config(None, ["execution.max_entries=1000000"]), 20_000, 384)
    assert big.mode == "spark" and "execution.max_entries" in big.reason
    dist = execution_choice(load_config(None, ["represent.backend=torch"]), 20_000, 384)
    assert dist.mode == "spark" and "represent.backend=torch" in dist.reason
    forced = execution_choice(load_config(None, ["execution.stages={represent: spark}"]), 10, 4)
    assert forced.mode == "spark" and "execution.stages.represent" in forced.reason
