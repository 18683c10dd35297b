"""Classification and the ingest job on hostile inputs: duplicates that conflict, exact copies, null timestamps, broken
copies of good rows, malformed lines, ids that differ only by Unicode whitespace, ids whose UTF-16 and code-point
orders differ, quotes, backslashes, NUL and line breaks in ids.

Written against the classification of main 7d1f51e (a window over every row) before it was changed to resolve
duplicates only among the rows whose key is duplicated; both must give the same result. Truth comes from the test
data (every row carries the reason its content must get, in its ``expect`` column) and from a plain-Python
implementation of the documented keep rule: per (experiment_id, unit_id), among the rows that pass every other
check, the earliest ``assigned_at`` is kept (nulls last), ties broken by the smallest raw-row JSON string (Spark
compares strings by their UTF-8 bytes, which is the order of code points, Python's ``str`` order).
"""
from __future__ import annotations

import datetime as dt
import json
from collections import Counter, defaultdict

import pytest
from pyspark.sql import types as T

from tokens2policy.config import load_config
from tokens2policy.ingest import job
from tokens2policy.ingest.validate import classify_rows, map_columns
from tokens2policy.lakehouse import read_table

SCHEMA = T.StructType([
    T.StructField("exp", T.StringType()), T.StructField("uid", T.StringType()), T.StructField("arm", T.StringType()),
    T.StructField("y", T.DoubleType()), T.StructField("text", T.StringType()), T.StructField("w", T.StringType()),
    T.StructField("note", T.StringType()), T.StructField("expect", T.StringType()),
    T.StructField("assigned_at", T.TimestampType()), T.StructField("measured_at", T.TimestampType()),
    T.StructField("_corrupt_record", T.StringType()),
])
T0 = dt.datetime(2026, 1, 10, 12, 0, 0)
MEASURED = dt.datetime(2026, 1, 1, 8, 0, 0)
EXACT = "': an exact copy of the kept row"
DIFFERS = "': differs from the kept row (kept: earliest assigned_at, then smallest raw row JSON)"


def row(uid, exp="e", arm="t", y=1.0, text="some text", w="3", note="", expect="ok", hours=0.0, corrupt=None,
        assigned="given"):
    at = T0 + dt.timedelta(hours=hours) if assigned == "given" else None
    return (exp, uid, arm, y, text, w, note, expect, at, MEASURED, corrupt)


