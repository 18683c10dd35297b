"""Config and sources that mean what they say: treatment labels as written (YAML's retyping undone, colliding
labels rejected), Unicode whitespace trimmed from ids, CSV lines that do not parse quarantined (or fatal), catalog
tables and SQL queries as sources, and a source that is mostly rejected failing ingest in one line.

Each case failed before: ``[no, yes]`` loaded as booleans and quarantined every row as bad_treatment, ``[1, 1.0]``
passed and marked every row treated, ``"u1\\t"`` stayed distinct from ``"u1"``, an extra CSV field vanished
silently, ``source.kind: table`` did not exist, and an ingest that quarantined every row succeeded.
"""
from __future__ import annotations

import json

import pytest
from pyspark.sql import Row
from pyspark.sql import types as T

from tokens2policy.config import ConfigError, load_config
from tokens2policy.ingest import job
from tokens2policy.ingest.job import read_source
from tokens2policy.ingest.validate import classify_rows, map_columns
from tokens2policy.lakehouse import read_table, table_exists


def _cfg(tmp_path, *extra):
    return load_config(None, [f"data_dir={tmp_path / 'data'}", "source.kind=delta", "source.path=unused",
                              "source.cluster_col=null", "source.covariate_cols=[w]", "source.outcome_cols=[y]",
                              *extra])


def _classified(df, cfg):
    return {r.unit_id: r for r in classify_rows(df, map_columns(df.schema, cfg, "test")).collect()}


def test_yaml_labels_stay_as_written_and_collisions_are_config_errors(tmp_path):
    assert _cfg(tmp_path, "source.treatment_labels=[no, yes]").source.treatment_labels == ["no", "yes"]
    prof = tmp_path / "p.yaml"
    prof.write_text("source:\n  treatment_labels: [off, on]\n")
    assert load_config(prof).source.treatment_labels == ["off", "on"]
    for labels in ("[1, 1.0]", "[true, 'True']", "[0, '0']", "[' a', 'a']"):
        with pytest.raises(ConfigError, match="name the same value") as err:
            _cfg(tmp_path, f"source.treatment_labels={labels}")
        assert "\n" not in str(err.value)


def test_labels_match_strings_booleans_and_numbers(spark, tmp_path):
    schema = T.StructType([T.StructField("experiment_id", T.StringType()), T.StructField("unit_id", T.StringType()),
                           T.StructField("treatment", T.StringType()), T.StructField("y", T.DoubleType()),
                           T.StructField("text", T.StringType()), T.StructField("w", T.DoubleType())])
    rows = [("e", "1", "no", 1.0, "a", 1.0), ("e", "2", "yes", 1.0, "b", 1.0), ("e", "3", "maybe", 1.0, "c", 1.0)]
    got = _classified(spark.createDataFrame(rows, schema), _cfg(tmp_path, "source.treatment_labels=[no, yes]"))
    assert {k: (r.treatment, r.reason) for k, r in got.items()} == {
        "1": (0, None), "2": (1, None), "3": (None, "bad_treatment")}
    # [false, true] against a boolean column and against its text
    bools = T.StructType([*schema.fields[:2], T.StructField("treatment", T.BooleanType()), *schema.fields[3:]])
    df = spark.createDataFrame([("e", "1", False, 1.0, "a", 1.0), ("e", "2", True, 1.0, "b", 1.0)], bools)
    got = _classified(df, _cfg(tmp_path, "source.treatment_labels=[false, true]"))
    assert {k: r.treatment for k, r in got.items()} == {"1": 0, "2": 1}
    df = spark.createDataFrame([("e", "1", "FALSE", 1.0, "a", 1.0), ("e", "2", " True ", 1.0, "b", 1.0)], schema)
    assert {k: r.treatment for k, r in _classified(df, _cfg(tmp_path, "source.treatment_labels=[false, true]")
                                                  ).items()} == {"1": 0, "2": 1}
    # two numbers still compare numerically
    df = spark.createDataFrame([("e", "1", "0", 1.0, "a", 1.0), ("e", "2", "1.0", 1.0, "b", 1.0)], schema)
    assert {k: r.treatment for k, r in _classified(df, _cfg(tmp_path)).items()} == {"1": 0, "2": 1}


def test_ids_are_trimmed_of_unicode_whitespace(spark, tmp_path):
    schema = T.StructType([T.StructField(c, T.StringType()) for c in ("experiment_id", "unit_id", "treatment", "y",
                                                                      "text", "w")])
    df = spark.createDataFrame([("e\u00a0", "u1\t", "1", "1", "a", "1"), ("\u3000e", "\u200bu1", "0", "1", "b", "1"),
                                ("e", "\u2003", "0", "1", "c", "1")], schema)
    rows = classify_rows(df, map_columns(df.schema, _cfg(tmp_path), "t")).collect()
    assert sorted(((r.experiment_id, r.unit_id, r.reason) for r in rows), key=repr) == sorted([
        ("e", "", "missing_unit_id"), ("e", "u1", None), ("e", "u1", "duplicate_unit_id")], key=repr)


