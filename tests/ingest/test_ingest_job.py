"""The ingest job on small real Delta inputs: every reject reason, the invariant, idempotent and incremental reruns,
the changed-row rules and stable balanced folds.

One module-scoped lakehouse goes through four ingests (batch A, A again, B with update, C with keep); each test
asserts on the recorded results, so the module costs four Spark jobs, not one per test.
"""
from __future__ import annotations

import datetime as dt
import json
import math
from collections import Counter

import pytest
from pyspark.sql import types as T

from tokens2policy.config import ConfigError, load_config
from tokens2policy.ingest import REASONS
from tokens2policy.ingest import job
from tokens2policy.ingest.folds import fold_key_py
from tokens2policy.lakehouse import read_table, table_exists, table_version

SCHEMA = T.StructType([
    T.StructField("exp", T.StringType()),
    T.StructField("uid", T.StringType()),
    T.StructField("arm", T.StringType()),
    T.StructField("clicks", T.DoubleType()),
    T.StructField("minutes", T.StringType()),  # an outcome logged as text: exercises wrong_type
    T.StructField("title", T.StringType()),
    T.StructField("body", T.StringType()),
    T.StructField("age", T.StringType()),
    T.StructField("visits", T.LongType()),
    T.StructField("grp", T.StringType()),
    T.StructField("assigned_at", T.TimestampType()),
    T.StructField("measured_at", T.StringType()),
])
T0 = dt.datetime(2026, 1, 10, 12, 0, 0)
BEFORE = "2026-01-05 08:00:00"
N_FOLDS = 3


def good(experiment, i, **changes):
    """Row i of an experiment; keyword arguments replace fields (None included)."""
    row = dict(exp=experiment, uid=f"{experiment}-{i:03d}", arm="treated" if i % 2 else "control",
               clicks=float(i % 7), minutes=f"{(i * 1.5) % 11:.1f}",
               title=f"Headline {i}", body=f"Body of story {i} in {experiment}.", age=str(20 + i % 40), visits=i % 5,
               grp=f"g{i % 4}", assigned_at=T0 + dt.timedelta(minutes=i), measured_at=BEFORE)
    row.update(changes)
    return row


def batch_a():
    """40 good units (e1: 30, e2: 10) and one broken row per reason, plus duplicates."""
    rows = [good("e1", i) for i in range(30)] + [good("e2", i) for i in range(10)]
    bad = {  # uid -> (row, expected reason)
        "x-exp": (good("e1", 100, exp=None), "missing_experiment_id"),
        "x-uid-null": (good("e1", 101, uid=None), "missing_unit_id"),
        "x-uid-blank": (good("e1", 102, uid="   "), "missing_unit_id"),
        "x-arm": (good("e1", 103, uid="x-arm", arm="Treated?"), "bad_treatment"),
        "x-arm-null": (good("e1", 104, uid="x-arm-null", arm=None), "bad_treatment"),
        "x-minutes": (good("e1", 105, uid="x-minutes", minutes="abc"), "wrong_type"),
        "x-age": (good("e1", 106, uid="x-age", age="n/a"), "wrong_type"),
        "x-when": (good("e1", 107, uid="x-when", measured_at="yesterday"), "wrong_type"),
        "x-clicks-null": (good("e1", 108, uid="x-clicks-null", clicks=None), "missing_outcome"),
        "x-minutes-null": (good("e1", 109, uid="x-minutes-null", minutes=None), "missing_outcome"),
        "x-nan": (good("e1", 110, uid="x-nan", clicks=float("nan")), "non_finite_outcome"),
        "x-inf": (good("e1", 111, uid="x-inf", minutes="Infinity"), "non_finite_outcome"),
        "x-empty": (good("e1", 112, uid="x-empty", title="", body="  "), "empty_text"),
        "x-empty-null": (good("e1", 113, uid="x-empty-null", title=None, body=None), "empty_text"),
        "x-garbled": (good("e1", 114, uid="x-garbled", body="caf\ufffd au lait"), "non_decodable_text"),
        "x-visits": (good("e1", 115, uid="x-visits", visits=None), "missing_covariate"),
        "x-age-null": (good("e1", 116, uid="x-age-null", age=None), "missing_covariate"),
        "x-leak": (good("e1", 117, uid="x-leak", measured_at="2026-01-11 09:00:00"), "post_treatment_covariate"),
    }
    expected = Counter(reason for _, reason in bad.values())
    dups = [
        good("e1", 0),  # exact copy of e1-000 (a logging retry)
        good("e1", 1, clicks=99.0, assigned_at=T0 + dt.timedelta(days=1)),  # later copy of e1-001: loses
        good("e1", 2, clicks=2.0, title="Tie"),  # e1-002 twice with the same time: smallest raw JSON wins
        good("e2", 3, clicks=None),  # a broken copy of e2-003 never displaces the good one
    ]
    rows[2] = good("e1", 2, clicks=1.0, title="Tie")
    expected["duplicate_unit_id"] += 3
    expected["missing_outcome"] += 1
    all_rows = [dups[2]] + rows + [r for r, _ in bad.values()] + dups[:2] + dups[3:]
    return all_rows, expected