def hostile_rows():
    rows = [
        # conflicting duplicates: the earliest assignment wins whatever the order in the input
        row("d1", y=1.0, hours=2), row("d1", y=2.0, hours=0), row("d1", y=3.0, hours=1),
        # three exact copies (logging retries): one kept, two quarantined as exact copies
        row("d2", y=5.0), row("d2", y=5.0), row("d2", y=5.0),
        # same time, different values: the smaller raw JSON wins ('"y":1.0,' < '"y":10.0,')
        row("d3", y=10.0), row("d3", y=1.0),
        # a null assignment time sorts last
        row("d4", y=1.0, assigned=None), row("d4", y=2.0, hours=5),
        # only null times: raw JSON decides (the rows differ in a column outside `units`)
        row("d5", note="b", assigned=None), row("d5", note="a", assigned=None),
        # a broken copy never displaces (nor duplicates) the good row, even when it is earlier
        row("d6", y=None, expect="missing_outcome", hours=-3), row("d6", y=6.0),
        # two broken copies keep their own reasons; identical broken rows stay two rows
        row("d7", arm="maybe", expect="bad_treatment"), row("d7", arm="maybe", expect="bad_treatment"),
        # a malformed line with a good row's key is not a competitor
        row("d1", corrupt="d1,,,broken line", expect="malformed_line", hours=-9),
        # ids that are one unit after trimming Unicode whitespace (tab, zero-width space, ideographic / no-break)
        row("u7"), row("u7\t"), row("\u200bu7"), row("\u3000u7\u00a0"),
        # UTF-16 order puts the emoji (a surrogate pair, 0xD83D...) before U+FF5E; code-point order after it
        row("d8", text="\U0001F600 smile"), row("d8", text="\uff5e wave"),
        # NFC and NFD spellings are different ids (no normalization), case matters, experiments separate keys
        row("\u00fc"), row("u\u0308"), row("D9"), row("d9"), row("x1", exp="e2"), row("x1"), row("x1", exp="e\u00a0",
                                                                                                   y=7.0, hours=1),
        # quotes, backslashes, NUL and a line break inside ids; exact copies of such rows
        row('q"1\\', y=1.0), row('q"1\\', y=2.0, hours=-1), row("n\x00", note="nul"), row("n\x00", note="nul"),
        row("line\nbreak"),
        # missing keys: each row rejected on its own, never a duplicate of another
        row(None, expect="missing_unit_id"), row(None, expect="missing_unit_id"), row(" \u2003", expect="missing_unit_id"),
        row("k1", exp=None, expect="missing_experiment_id"), row("k1", exp="  ", expect="missing_experiment_id"),
        # non-finite outcome and a post-treatment covariate next to a good copy
        row("d10", y=float("nan"), expect="non_finite_outcome"), row("d10", y=1.5),
        row("d11", expect="post_treatment_covariate", hours=-400), row("d11", hours=3),
    ]
    # a large group with ties: 40 rows of one key over 8 distinct times
    rows += [row("big", y=float(i), note=f"n{(i * 7) % 40:02d}", hours=float(i % 8) - 4) for i in range(40)]
    # many unique good keys, so the duplicated ones are a small share
    rows += [row(f"ok{i:03d}", y=float(i), hours=i / 10) for i in range(60)]
    return rows


def config(data_dir, path="unused", *extra):
    return load_config(None, [
        f"data_dir={data_dir}", "source.kind=delta", f"source.path={path}", "source.experiment_id_col=exp",
        "source.unit_id_col=uid", "source.treatment_col=arm", "source.treatment_labels=[c, t]",
        "source.outcome_cols=[y]", "source.text_cols=[text]", "source.covariate_cols=[w]", "source.cluster_col=null",
        "source.assigned_at_col=assigned_at", "source.measured_at_col=measured_at", "ingest.n_folds=2",
        *extra])


def expected_reasons(out):
    """The documented rule in plain Python on Spark's output rows: (raw_json, reason, message) per row."""
    got = []
    groups = defaultdict(list)
    for r in out:
        expect = json.loads(r.raw_json)["expect"]
        if expect != "ok":
            got.append((r.raw_json, expect, None))
        else:
            groups[(r.experiment_id, r.unit_id)].append(r)
    for (exp, uid), members in groups.items():
        members.sort(key=lambda r: (r.assigned_at is None, r.assigned_at or T0, r.raw_json))
        kept = members[0].raw_json
        got.append((kept, None, None))
        for r in members[1:]:
            tail = EXACT if r.raw_json == kept else DIFFERS
            got.append((r.raw_json, "duplicate_unit_id", f"duplicate of unit_id '{uid}' in experiment '{exp}{tail}"))
    return got


@pytest.fixture(scope="module")
def classified(spark, tmp_path_factory):
    df = spark.createDataFrame(hostile_rows(), SCHEMA)
    cfg = config(tmp_path_factory.mktemp("hostile") / "data")
    return classify_rows(df, map_columns(df.schema, cfg, "test")).collect()


def test_nothing_is_lost_and_every_reason_is_the_documented_one(classified):
    rows = hostile_rows()
    assert len(classified) == len(rows)
    got = Counter((r.raw_json, r.reason, r.message if r.reason == "duplicate_unit_id" else None) for r in classified)
    assert got == Counter(expected_reasons(classified))
    # the rows' own reasons (not duplicates) are exactly what their content says
    assert Counter(json.loads(r.raw_json)["expect"] for r in classified if r.reason not in (None, "duplicate_unit_id")
                   ) == Counter(r[7] for r in rows if r[7] != "ok")