def test_csv_lines_that_do_not_parse_are_quarantined_or_fatal(spark, tmp_path):
    path = tmp_path / "logs.csv"
    path.write_text("experiment_id,unit_id,treatment,y,text,w\n"
                    "e,1,1,2.5,hello,3\n"
                    "e,2,0,1.5,too,many,fields\n"
                    "e,3,1,0.5\n"
                    "e,4,0,1.0,\"quoted, comma\",4\n")
    cfg = _cfg(tmp_path, "source.kind=csv", f"source.path={path}")
    df, _ = read_source(spark, cfg)
    rows = _classified(df, cfg)
    assert {k: r.reason for k, r in rows.items()} == {"1": None, "2": "malformed_line", "3": "malformed_line",
                                                      "4": None}
    assert "e,2,0,1.5,too,many,fields" in rows["2"].message
    assert json.loads(rows["2"].raw_json)["_corrupt_record"] == "e,2,0,1.5,too,many,fields"
    assert rows["4"].text == "quoted, comma"
    # a declared schema: typed columns, the same rule for lines that do not fit it
    typed = _cfg(tmp_path, "source.kind=csv", f"source.path={path}",
                 "source.csv_schema=experiment_id string, unit_id string, treatment int, y double, text string, "
                 "w double")
    df, _ = read_source(spark, typed)
    assert df.schema["treatment"].dataType == T.IntegerType()
    assert {k: r.reason for k, r in _classified(df, typed).items()}["2"] == "malformed_line"
    with pytest.raises(ConfigError, match="not a Spark DDL"):
        read_source(spark, _cfg(tmp_path, "source.kind=csv", f"source.path={path}", "source.csv_schema=a b c d"))


def _ingest_cfg(data, *extra):
    return load_config(None, [f"data_dir={data}", "source.cluster_col=null", "source.outcome_cols=[y]",
                              "source.text_cols=[text]", "source.covariate_cols=[w]", "ingest.n_folds=2", *extra])


def test_malformed_fail_stops_ingest_in_one_line(spark, tmp_path):
    path = tmp_path / "logs.csv"
    path.write_text("experiment_id,unit_id,treatment,y,text,w\ne,1,1,2.5,hello,3\ne,2,0,1.5,extra,4,5\n")
    cfg = _ingest_cfg(tmp_path / "data", "source.kind=csv", f"source.path={path}", "source.malformed=fail")
    with pytest.raises(ConfigError, match="has a line that does not parse") as err:
        job.run(spark, cfg)
    assert "\n" not in str(err.value)
    assert not table_exists(spark, cfg, "units")


def test_mostly_rejected_source_fails_and_keeps_the_quarantine(spark, tmp_path):
    """A string covariate makes every row wrong_type: before, ingest succeeded with an empty units table."""
    rows = [Row(experiment_id="e", unit_id=str(i), treatment=i % 2, y=float(i), text=f"t{i}",
                w="high" if i < 8 else "3") for i in range(10)]
    src = str(tmp_path / "src")
    spark.createDataFrame(rows).write.format("delta").save(src)
    cfg = _ingest_cfg(tmp_path / "data", "source.kind=delta", f"source.path={src}")
    with pytest.raises(ConfigError, match=r"rejected 8 of 10 rows \(80% > ingest.max_reject_share=0.5\)") as err:
        job.run(spark, cfg)
    msg = str(err.value)
    assert "\n" not in msg and "wrong_type (8)" in msg and "'w'" in msg and "quarantine" in msg
    assert not table_exists(spark, cfg, "units")
    assert read_table(spark, cfg, "quarantine").count() == 8
    # the same source passes when the share is allowed
    ok = _ingest_cfg(tmp_path / "data", "source.kind=delta", f"source.path={src}", "ingest.max_reject_share=0.9")
    summary = job.run(spark, ok)
    assert (summary["accepted"], summary["quarantined"]) == (2, 8)


def test_catalog_table_and_query_sources(spark, tmp_path):
    rows = [Row(exp="e", uid=str(i), arm=i % 2, y=float(i), body=f"text {i}", w=1.0) for i in range(6)]
    spark.createDataFrame(rows).createOrReplaceTempView("t2p_logs_view")
    base = ["source.experiment_id_col=exp", "source.unit_id_col=uid", "source.treatment_col=arm",
            "source.text_cols=[body]", "source.outcome_cols=[y]", "source.covariate_cols=[w]",
            "source.cluster_col=null"]
    cfg = load_config(None, [f"data_dir={tmp_path / 'data'}", "source.kind=table", "source.table=t2p_logs_view",
                             *base])
    df, where = read_source(spark, cfg)
    assert where == "table:t2p_logs_view" and df.count() == 6
    q = load_config(None, [f"data_dir={tmp_path / 'data'}", "source.kind=query",
                           "source.query=SELECT * FROM t2p_logs_view WHERE arm = 1", *base])
    df, where = read_source(spark, q)
    assert where.startswith("query:SELECT") and sorted(r.uid for r in df.collect()) == ["1", "3", "5"]
    from tokens2policy.stages import source_fingerprint

    fp = source_fingerprint(spark, q)
    assert fp.startswith("rows@") and fp == source_fingerprint(spark, q)
    with pytest.raises(ConfigError, match="source.table is required"):
        read_source(spark, load_config(None, ["source.kind=table"]))
    with pytest.raises(ConfigError, match="cannot read source table:no_such_table"):
        read_source(spark, load_config(None, ["source.kind=table", "source.table=no_such_table"]))
