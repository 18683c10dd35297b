"""Storage locations as URIs: string joins that keep the scheme, existence and listings asked of the owning file
system (Hadoop's FileSystem through Spark), and the lakehouse on a ``file://`` root (the default-suite stand-in for
hdfs://, s3a://, abfss://: the same code path, a URI instead of a plain path)."""
from __future__ import annotations

import os
import time

import pytest
from pyspark.sql import Row

from tokens2policy.config import ConfigError, load_config
from tokens2policy.lakehouse import (
    merge_table, read_table, storage, table_exists, table_location, table_version, write_table,
)
from tokens2policy.stages import source_fingerprint


def test_join_resolve_and_local_path_keep_uris_intact():
    assert storage.join("s3a://bucket/x", "lakehouse", "units") == "s3a://bucket/x/lakehouse/units"
    assert storage.join("s3a://bucket/x/", "/t/") == "s3a://bucket/x/t"
    assert storage.join("dbfs:/", "t2p") == "dbfs:/t2p"
    assert storage.join("abfss://c@acct.dfs.core.windows.net/", "a", "b") == "abfss://c@acct.dfs.core.windows.net/a/b"
    assert storage.resolve("hdfs://nn:8020/user/t2p/") == "hdfs://nn:8020/user/t2p"
    assert storage.resolve("relative/dir") == os.path.join(os.getcwd(), "relative", "dir")
    assert storage.scheme("C:/data") is None and storage.scheme("gs://b") == "gs"
    assert storage.local_path("file:///tmp/a%20b") == "/tmp/a b" and storage.local_path("file:/tmp/x") == "/tmp/x"
    assert storage.is_local("file:///tmp") and storage.is_local("/tmp") and not storage.is_local("s3a://b/")
    with pytest.raises(ValueError, match="not on the local file system"):
        storage.local_path("hdfs://nn/x")
    assert storage.redact_uri("https://user:pw@host/x?sig=abc&sv=1&n=2") == "https://***@host/x?sig=***&sv=***&n=2"


@pytest.mark.parametrize("root", ["s3a://bucket/t2p", "abfss://c@acct.dfs.core.windows.net/t2p", "dbfs:/t2p",
                                  "hdfs://namenode:8020/user/t2p", "gs://bucket/t2p"])
def test_remote_roots_are_strings_not_local_paths(tmp_path, root):
    """Before: pathlib turned s3a://b/x into s3a:/b/x and data_dir=s3a://... into ./s3a:/... under the cwd."""
    cfg = load_config(None, [f"data_dir={root}"])
    assert cfg.data_uri == root
    assert table_location(cfg, "units") == f"{root}/lakehouse/tokens2policy/units"
    cfg = load_config(None, [f"data_dir={tmp_path}", f"lakehouse.root={root}/lake/"])
    assert table_location(cfg, "units") == f"{root}/lake/tokens2policy/units"
    with pytest.raises(ConfigError, match="not on the local file system"):
        load_config(None, [f"data_dir={root}"]).data_path
    from tokens2policy.tracking import tracking_uri

    with pytest.raises(ConfigError, match="set tracking.tracking_uri"):
        tracking_uri(load_config(None, [f"data_dir={root}"]))


def test_relative_local_data_dir_still_works(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["data_dir=data"])
    assert cfg.data_path == tmp_path / "data"
    assert table_location(cfg, "units") == str(tmp_path / "data" / "lakehouse" / "tokens2policy" / "units")


def test_lakehouse_on_a_file_uri_root(spark, tmp_path):
    """Before: existence was a local is_dir() of 'file:/...' (always False), so merge_table overwrote the table
    every time and reported every row as inserted."""
    cfg = load_config(None, [f"data_dir={tmp_path / 'data'}", f"lakehouse.root={tmp_path.as_uri()}/lake"])
    loc = table_location(cfg, "units")
    assert loc == f"{tmp_path.as_uri()}/lake/tokens2policy/units"
    assert not table_exists(spark, cfg, "units") and table_version(spark, cfg, "units") is None
    df = spark.createDataFrame([Row(experiment_id="e", unit_id=str(i), y=float(i)) for i in range(4)])
    assert merge_table(spark, cfg, "units", df, keys=["experiment_id", "unit_id"])["inserted"] == 4
    assert table_exists(spark, cfg, "units") and table_version(spark, cfg, "units") == 0
    assert merge_table(spark, cfg, "units", df, keys=["experiment_id", "unit_id"]) == {
        "inserted": 0, "updated": 0, "unchanged_or_kept": 4}
    assert os.path.isdir(tmp_path / "lake" / "tokens2policy" / "units" / "_delta_log")
    assert sorted(r.y for r in read_table(spark, cfg, "units").collect()) == [0.0, 1.0, 2.0, 3.0]