def test_kept_rows_are_the_known_ones(classified):
    kept = defaultdict(list)
    for r in classified:
        if r.reason is None:
            kept[(r.experiment_id, r.unit_id)].append(r)
    assert all(len(v) == 1 for v in kept.values())
    one = {k: v[0] for k, v in kept.items()}
    assert one[("e", "d1")].y == 2.0 and one[("e", "d3")].y == 1.0 and one[("e", "d4")].y == 2.0
    assert json.loads(one[("e", "d5")].raw_json)["note"] == "a" and one[("e", "d6")].y == 6.0
    assert one[("e", "d8")].text == "\uff5e wave"  # code-point (UTF-8 byte) order, not UTF-16 order
    assert one[("e", 'q"1\\')].y == 2.0 and one[("e", "x1")].y == 1.0 and one[("e2", "x1")].y == 1.0
    assert one[("e", "u7")].unit_id == "u7" and json.loads(one[("e", "u7")].raw_json)["uid"] == "u7"
    assert {("e", "\u00fc"), ("e", "u\u0308"), ("e", "D9"), ("e", "d9"), ("e", "n\x00"), ("e", "line\nbreak")} <= set(one)
    big = [r for r in classified if r.unit_id == "big"]
    first = min(r.assigned_at for r in big)
    assert one[("e", "big")].raw_json == min(r.raw_json for r in big if r.assigned_at == first)
    assert Counter(r.reason for r in big) == Counter({None: 1, "duplicate_unit_id": 39})
    assert not any(("e", k) in one for k in ("d7",)) and ("e", "d2") in one
    dups = Counter(r.message.endswith(EXACT) for r in classified if r.reason == "duplicate_unit_id" and
                   r.unit_id in ("d2", "n\x00"))
    assert dups == Counter({True: 3})


@pytest.mark.slow  # the whole job twice (~40 s): the classification of the same rows is checked above by default
def test_ingest_job_on_hostile_rows_keeps_every_row(spark, tmp_path, classified):
    """The whole job: every input row is in `units` or `quarantine` (k identical broken rows as k rows), the kept
    rows are the classified ones, and the counts add up."""
    src = tmp_path / "src"
    spark.createDataFrame(hostile_rows(), SCHEMA).write.format("delta").save(str(src))
    cfg = config(tmp_path / "data", src, "ingest.max_reject_share=1.0")
    run = job.run(spark, cfg)
    n = len(hostile_rows())
    assert run["rows_in"] == n and run["accepted"] + run["quarantined"] == n
    kept = [r for r in classified if r.reason is None]
    units = read_table(spark, cfg, "units").collect()
    assert sorted((r.experiment_id, r.unit_id, r.y, r.text) for r in units) == sorted(
        (r.experiment_id, r.unit_id, r.y, r.text) for r in kept)
    quarantine = read_table(spark, cfg, "quarantine").collect()
    assert Counter((q.raw_json, q.reason) for q in quarantine) == Counter(
        (r.raw_json, r.reason) for r in classified if r.reason is not None)
    assert run["reasons"] == dict(sorted(Counter(r.reason for r in classified if r.reason is not None).items()))
    assert run["inserted"] == len(kept) == run["accepted"]
    # a rerun of the same input changes nothing
    again = job.run(spark, cfg)
    assert again["inserted"] == 0 and again["unchanged"] == len(kept) and again["quarantined"] == run["quarantined"]
    assert len(read_table(spark, cfg, "quarantine").collect()) == len(quarantine)


def test_duplicates_are_resolved_with_one_shuffle(spark, tmp_path, capsys):
    """The keep rule's two window functions share one partitioning: the rows are shuffled once (main 7d1f51e
    shuffled and sorted every wide row twice: its partition flag was an expression, planned once per function)."""
    df = spark.createDataFrame(hostile_rows(), SCHEMA)
    classify_rows(df, map_columns(df.schema, config(tmp_path / "data"), "test")).explain()
    plan = capsys.readouterr().out
    assert plan.count("Exchange hashpartitioning(") == 1, plan
