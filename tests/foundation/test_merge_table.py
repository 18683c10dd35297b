"""merge_table's first use (the table does not exist yet): one write, and the row count it returns is the rows the table
holds — taken from the write's own commit metrics, or counted from the table when the commit has none."""
from __future__ import annotations

from pyspark.sql import Row
from pyspark.sql import types as T

from tokens2policy.lakehouse import merge_table, read_table, table_history

KEYS = ["experiment_id", "unit_id"]
SCHEMA = T.StructType([T.StructField("experiment_id", T.StringType()), T.StructField("unit_id", T.StringType()),
                       T.StructField("y", T.DoubleType())])


def _rows(n, exps=("e1", "e2", "e3")):
    return [Row(experiment_id=exps[i % len(exps)], unit_id=f"u{i}", y=float(i)) for i in range(n)]


def test_first_merge_is_one_write_and_counts_its_rows(spark, cfg):
    df = spark.createDataFrame(_rows(11), SCHEMA).repartition(3)
    got = merge_table(spark, cfg, "units", df, keys=KEYS, partition_by=["experiment_id"])
    assert got == {"inserted": 11, "updated": 0, "unchanged_or_kept": 0}
    assert read_table(spark, cfg, "units").count() == 11
    assert [r.operation for r in table_history(spark, cfg, "units").collect()] == ["WRITE"]
    # the next merge is a MERGE with its own metrics
    more = spark.createDataFrame(_rows(13), SCHEMA)
    assert merge_table(spark, cfg, "units", more, keys=KEYS, partition_by=["experiment_id"]) == {
        "inserted": 2, "updated": 0, "unchanged_or_kept": 11}


def test_first_merge_of_no_rows(spark, cfg):
    got = merge_table(spark, cfg, "quarantine", spark.createDataFrame([], SCHEMA), keys=KEYS)
    assert got == {"inserted": 0, "updated": 0, "unchanged_or_kept": 0}
    assert read_table(spark, cfg, "quarantine").count() == 0


def test_first_merge_without_commit_metrics_counts_the_table(spark, cfg):
    key = "spark.databricks.delta.history.metricsEnabled"
    old = spark.conf.get(key, None)
    spark.conf.set(key, "false")
    try:
        got = merge_table(spark, cfg, "units", spark.createDataFrame(_rows(5), SCHEMA), keys=KEYS)
        metrics = table_history(spark, cfg, "units").first().operationMetrics
    finally:
        if old is None:
            spark.conf.unset(key)
        else:
            spark.conf.set(key, old)
    assert not (metrics or {}).get("numOutputRows")  # the fallback was needed, and it counted
    assert got == {"inserted": 5, "updated": 0, "unchanged_or_kept": 0}
