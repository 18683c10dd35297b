"""Distributed training: per-rank shards of a Delta table, DDP (TorchDistributor, gloo) vs one process."""
import numpy as np
import pandas as pd
import pytest
from pyspark.sql import functions as F

from tokens2policy.represent.distributed import (BackendUnavailableError, ParquetShards, delta_source,
                                                 horovod_available, train_distributed)
from tokens2policy.represent.sae import SAEParams

from ._synthetic import planted_sparse


@pytest.fixture(scope="module")
def delta_vectors(spark, tmp_path_factory):
    """A 3-file Delta table of planted-sparse vectors; column 0 of the vector is not used as an id (ids are separate)."""
    x, _, _ = planted_sparse(n=3000, d=16, n_atoms=24, active=2, seed=5)
    path = str(tmp_path_factory.mktemp("represent_delta") / "vectors")
    pdf = pd.DataFrame({"unit_id": np.arange(len(x)), "vector": [r.tolist() for r in x]})
    spark.createDataFrame(pdf).repartition(3).write.format("delta").save(path)
    return path, x


def test_shards_partition_the_table_without_driver_collect(spark, delta_vectors):
    path, x = delta_vectors
    src = delta_source(spark, path)
    assert len(src.files) == 3 and all(f.endswith(".parquet") for f in src.files)
    shards = [src.read_shard(r, 3) for r in range(3)]
    sizes = [len(s) for s in shards]
    assert sum(sizes) == len(x) and max(sizes) - min(sizes) <= 1
    got = np.concatenate(shards)
    # the shards together are exactly the table's rows (as a multiset): compare row-sorted matrices
    key = lambda m: m[np.lexsort(m.T[::-1])]
    np.testing.assert_array_equal(key(got), key(x))


def test_ddp_two_processes_matches_single_process_quality(spark, delta_vectors):
    path, x = delta_vectors
    src = delta_source(spark, path)
    params = SAEParams(n_latents=64, k=4, epochs=10, batch_size=128, lr=4e-3, seed=0, num_threads=1)
    single = train_distributed(src, params, backend="local")
    ddp = train_distributed(src, params, backend="torch", num_processes=2, spark=spark, local_mode=True)
    assert ddp.training_info_["world"] == 2
    e1, e2 = single.metrics(x)["normalized_mse"], ddp.metrics(x)["normalized_mse"]
    print(f"normalized MSE single={e1:.5f} ddp={e2:.5f}")
    assert e1 < 0.1  # both actually learned the data (predicting 0 gives 1.0)
    assert abs(e2 - e1) <= 0.02 * e1, (e1, e2)
    # same global batches and exactly averaged gradients: the two runs learn the same dictionary
    cos = np.abs(ddp.dictionary_ @ single.dictionary_.T).max(axis=1)
    print(f"dictionary agreement: median {np.median(cos):.5f}, min {cos.min():.5f}")
    assert np.median(cos) > 0.99


@pytest.fixture
def without_horovod(monkeypatch):
    """Make ``import horovod.spark`` fail as it does where the extra is not installed (None in sys.modules makes
    the import raise ImportError), so the explanation is tested whether or not horovod is installed here."""
    import sys

    monkeypatch.setitem(sys.modules, "horovod.spark", None)


@pytest.mark.slow
def test_horovod_two_processes_matches_single_process_quality(spark, delta_vectors):
    """backend='horovod': horovod.spark.run launches 2 ranks in Spark tasks (gloo, CPU); each reads its own parquet
    shard and trains with horovod.torch. Same data and seed as one local process."""
    ok, why = horovod_available()
    if not ok:
        pytest.skip(why)
    path, x = delta_vectors
    src = delta_source(spark, path)
    params = SAEParams(n_latents=64, k=4, epochs=10, batch_size=128, lr=4e-3, seed=0, num_threads=1)
    single = train_distributed(src, params, backend="local")
    hvd = train_distributed(src, params, backend="horovod", num_processes=2, spark=spark)
    assert hvd.training_info_ == {"backend": "horovod", "world": 2, "use_gpu": False}
    e1, e2 = single.metrics(x)["normalized_mse"], hvd.metrics(x)["normalized_mse"]
    print(f"normalized MSE single={e1:.6f} horovod(2)={e2:.6f}")
    assert e1 < 0.1
    assert abs(e2 - e1) <= 0.02 * e1, (e1, e2)
    # the same trajectory as one process (and as DDP, test above): the same dictionary up to summation order
    cos = np.abs(hvd.dictionary_ @ single.dictionary_.T).max(axis=1)
    assert cos.min() > 0.99, cos.min()


