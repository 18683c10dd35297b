"""Real Delta on a real local SparkSession: write → read → history → time travel, idempotent MERGE, MLflow run."""
import mlflow
import pytest
from pyspark.sql import Row

from tokens2policy.lakehouse import (
    MissingTableError,
    merge_table,
    read_table,
    table_exists,
    table_history,
    table_location,
    table_version,
    write_table,
)
from tokens2policy.tracking import stage_run, tracking_uri


def test_delta_round_trip_history_and_time_travel(spark, cfg):
    assert not table_exists(spark, cfg, "units")
    assert table_version(spark, cfg, "units") is None
    v0 = spark.createDataFrame([Row(experiment_id="e1", unit_id=str(i), y=float(i)) for i in range(5)])
    write_table(v0, cfg, "units", partition_by=["experiment_id"])
    v1 = spark.createDataFrame([Row(experiment_id="e1", unit_id=str(i), y=float(10 * i)) for i in range(3)])
    write_table(v1, cfg, "units")
    assert table_version(spark, cfg, "units") == 1
    ops = [r.operation for r in table_history(spark, cfg, "units").orderBy("version").collect()]
    assert ops == ["WRITE", "WRITE"]
    assert read_table(spark, cfg, "units").count() == 3
    old = read_table(spark, cfg, "units", version=0)
    assert sorted(r.y for r in old.collect()) == [0.0, 1.0, 2.0, 3.0, 4.0]
    # it is a Delta table for real: the transaction log is there, and Spark reads it through the delta source
    assert (cfg.data_path / "lakehouse" / "tokens2policy" / "units" / "_delta_log").is_dir()
    detail = spark.sql(f"DESCRIBE DETAIL delta.`{table_location(cfg, 'units')}`").first()
    assert detail.format == "delta"


def test_replace_where_leaves_other_experiments_alone(spark, cfg):
    rows = [Row(experiment_id=e, unit_id=str(i), y=1.0) for e in ("a", "b") for i in range(3)]
    write_table(spark.createDataFrame(rows), cfg, "gates", partition_by=["experiment_id"])
    new_a = spark.createDataFrame([Row(experiment_id="a", unit_id="0", y=2.0)])
    write_table(new_a, cfg, "gates", replace_where="experiment_id = 'a'")
    got = {(r.experiment_id, r.unit_id): r.y for r in read_table(spark, cfg, "gates").collect()}
    assert got == {("a", "0"): 2.0, ("b", "0"): 1.0, ("b", "1"): 1.0, ("b", "2"): 1.0}


def test_merge_is_idempotent_and_upserts(spark, cfg):
    df = spark.createDataFrame([Row(experiment_id="e", unit_id=str(i), y=float(i)) for i in range(4)])
    first = merge_table(spark, cfg, "units", df, keys=["experiment_id", "unit_id"])
    assert first["inserted"] == 4
    snapshot = sorted(read_table(spark, cfg, "units").collect())
    second = merge_table(spark, cfg, "units", df, keys=["experiment_id", "unit_id"])
    assert second == {"inserted": 0, "updated": 0, "unchanged_or_kept": 4}
    assert sorted(read_table(spark, cfg, "units").collect()) == snapshot
    changed = spark.createDataFrame([Row(experiment_id="e", unit_id="1", y=99.0),
                                     Row(experiment_id="e", unit_id="9", y=9.0)])
    third = merge_table(spark, cfg, "units", changed, keys=["experiment_id", "unit_id"])
    assert third == {"inserted": 1, "updated": 1, "unchanged_or_kept": 0}
    got = {r.unit_id: r.y for r in read_table(spark, cfg, "units").collect()}
    assert got == {"0": 0.0, "1": 99.0, "2": 2.0, "3": 3.0, "9": 9.0}
    kept = merge_table(spark, cfg, "units", spark.createDataFrame([Row(experiment_id="e", unit_id="0", y=-1.0)]),
                       keys=["experiment_id", "unit_id"], update_when_changed=False)
    assert kept == {"inserted": 0, "updated": 0, "unchanged_or_kept": 1}
    assert {r.unit_id: r.y for r in read_table(spark, cfg, "units").collect()}["0"] == 0.0


def test_missing_table_is_a_clear_error(spark, cfg):
    with pytest.raises(MissingTableError, match="table 'modifiers' does not exist"):
        read_table(spark, cfg, "modifiers")


def test_stage_run_records_config_and_input_versions(spark, cfg):
    write_table(spark.createDataFrame([Row(experiment_id="e", unit_id="1")]), cfg, "units")
    with stage_run(cfg, "identify", inputs={"units": table_version(spark, cfg, "units"), "neurons": None}) as run:
        mlflow.log_metric("n_selected", 3)
    assert tracking_uri(cfg).startswith("sqlite:///") and str(cfg.data_path) in tracking_uri(cfg)
    got = mlflow.MlflowClient().get_run(run.info.run_id)
    assert got.info.status == "FINISHED"
    assert got.data.params["input_version.units"] == "0"
    assert got.data.params["input_version.neurons"] == "none"
    assert got.data.params["identify.alpha"] == str(cfg.identify.alpha)
    assert got.data.metrics["n_selected"] == 3
    assert got.data.tags["t2p.stage"] == "identify"