def write_source(spark, path, rows):
    spark.createDataFrame([tuple(r[f.name] for f in SCHEMA.fields) for r in rows], SCHEMA) \
        .write.format("delta").mode("overwrite").save(str(path))


def config(data_dir, path, *extra):
    return load_config(None, [
        f"data_dir={data_dir}", "source.kind=delta", f"source.path={path}", "source.experiment_id_col=exp",
        "source.unit_id_col=uid", "source.treatment_col=arm", "source.treatment_labels=[control, treated]",
        "source.outcome_cols=[clicks, minutes]", "source.text_cols=[title, body]", "source.covariate_cols=[age, visits]",
        "source.cluster_col=grp", "source.assigned_at_col=assigned_at", "source.measured_at_col=measured_at",
        f"ingest.n_folds={N_FOLDS}", "ingest.expected_treated_share=0.5", *extra])


def snapshot(spark, cfg, name):
    return sorted((tuple(r) for r in read_table(spark, cfg, name).collect()), key=repr)


@pytest.fixture(scope="module")
def lake(spark, tmp_path_factory):
    """Four ingests into one lakehouse; every result and snapshot recorded for the tests."""
    root = tmp_path_factory.mktemp("ingest_job")
    data, src = root / "data", root / "src"
    rows_a, expected = batch_a()
    write_source(spark, src / "a", rows_a)
    out = {"rows_a": rows_a, "expected": expected}
    cfg = config(data, src / "a")
    out["cfg"] = cfg
    out["run_a"] = job.run(spark, cfg)
    out["units_a"] = snapshot(spark, cfg, "units")
    out["quarantine_a"] = read_table(spark, cfg, "quarantine").collect()
    out["versions_a"] = (table_version(spark, cfg, "units"), table_version(spark, cfg, "quarantine"))
    out["rerun_a"] = job.run(spark, cfg)
    out["units_a2"] = snapshot(spark, cfg, "units")
    out["quarantine_a2"] = snapshot(spark, cfg, "quarantine")
    out["versions_a2"] = (table_version(spark, cfg, "units"), table_version(spark, cfg, "quarantine"))

    # batch B: 12 new e1 units, one changed row (e1-005 clicks), one unchanged row (e1-006); latest wins
    rows_b = [good("e1", i) for i in range(200, 212)] + [good("e1", 5, clicks=42.0), good("e1", 6)]
    write_source(spark, src / "b", rows_b)
    cfg_b = config(data, src / "b", "ingest.on_changed_row=update")
    out["run_b"] = job.run(spark, cfg_b)
    out["units_b"] = {r.unit_id: r for r in read_table(spark, cfg, "units").collect()}

    # batch C: e1-007 changed, first ingest wins
    write_source(spark, src / "c", [good("e1", 7, clicks=-5.0)])
    cfg_c = config(data, src / "c", "ingest.on_changed_row=keep")
    out["run_c"] = job.run(spark, cfg_c)
    out["units_c"] = {r.unit_id: r for r in read_table(spark, cfg, "units").collect()}
    out["quarantine_c"] = read_table(spark, cfg, "quarantine").collect()
    return out


def test_every_reject_reason_is_quarantined_with_its_code(lake):
    got = Counter(r.reason for r in lake["quarantine_a"])
    assert got == lake["expected"]
    assert lake["run_a"]["reasons"] == dict(lake["expected"])
    # every reason appears in batch A except the keep-rule conflict (batch C's) and malformed_line, which only a
    # CSV/JSON source can produce (batch A is a Delta table; tests/ingest/test_source_semantics.py covers it)
    assert set(got) == set(REASONS) - {"conflicts_with_stored", "malformed_line"}
    assert all(r.message for r in lake["quarantine_a"])
    by_uid = {r.unit_id: r for r in lake["quarantine_a"]}
    assert "'minutes'" in by_uid["x-minutes"].message and "'age'" in by_uid["x-age"].message
    assert "Treated?" in by_uid["x-arm"].message


