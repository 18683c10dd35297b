"""Per-experiment predicates that no experiment id can subvert (ids come from the input data).

Spark SQL string literals use backslash escapes: the SQL-standard doubled quote (``'o''brien'``) is two adjacent
literals to Spark ('o' 'brien' = 'obrien'), a trailing backslash swallows the closing quote, and ``x\\' OR 1=1 --``
turned a per-experiment ``replaceWhere`` into "every row". The literals here are parsed back by Spark itself.
"""
from __future__ import annotations

from pyspark.sql import Row
from pyspark.sql import functions as F

from tokens2policy.lakehouse import (
    experiment_filter, experiments_predicate, read_table, sql_string_literal, write_table,
)

HOSTILE = ["o'brien", "a\\", "x\\' OR 1=1 --", "e2", "''", "\\\\'", "tab\there", "new\nline", "ünï'cødé",
           "semi;colon", "back`tick", "%_like", "\\u0041", "\\n"]


def test_string_literal_round_trips_through_sparks_parser(spark):
    exprs = ", ".join(f"{sql_string_literal(v)} AS c{i}" for i, v in enumerate(HOSTILE))
    row = spark.sql(f"SELECT {exprs}").first()
    assert [row[f"c{i}"] for i in range(len(HOSTILE))] == HOSTILE


def test_experiment_filter_selects_exactly_one_experiment(spark):
    df = spark.createDataFrame([Row(experiment_id=e, n=i) for i, e in enumerate(HOSTILE)])
    for i, e in enumerate(HOSTILE):
        assert [r.n for r in df.filter(experiment_filter(e)).collect()] == [i]
    picked = {r.experiment_id for r in df.filter(experiments_predicate(["o'brien", "a\\"])).collect()}
    assert picked == {"o'brien", "a\\"}
    assert df.filter(experiments_predicate([])).count() == 0


def test_replace_where_rewrites_only_its_experiment(spark, cfg):
    hostile = ["o'brien", "a\\", "x\\' OR 1=1 --"]
    rows = [Row(experiment_id=e, unit_id=str(i), y=1.0) for e in (*hostile, "e2") for i in range(3)]
    write_table(spark.createDataFrame(rows), cfg, "gates", partition_by=["experiment_id"])
    for k, e in enumerate(hostile):  # each experiment's rerun replaces its own rows only
        new = spark.createDataFrame([Row(experiment_id=e, unit_id="0", y=2.0 + k)])
        write_table(new, cfg, "gates", mode="overwrite", replace_where=experiment_filter(e))
    got = {(r.experiment_id, r.unit_id): r.y for r in read_table(spark, cfg, "gates").collect()}
    assert got == {**{("e2", str(i)): 1.0 for i in range(3)}, **{(e, "0"): 2.0 + k for k, e in enumerate(hostile)}}
    # the IN-list form that identify uses
    new = spark.createDataFrame([Row(experiment_id=e, unit_id="9", y=0.0) for e in hostile])
    write_table(new, cfg, "gates", mode="overwrite", replace_where=experiments_predicate(hostile))
    got = {(r.experiment_id, r.unit_id): r.y for r in read_table(spark, cfg, "gates").collect()}
    assert got == {**{("e2", str(i)): 1.0 for i in range(3)}, **{(e, "9"): 0.0 for e in hostile}}