def test_data_dir_as_file_uri_roots_tables_tracking_and_warehouse(spark, tmp_path):
    data = (tmp_path / "d").as_uri()
    cfg = load_config(None, [f"data_dir={data}"])
    assert cfg.data_uri == data and cfg.data_path == tmp_path / "d"
    write_table(spark.createDataFrame([Row(experiment_id="e", unit_id="1")]), cfg, "units")
    assert os.path.isdir(tmp_path / "d" / "lakehouse" / "tokens2policy" / "units" / "_delta_log")
    from tokens2policy.tracking import tracking_uri

    assert tracking_uri(cfg) == f"sqlite:///{tmp_path / 'd' / 'mlflow' / 'mlflow.db'}"


def test_storage_io_through_hadoop_and_fsspec(spark, tmp_path):
    base = (tmp_path / "io").as_uri()
    for via in (spark, None):  # Hadoop FileSystem of the JVM, then fsspec (no session handed in)
        where = storage.join(base, "jvm" if via is not None else "py")
        storage.write_text(storage.join(where, "a", "x.txt"), "héllo", spark=via)
        assert storage.read_text(storage.join(where, "a", "x.txt"), spark=via) == "héllo"
        assert storage.exists(storage.join(where, "a"), spark=via)
        assert not storage.exists(storage.join(where, "nope"), spark=via)
        assert storage.child_dirs(where, spark=via) == ["a"]
        files = storage.list_files(where, spark=via)
        assert [os.path.basename(f.path) for f in files] == ["x.txt"] and files[0].size == len("héllo".encode())
    local = tmp_path / "staging"
    (local / "sub").mkdir(parents=True)
    (local / "index.html").write_text("<p>x</p>")
    (local / "sub" / "f.png").write_bytes(b"\x89PNG")
    dest = storage.join(base, "report")
    storage.upload_dir(str(local), dest, spark)
    assert storage.read_text(storage.join(dest, "index.html"), spark) == "<p>x</p>"
    assert (tmp_path / "io" / "report" / "sub" / "f.png").read_bytes() == b"\x89PNG"


def _source_cfg(tmp_path, path):
    return load_config(None, [f"data_dir={tmp_path / 'data'}", "source.kind=parquet", f"source.path={path}"])


def test_source_fingerprint_on_uris_and_globs(spark, tmp_path):
    """Before: os.walk/os.stat on 'file:///...' or a glob crashed (or fingerprinted nothing)."""
    src = tmp_path / "logs"
    df = spark.createDataFrame([Row(unit_id=str(i), y=float(i)) for i in range(6)])
    df.repartition(2).write.parquet(str(src / "day=1"))
    uri = src.as_uri()
    first = source_fingerprint(spark, _source_cfg(tmp_path, uri))
    assert first == source_fingerprint(spark, _source_cfg(tmp_path, uri))  # stable
    glob = f"{uri}/day=*"
    g1 = source_fingerprint(spark, _source_cfg(tmp_path, glob))
    time.sleep(1.1)  # a new file must change it (names + sizes + mtimes)
    df.write.parquet(str(src / "day=2"))
    assert source_fingerprint(spark, _source_cfg(tmp_path, uri)) != first
    assert source_fingerprint(spark, _source_cfg(tmp_path, glob)) != g1
    # the listing Spark reads: the parquet part files, not _SUCCESS or .crc files
    names = [os.path.basename(f.path) for f in storage.list_files(uri, spark)]
    assert names and all(n.startswith("part-") and n.endswith(".parquet") for n in names)
    # a Delta source on a URI: its version
    delta = (tmp_path / "delta_src").as_uri()
    df.write.format("delta").save(delta)
    cfg = load_config(None, [f"data_dir={tmp_path / 'data'}", "source.kind=delta", f"source.path={delta}"])
    assert source_fingerprint(spark, cfg) == "delta@0"


def test_delta_version_from_the_log_listing_equals_deltas_history(spark, tmp_path):
    """``storage.delta_version`` (one glob of ``_delta_log``) against Delta's own ``history(1)``, through the JVM
    and without it, after commits of several kinds and a checkpoint (whose files must not count as commits)."""
    from delta.tables import DeltaTable

    loc = (tmp_path / "t").as_uri()
    assert storage.delta_version(loc, spark) is None and storage.delta_version(loc) is None
    df = spark.createDataFrame([Row(k=i, v=float(i)) for i in range(5)])
    df.write.format("delta").save(loc)
    for _ in range(11):  # past Delta's checkpoint interval (10): 00000000000000000010.checkpoint.parquet appears
        df.write.format("delta").mode("append").save(loc)
    DeltaTable.forPath(spark, loc).update("k = 1", {"v": "v + 1"})
    DeltaTable.forPath(spark, loc).delete("k = 2")
    names = os.listdir(tmp_path / "t" / "_delta_log")
    assert any("checkpoint" in n for n in names) and any(n.endswith(".crc") for n in names)
    expected = DeltaTable.forPath(spark, loc).history(1).first()["version"]
    assert expected == 13
    assert storage.delta_version(loc, spark) == storage.delta_version(str(tmp_path / "t")) == expected
    # a directory with a log folder but no commit yet is no table
    (tmp_path / "empty" / "_delta_log").mkdir(parents=True)
    assert storage.delta_version(str(tmp_path / "empty"), spark) is None