def test_quarantine_keeps_the_original_row(lake):
    originals = {}
    for r in lake["rows_a"]:
        originals.setdefault((r["exp"], r["uid"], r["clicks"] if r["clicks"] == r["clicks"] else "nan"), []).append(r)
    for q in lake["quarantine_a"]:
        raw = json.loads(q.raw_json.replace(":NaN", ':"NaN"'))
        assert set(raw) == set(SCHEMA.names)  # nulls kept, nothing added
        clicks = raw["clicks"] if raw["clicks"] != "NaN" else "nan"
        candidates = originals[(raw["exp"], raw["uid"], clicks)]
        assert any(all(raw[k] == c[k] for k in ("arm", "minutes", "title", "body", "age", "visits", "grp",
                                                "measured_at")) for c in candidates)
    assert json.loads([q for q in lake["quarantine_a"] if q.unit_id == "x-minutes"][0].raw_json)["minutes"] == "abc"


def test_invariant_and_units_contract(lake, spark):
    run = lake["run_a"]
    n_in = len(lake["rows_a"])
    assert run["rows_in"] == n_in == run["accepted"] + run["quarantined"]
    assert run["accepted"] == 40 and run["inserted"] == 40
    assert run["experiments"]["e1"]["accepted"] == 30 and run["experiments"]["e2"]["accepted"] == 10
    units = {(r[0], r[1]): r for r in lake["units_a"]}
    assert len(units) == 40
    expected_cols = ["experiment_id", "unit_id", "treatment", "clicks", "minutes", "text", "age", "visits",
                     "cluster", "fold"]
    assert read_table(spark, lake["cfg"], "units").columns == expected_cols
    u = units[("e1", "e1-003")]
    assert u[2] == 1 and u[3] == 3.0 and u[4] == 4.5 and u[5] == "Headline 3\n\nBody of story 3 in e1."
    assert u[6] == 23.0 and u[7] == 3.0 and u[8] == "g3"
    assert units[("e1", "e1-004")][2] == 0


def test_duplicate_keep_rule(lake):
    units = {(r[0], r[1]): r for r in lake["units_a"]}
    assert units[("e1", "e1-001")][3] == 1.0  # earliest assignment kept, not the later clicks=99 copy
    assert units[("e1", "e1-002")][3] == 1.0  # same time: smallest raw JSON (clicks 1.0 < 2.0), whatever the order
    assert units[("e2", "e2-003")][3] == 3.0  # the broken copy went to the quarantine as missing_outcome
    dups = {r.unit_id: r.message for r in lake["quarantine_a"] if r.reason == "duplicate_unit_id"}
    assert set(dups) == {"e1-000", "e1-001", "e1-002"}
    assert "exact copy" in dups["e1-000"] and "differs" in dups["e1-001"]


def test_rerun_of_the_same_input_changes_nothing(lake):
    rerun = lake["rerun_a"]
    assert lake["versions_a2"] == lake["versions_a"]  # no Delta commit at all
    assert lake["units_a2"] == lake["units_a"]
    assert rerun["inserted"] == 0 and rerun["updated"] == 0 and rerun["unchanged"] == 40
    assert rerun["quarantined"] == lake["run_a"]["quarantined"]
    assert len(lake["quarantine_a2"]) == len(lake["quarantine_a"])


def test_incremental_batch_adds_rows_and_updates_the_changed_one(lake):
    run = lake["run_b"]
    assert (run["rows_in"], run["inserted"], run["updated"], run["unchanged"], run["quarantined"]) == (14, 12, 1, 1, 0)
    units = lake["units_b"]
    assert len(units) == 52
    assert units["e1-005"].clicks == 42.0  # latest wins
    before = {r[1]: r[-1] for r in lake["units_a"]}
    assert all(units[uid].fold == f for uid, f in before.items())  # stored folds never move


def test_keep_rule_quarantines_the_changed_row(lake):
    run = lake["run_c"]
    assert (run["rows_in"], run["inserted"], run["updated"], run["quarantined"]) == (1, 0, 0, 1)
    assert run["reasons"] == {"conflicts_with_stored": 1}
    assert lake["units_c"]["e1-007"].clicks == lake["units_b"]["e1-007"].clicks == 0.0
    conflict = [q for q in lake["quarantine_c"] if q.reason == "conflicts_with_stored"]
    assert len(conflict) == 1 and conflict[0].unit_id == "e1-007" and "-5.0" in conflict[0].raw_json


