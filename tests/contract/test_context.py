"""The stage context on real Spark + Delta: declared config and tables only, inputs read as of their pinned
versions (also through the lakehouse helpers a job body calls), writes checked against the registry."""
import pandas as pd
import pytest
from pyspark.sql import Row

from tokens2policy.context import ConfigView, UndeclaredAccessError, UnitColumns, run_stage_job
from tokens2policy.lakehouse import read_table, table_exists, table_version, write_table
from tokens2policy.lakehouse.schemas import SchemaContractError
from tokens2policy.stages import Stage, run_stages


def test_config_view_answers_declared_sections_and_keys_only(cfg):
    view = ConfigView(cfg, ("identify", "ingest.smd_warn"), "toy")
    assert view.identify.alpha == cfg.identify.alpha
    assert view.ingest.smd_warn == cfg.ingest.smd_warn
    assert view.seed == cfg.seed and view.data_path == cfg.data_path  # where things are: always readable
    with pytest.raises(UndeclaredAccessError, match="stage 'toy' read config section 'effects'"):
        view.effects
    with pytest.raises(UndeclaredAccessError, match="read config key 'ingest.n_folds'"):
        view.ingest.n_folds
    with pytest.raises(AttributeError):
        view.no_such_section
    assert view.reads == {"identify", "ingest.smd_warn"}
    assert set(view.to_dict()) == {"data_dir", "seed", "identify", "ingest"}
    assert view.to_dict()["ingest"] == {"smd_warn": cfg.ingest.smd_warn}


def test_a_job_reading_an_undeclared_section_or_table_fails_and_is_recorded_failed(spark, make_cfg):
    cfg = make_cfg()
    write_table(spark.range(3), cfg, "t_in")
    stage = Stage("nosy", ("t_in",), ("t_out",), ("identify",), tracked=False)

    def reads_effects(ctx):
        return {"x": ctx.config.effects.alpha}

    def reads_other_table(ctx):
        ctx.read("t_in")
        return {"n": read_table(ctx.spark, ctx.config, "t_other").count()}  # via the lakehouse helper

    def writes_other_table(ctx):
        write_table(ctx.spark.range(1), ctx.config, "t_elsewhere")

    for job, message in ((reads_effects, "read config section 'effects'"),
                         (reads_other_table, "read table 't_other', which it does not declare"),
                         (writes_other_table, "wrote table 't_elsewhere', which is not one of its outputs")):
        with pytest.raises(UndeclaredAccessError, match=message):
            run_stages(spark, cfg, ["nosy"], stages=(stage,), resolve=lambda name, job=job: job, echo=lambda m: None)
    assert not table_exists(spark, cfg, "t_elsewhere")
    runs = [r.status for r in read_table(spark, cfg, "stage_runs").collect()]
    assert runs == ["failed"] * 3


def test_inputs_are_read_as_of_the_pinned_version(spark, make_cfg):
    """A commit to an input after the runner pinned it (a concurrent writer) is not what the stage reads — also
    not through ``read_table(spark, cfg, name)`` or ``table_version`` inside the job body."""
    cfg = make_cfg()
    write_table(spark.range(3), cfg, "t_in")
    pinned = table_version(spark, cfg, "t_in")
    stage = Stage("reader", ("t_in",), ("t_out",), (), tracked=False)
    seen = {}

    def job(ctx):
        write_table(spark.range(10), cfg, "t_in")  # someone else commits a new version (plain config)
        seen["ctx"] = ctx.read("t_in").count()
        seen["helper"] = read_table(ctx.spark, ctx.config, "t_in").count()
        seen["version"] = table_version(ctx.spark, ctx.config, "t_in")
        ctx.write("t_out", ctx.read("t_in"))
        return {}

    result = run_stage_job(spark, cfg, stage, job)
    assert seen == {"ctx": 3, "helper": 3, "version": pinned}
    assert read_table(spark, cfg, "t_out").count() == 3
    assert result.output_versions == {"t_out": table_version(spark, cfg, "t_out")}
    assert result.tables_read == {"t_in"}


