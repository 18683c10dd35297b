"""Column mapping and row checks on CSV, JSON and in-memory inputs (no tables written)."""
from __future__ import annotations

import json

import pytest
from pyspark.sql import types as T

from tokens2policy.config import ConfigError, load_config
from tokens2policy.ingest.job import read_source
from tokens2policy.ingest.validate import classify_rows, map_columns


def _cfg(tmp_path, *extra):
    return load_config(None, [f"data_dir={tmp_path / 'data'}", "source.kind=delta", "source.cluster_col=null",
                              "source.covariate_cols=[w]", "source.outcome_cols=[y]", *extra])


def _classified(spark, df, cfg):
    cmap = map_columns(df.schema, cfg, "test")
    return {r.unit_id: r for r in classify_rows(df, cmap).collect()}


def test_csv_source_reads_strings_and_types_them(spark, tmp_path):
    path = tmp_path / "logs.csv"
    path.write_text("experiment_id,unit_id,treatment,y,text,w\n"
                    "e,1,1,2.5,\"hello, world\",3\n"
                    "e,2,0,abc,some text,4\n"
                    "e,3,1.0,1e3,more text,x7\n"
                    "e,4,yes,1,text,1\n")
    cfg = _cfg(tmp_path, "source.kind=csv", f"source.path={path}")
    df, where = read_source(spark, cfg)
    assert where == f"csv:{path}" and all(isinstance(f.dataType, T.StringType) for f in df.schema.fields)
    rows = _classified(spark, df, cfg)
    assert rows["1"].reason is None and rows["1"].y == 2.5 and rows["1"].w == 3.0 and rows["1"].text == "hello, world"
    assert rows["2"].reason == "wrong_type" and "'y'" in rows["2"].message
    assert rows["3"].reason == "wrong_type" and "'w'" in rows["3"].message and rows["3"].treatment == 1
    assert rows["4"].reason == "bad_treatment"
    assert json.loads(rows["2"].raw_json)["y"] == "abc"


def test_json_source_with_constant_experiment_id_and_string_labels(spark, tmp_path):
    path = tmp_path / "logs.json"
    lines = [{"unit_id": 10, "arm": "B", "y": 1.0, "text": "a", "w": 1},
             {"unit_id": 11, "arm": " A ", "y": 2.0, "text": "b", "w": 2},
             {"unit_id": 12, "arm": "C", "y": 3.0, "text": "c", "w": 3}]
    path.write_text("\n".join(json.dumps(x) for x in lines))
    cfg = _cfg(tmp_path, "source.kind=json", f"source.path={path}", "source.experiment_id=exp7",
               "source.treatment_col=arm", "source.treatment_labels=[A, B]")
    df, _ = read_source(spark, cfg)
    rows = _classified(spark, df, cfg)
    assert {k: (r.experiment_id, r.treatment, r.reason) for k, r in rows.items()} == {
        "10": ("exp7", 1, None), "11": ("exp7", 0, None), "12": ("exp7", None, "bad_treatment")}


def test_binary_text_must_be_utf8_and_numeric_labels_compare_as_numbers(spark, tmp_path):
    schema = T.StructType([T.StructField("experiment_id", T.StringType()), T.StructField("unit_id", T.LongType()),
                           T.StructField("treatment", T.DoubleType()), T.StructField("y", T.DoubleType()),
                           T.StructField("text", T.BinaryType()), T.StructField("w", T.BooleanType())])
    df = spark.createDataFrame([
        ("e", 1, 1.0, 0.5, bytearray("naïve".encode("utf-8")), True),
        ("e", 2, 0.0, 0.5, bytearray(b"\xff\xfe broken"), False),
        ("e", 3, 0.5, 0.5, bytearray(b"ok"), False),
    ], schema)
    rows = _classified(spark, df, _cfg(tmp_path))
    assert rows["1"].reason is None and rows["1"].text == "naïve" and rows["1"].w == 1.0 and rows["1"].treatment == 1
    assert rows["2"].reason == "non_decodable_text"
    assert rows["3"].reason == "bad_treatment"


def test_unreadable_or_unmapped_sources_are_config_errors(spark, tmp_path):
    with pytest.raises(ConfigError, match="source.path is required"):
        read_source(spark, _cfg(tmp_path, "source.kind=parquet"))
    with pytest.raises(ConfigError, match="cannot read source delta:"):
        read_source(spark, _cfg(tmp_path, "source.kind=delta", f"source.path={tmp_path / 'nope'}"))
    schema = T.StructType([T.StructField(c, T.StringType()) for c in ("unit_id", "treatment", "y", "text", "w")])
    with pytest.raises(ConfigError, match=r"'experiment_id' \(source.experiment_id_col"):
        map_columns(schema, _cfg(tmp_path), "x")
    with pytest.raises(ConfigError, match="collide"):
        map_columns(schema, _cfg(tmp_path, "source.experiment_id=e", "source.covariate_cols=[y]"), "x")
    with pytest.raises(ConfigError, match="both source.assigned_at_col and source.measured_at_col"):
        map_columns(schema, _cfg(tmp_path, "source.experiment_id=e", "source.assigned_at_col=y"), "x")
