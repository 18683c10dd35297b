"""The storage layer on a real HDFS (slow: starts Hadoop's MiniDFSCluster): Delta tables by URI, MERGE that sees
the stored table, the source fingerprint from HDFS's listing, and a report folder copied there."""
from __future__ import annotations

import pytest
from delta.tables import DeltaTable
from pyspark.sql import Row

from tokens2policy.config import load_config
from tokens2policy.lakehouse import merge_table, read_table, storage, table_exists, table_location, table_version
from tokens2policy.stages import source_fingerprint

pytestmark = pytest.mark.slow


def test_lakehouse_fingerprint_and_report_upload_on_hdfs(spark, hdfs, tmp_path):
    root = f"{hdfs}/t2p-storage"
    cfg = load_config(None, [f"data_dir={root}/data", f"tracking.tracking_uri=sqlite:///{tmp_path}/m.db"])
    assert table_location(cfg, "units") == f"{root}/data/lakehouse/tokens2policy/units"
    df = spark.createDataFrame([Row(experiment_id="e", unit_id=str(i), y=float(i)) for i in range(4)])
    assert not table_exists(spark, cfg, "units")
    assert merge_table(spark, cfg, "units", df, keys=["experiment_id", "unit_id"])["inserted"] == 4
    assert merge_table(spark, cfg, "units", df, keys=["experiment_id", "unit_id"])["inserted"] == 0
    assert table_exists(spark, cfg, "units") and table_version(spark, cfg, "units") is not None
    assert read_table(spark, cfg, "units").count() == 4
    # the version read off HDFS's listing of the log is Delta's own latest version
    loc = table_location(cfg, "units")
    df.write.format("delta").mode("append").save(loc)
    assert table_version(spark, cfg, "units") == DeltaTable.forPath(spark, loc).history(1).first()["version"] >= 1
    assert storage.delta_version(f"{root}/no-such-table", spark) is None
    # a parquet source on HDFS: the fingerprint is HDFS's listing and changes with a new file
    df.write.parquet(f"{root}/logs/a")
    src = load_config(None, [f"data_dir={root}/data", "source.kind=parquet", f"source.path={root}/logs/*"])
    first = source_fingerprint(spark, src)
    assert first == source_fingerprint(spark, src)
    df.write.parquet(f"{root}/logs/b")
    assert source_fingerprint(spark, src) != first
    # a report folder built locally and copied to HDFS
    local = tmp_path / "report"
    (local / "fig").mkdir(parents=True)
    (local / "index.html").write_text("<html>ok</html>")
    (local / "fig" / "a.png").write_bytes(b"\x89PNG")
    dest = storage.join(root, "reports", "20260101-000000")
    storage.upload_dir(str(local), dest, spark)
    assert storage.read_text(storage.join(dest, "index.html"), spark) == "<html>ok</html>"
    assert storage.child_dirs(storage.join(root, "reports"), spark) == ["20260101-000000"]
    assert [f.path.rsplit("/", 1)[1] for f in storage.list_files(dest, spark)] == ["a.png", "index.html"]