def test_writes_are_checked_against_the_registry_and_frames_built_from_it(spark, make_cfg):
    cfg = make_cfg()
    stage = Stage("stats", (), ("neuron_stats", "policy_value"), (), tracked=False)

    def bad(ctx):
        ctx.write("neuron_stats", ctx.spark.createDataFrame([(1, 2)], "neuron int, n_active int"))

    with pytest.raises(SchemaContractError, match="missing .*activation_frequency.*n_active is int, not bigint"):
        run_stage_job(spark, cfg, stage, bad)
    assert not table_exists(spark, cfg, "neuron_stats")

    def good(ctx):
        pdf = pd.DataFrame({"neuron": [0, 1], "n_active": [5, 0], "activation_frequency": [0.5, float("nan")],
                            "mean_activation": [0.1, 0.0], "mean_activation_when_active": [0.2, 0.0],
                            "ignored": ["x", "y"]})
        ctx.write("neuron_stats", ctx.frame("neuron_stats", pdf))
        return {}

    run_stage_job(spark, cfg, stage, good)
    got = read_table(spark, cfg, "neuron_stats").orderBy("neuron").collect()
    assert [r.n_active for r in got] == [5, 0] and got[1].activation_frequency is None  # NaN stored as null
    assert dict(read_table(spark, cfg, "neuron_stats").dtypes)["n_active"] == "bigint"


def test_write_experiments_replaces_only_those_experiments_rows(spark, make_cfg):
    cfg = make_cfg()
    stage = Stage("t", (), ("t_exp",), (), tracked=False)

    def write(rows, exps):
        run_stage_job(spark, cfg, stage, lambda ctx: ctx.write_experiments(
            "t_exp", ctx.spark.createDataFrame(rows, "experiment_id string, v int"), exps))

    write([("a", 1), ("a", 2)], ["a"])
    write([("b", 3)], ["b"])
    write([("a", 9)], ["a"])
    hostile = "o'x\\"  # a quote and a backslash: escaped in the predicate, never raw SQL text
    write([(hostile, 5)], [hostile])
    write([("o'x", 7)], ["o'x"])
    write([(hostile, 6)], [hostile])
    got = sorted((r.experiment_id, r.v) for r in read_table(spark, cfg, "t_exp").collect())
    assert got == [("a", 9), ("b", 3), ("o'x", 7), (hostile, 6)]