def test_folds_are_the_documented_hash_rule_and_balanced(lake):
    seed = lake["cfg"].ingest.fold_seed
    units = list(lake["units_a"])
    by_arm = {}
    for r in units:
        by_arm.setdefault((r[0], r[2]), []).append(r)
    for arm_rows in by_arm.values():
        ranked = sorted(arm_rows, key=lambda r: (fold_key_py(r[0], r[1], seed), r[1]))
        assert [r[-1] for r in ranked] == [i % N_FOLDS for i in range(len(ranked))]
    # after the incremental batch every arm's folds still differ in size by at most one
    arms = Counter((u.experiment_id, u.treatment, u.fold) for u in lake["units_c"].values())
    for exp, t in {(e, t) for e, t, _ in arms}:
        sizes = [arms[(exp, t, f)] for f in range(N_FOLDS)]
        assert max(sizes) - min(sizes) <= 1


def test_balance_report_and_mlflow_counts(lake):
    import mlflow

    bal = lake["run_a"]["balance"]["e1"]
    assert bal["n"] == 30 and bal["n_treated"] == 15 and bal["treated_share"] == 0.5
    ages1 = [20 + i % 40 for i in range(30) if i % 2]
    ages0 = [20 + i % 40 for i in range(30) if not i % 2]
    m1, m0 = sum(ages1) / 15, sum(ages0) / 15
    v1 = sum((a - m1) ** 2 for a in ages1) / 14
    v0 = sum((a - m0) ** 2 for a in ages0) / 14
    assert bal["smd"]["age"] == pytest.approx((m1 - m0) / math.sqrt((v1 + v0) / 2))
    assert lake["run_a"]["warnings"] == []
    from tokens2policy.tracking import configure_mlflow

    exp_id = configure_mlflow(lake["cfg"])
    runs = mlflow.search_runs([exp_id], filter_string="tags.`t2p.stage` = 'ingest'", order_by=["start_time ASC"])
    first = runs.iloc[0]
    assert first["metrics.rows_in"] == len(lake["rows_a"])
    assert first["metrics.quarantine.wrong_type"] == 3
    assert first["metrics.experiment.e1.accepted"] == 30


def test_broken_randomization_warns(spark):
    from tokens2policy.config import IngestConfig
    from tokens2policy.ingest.balance import balance_stats, randomization_check

    # 9:1 treated, treated units old and control units young; visits balanced by construction
    rows = [("e9", 1 if i < 36 else 0, float(60 + i % 3 if i < 36 else 20 + i % 3), float(i % 2)) for i in range(40)]
    rows += [("ok", i % 2, float(i % 7), float(i % 3)) for i in range(400)]
    df = spark.createDataFrame(rows, "experiment_id string, treatment int, age double, visits double")
    stats = balance_stats(df, ["age", "visits"])
    report, warnings = randomization_check(stats, IngestConfig(), expected_share=0.5)
    text = " ".join(warnings)
    assert "experiment 'e9': treated share 0.9000" in text and "'e9': covariate 'age'" in text
    assert "'visits'" not in text and "'ok'" not in text
    assert report["e9"]["share_z"] == pytest.approx((0.9 - 0.5) / math.sqrt(0.25 / 40))
    assert report["ok"]["smd"]["age"] == pytest.approx(0.0, abs=0.1)
    _, none = randomization_check(stats, IngestConfig(), expected_share=None)  # share reported, not tested
    assert not any("treated share" in w for w in none)


def test_unmappable_schema_is_one_line_error_and_writes_nothing(spark, tmp_path):
    rows, _ = batch_a()
    write_source(spark, tmp_path / "src", rows[:5])
    cfg = config(tmp_path / "data", tmp_path / "src", "source.treatment_col=variant")
    with pytest.raises(ConfigError) as err:
        job.run(spark, cfg)
    msg = str(err.value)
    assert "'variant'" in msg and "source.treatment_col" in msg and "\n" not in msg
    cfg2 = config(tmp_path / "data", tmp_path / "src", "source.text_cols=[visits]")
    with pytest.raises(ConfigError, match="'visits' has type bigint"):
        job.run(spark, cfg2)
    assert not table_exists(spark, cfg, "units") and not table_exists(spark, cfg, "quarantine")
    assert not (tmp_path / "data" / "mlflow").exists()