def test_horovod_backend_explains_itself_in_one_line(without_horovod):
    ok, why = horovod_available()
    assert not ok and "\n" not in why
    with pytest.raises(BackendUnavailableError) as err:
        train_distributed(np.zeros((10, 3), np.float32), {"n_latents": 8, "k": 2}, backend="horovod")
    msg = str(err.value)
    assert "\n" not in msg and "'horovod' extra" in msg and "t2p setup --horovod" in msg


def test_bad_backend_and_params():
    with pytest.raises(ValueError, match="backend must be one of"):
        train_distributed(np.zeros((10, 3)), {}, backend="mpi")
    with pytest.raises(ValueError, match="unknown SAE parameter"):
        train_distributed(np.zeros((10, 3)), {"latents": 3}, backend="local")


def test_partition_filter_keeps_matching_files():
    src = ParquetShards(["file:/t/experiment_id=a/p0.parquet", "file:/t/experiment_id=b/p1.parquet"],
                        partition_filter={"experiment_id": "b"})
    assert src.files == ["file:/t/experiment_id=b/p1.parquet"]


def test_spark_encoding_round_trips_through_delta(spark, delta_vectors, tmp_path):
    """Sparse rows written by the Spark encoder (mapInPandas, broadcast model) and read back from Delta equal the
    in-memory codes of the same model."""
    from tokens2policy.represent.job import encode_frame
    from tokens2policy.represent.sae import SparseAutoencoder, rows_to_csr

    path, x = delta_vectors
    sae = SparseAutoencoder(n_latents=32, k=3, epochs=2, batch_size=256, seed=0, num_threads=1).fit(x)
    df = spark.read.format("delta").load(path).withColumn("experiment_id", F.lit("e"))
    out = str(tmp_path / "neurons")
    encode_frame(spark, df, sae).write.format("delta").save(out)
    pdf = spark.read.format("delta").load(out).orderBy("unit_id").toPandas()
    assert pdf["unit_id"].tolist() == list(range(len(x)))
    table = rows_to_csr(pdf["indices"].tolist(), pdf["values"].tolist(), 32).toarray()
    np.testing.assert_allclose(table, sae.encode(x).toarray(), rtol=1e-6, atol=1e-7)
    # per-row squared errors emitted for the distributed metrics equal the in-memory reconstruction errors
    np.testing.assert_allclose(pdf["sse"], ((x - sae.reconstruct(x)) ** 2).sum(1), rtol=1e-4, atol=1e-6)


def test_stage_with_missing_horovod_fails_with_one_line_config_error(make_cfg, without_horovod):
    from tokens2policy.config import ConfigError
    from tokens2policy.represent import job

    with pytest.raises(ConfigError) as err:
        job.run(None, make_cfg("represent.backend=horovod", "represent.num_processes=2"))
    assert "\n" not in str(err.value) and "horovod" in str(err.value)


def test_local_backend_reports_each_epoch_as_recorded_in_the_history():
    x, _, _ = planted_sparse(n=400, d=8, n_atoms=12, active=2, seed=3)
    seen = []
    sae = train_distributed(x.astype(np.float32), SAEParams(n_latents=16, k=2, epochs=3, batch_size=64, seed=1),
                            backend="local", on_epoch=lambda epoch, entry: seen.append((epoch, dict(entry))))
    assert [e for e, _ in seen] == [0, 1, 2]
    assert [entry for _, entry in seen] == sae.history_