def test_write_experiment_tables_replaces_those_experiments_and_raises_after_every_write_ended(spark, make_cfg):
    """The concurrent writes of several tables replace exactly these experiments' rows in each (as one
    write_experiments call per table would: the expected rows are written out below); a failing write (here: a row
    the Python worker refuses while the frame is written) is raised once the others have committed — none is
    abandoned, and the failed table is untouched."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import IntegerType

    names = ("t_w1", "t_w2", "t_w3", "t_w4")
    hostile = "o'x\\"
    stage = Stage("t", (), names, (), tracked=False)
    schema = "experiment_id string, v int"
    seeds = {n: [("a", i), ("b", 10 + i), (hostile, 20 + i)] for i, n in enumerate(names)}
    updates = {n: [("a", 100 + i), (hostile, 200 + i), (hostile, 300 + i)] for i, n in enumerate(names)}

    def run(cfg, rows, exps):
        run_stage_job(spark, cfg, stage, lambda ctx: ctx.write_experiment_tables(
            [(n, ctx.spark.createDataFrame(rows[n], schema)) for n in names], exps))

    together = make_cfg()
    run(together, seeds, ["a", "b", hostile])
    run(together, updates, ["a", hostile])  # b's rows stay
    for n in names:
        got = sorted(tuple(r) for r in read_table(spark, together, n).collect())
        i = names.index(n)
        assert got == sorted([("a", 100 + i), ("b", 10 + i), (hostile, 200 + i), (hostile, 300 + i)])

    @F.udf(IntegerType())
    def refuse(v):
        if v == 13:
            raise ValueError("row 13 refused")
        return v

    before = {n: table_version(spark, together, n) for n in names}

    def failing(ctx):
        frames = [(n, ctx.spark.createDataFrame([("a", 13 if n == "t_w3" else 1)], schema)
                   .withColumn("v", refuse("v"))) for n in names]
        ctx.write_experiment_tables(frames, ["a"])

    with pytest.raises(Exception, match="row 13 refused"):
        run_stage_job(spark, together, stage, failing)
    after = {n: table_version(spark, together, n) for n in names}
    assert after == {n: before[n] + (n != "t_w3") for n in names}, "the other three committed, t_w3 did not"
    assert sorted(tuple(r) for r in read_table(spark, together, "t_w3").collect()) == \
        sorted([("a", 102), ("b", 12), (hostile, 202), (hostile, 302)])

def test_unit_columns_contract():
    from pyspark.sql import types as T

    schema = T.StructType([T.StructField(n, t) for n, t in (
        ("experiment_id", T.StringType()), ("unit_id", T.LongType()), ("treatment", T.IntegerType()),
        ("y", T.DoubleType()), ("age", T.DoubleType()), ("region", T.StringType()), ("cluster", T.StringType()))])
    u = UnitColumns.resolve(schema, ["y", "not_there"], ["age", "region", "gone"])
    assert u.outcomes == ("y",) and u.covariates == ("age", "region") and u.numeric_covariates == ("age",)
    assert u.cluster == "cluster" and u.key_types == {"experiment_id": "string", "unit_id": "bigint"}
    with pytest.raises(ValueError, match="none of the outcome columns"):
        UnitColumns.resolve(schema, ["z"], [])
    # a table written by hand with an `outcome` column works without configuring it
    with_outcome = T.StructType(schema.fields + [T.StructField("outcome", T.DoubleType())])
    assert UnitColumns.resolve(with_outcome, ["z"], []).outcomes == ("outcome",)


def test_stage_run_logs_inputs_outputs_and_timings(spark, make_cfg):
    import mlflow

    cfg = make_cfg()
    write_table(spark.createDataFrame([Row(x=1)]), cfg, "t_in")
    stage = Stage("identify", ("t_in",), ("t_out",), ("identify",))  # tracked: an MLflow run named like a stage

    def job(ctx):
        with ctx.clock.timed("copy"):
            ctx.write("t_out", ctx.read("t_in"))
        ctx.new_clock("exp_a").lap("load")
        ctx.log_metrics({"rows": 1, "bad": float("nan"), "weird key!": 2})
        return {}

    result = run_stage_job(spark, cfg, stage, job)
    run = mlflow.MlflowClient().get_run(result.run_id)
    assert run.data.params["input_version.t_in"] == "0"
    assert run.data.tags["output_version.t_out"] == "0"
    assert {"rows", "weird key_", "seconds.copy", "seconds.exp_a.load"} <= set(run.data.metrics)
    assert "bad" not in run.data.metrics


def test_a_table_written_by_an_older_version_gets_the_new_columns_or_a_one_line_error(spark, make_cfg):
    """Appending to a registered table whose stored schema lacks a column the contract has since gained (a
    lakehouse written by an older tokens2policy) adds the column, old rows null; a difference that is not an
    addition (a column dropped or retyped) is refused in one line naming it. Before: Delta's multi-line
    DELTA_METADATA_MISMATCH for both (validation_runs gained any_false)."""
    from tokens2policy.lakehouse.schemas import table_spec

    cfg = make_cfg()
    spec = table_spec("neuron_stats")
    full = {"neuron": [0], "n_active": [5], "activation_frequency": [0.5], "mean_activation": [0.1],
            "mean_activation_when_active": [0.2]}
    stage = Stage("stats", (), ("neuron_stats",), (), tracked=False)

    def frame(ctx, pdf):
        return ctx.frame("neuron_stats", pd.DataFrame(pdf))

    run_stage_job(spark, cfg, stage, lambda ctx: ctx.write("neuron_stats", frame(ctx, full)) or {})
    old_cols = [c for c in spec.column_names if c != "mean_activation_when_active"]
    old = read_table(spark, cfg, "neuron_stats").select(*old_cols)
    write_table(old, cfg, "neuron_stats", overwrite_schema=True)  # as an older version stored it
    lines = []
    run_stage_job(spark, cfg, stage, lambda ctx: ctx.write("neuron_stats", frame(ctx, dict(full, neuron=[1])),
                                                           mode="append") or {}, echo=lines.append)
    got = sorted(read_table(spark, cfg, "neuron_stats").collect(), key=lambda r: r.neuron)
    assert [(r.neuron, r.mean_activation_when_active) for r in got] == [(0, None), (1, 0.2)]
    assert any("adding column(s) mean_activation_when_active" in m for m in lines)

    from pyspark.sql import functions as F

    retyped = read_table(spark, cfg, "neuron_stats").withColumn("n_active", F.col("n_active").cast("string"))
    write_table(retyped.select(*spec.column_names), cfg, "neuron_stats", overwrite_schema=True)
    with pytest.raises(SchemaContractError, match=r"types changed: n_active string -> bigint"):
        run_stage_job(spark, cfg, stage, lambda ctx: ctx.write("neuron_stats", frame(ctx, full), mode="append"))
