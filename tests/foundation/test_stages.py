"""The stage runner on two small real stages: skip when up to date, rerun on change or --force, resume after failure."""
import pytest
from pyspark.sql import functions as F

from tokens2policy.lakehouse import read_table, table_version, write_table
from tokens2policy.stages import Stage, run_stages

A = Stage("a", (), ("t_a",), ("ingest",))
B = Stage("b", ("t_a",), ("t_b",), ("identify",))


def _resolver(spark, calls, fail_b=False):
    def stage_a(spark_, cfg):
        calls.append("a")
        write_table(spark_.range(cfg.ingest.n_folds).withColumnRenamed("id", "x"), cfg, "t_a")
        return {"rows": cfg.ingest.n_folds}

    def stage_b(spark_, cfg):
        calls.append("b")
        if fail_b:
            raise RuntimeError("injected failure")
        write_table(read_table(spark_, cfg, "t_a").withColumn("y", F.col("x") * 2), cfg, "t_b")
        return {}

    return {"a": stage_a, "b": stage_b}.__getitem__


def _run(spark, cfg, calls, **kw):
    fail_b = kw.pop("fail_b", False)
    echo = kw.pop("echo", lambda m: None)
    return run_stages(spark, cfg, ["a", "b"], stages=(A, B), resolve=_resolver(spark, calls, fail_b),
                      echo=echo, **kw)


def test_skip_rerun_force_and_resume(spark, make_cfg):
    cfg = make_cfg("ingest.n_folds=3")
    calls = []
    _run(spark, cfg, calls)
    assert calls == ["a", "b"]
    _run(spark, cfg, calls)
    assert calls == ["a", "b"], "unchanged inputs and config: both stages skipped"
    _run(spark, cfg, calls, force=["b"])
    assert calls == ["a", "b", "b"]
    # a config change in a's section reruns a; its new output version makes b stale too
    cfg4 = make_cfg("ingest.n_folds=4")
    _run(spark, cfg4, calls)
    assert calls == ["a", "b", "b", "a", "b"]
    # a change in a section no stage reads reruns nothing
    _run(spark, make_cfg("ingest.n_folds=4", "report.n_examples=9"), calls)
    assert calls == ["a", "b", "b", "a", "b"]


def test_failure_keeps_earlier_outputs_and_rerun_resumes(spark, make_cfg):
    cfg = make_cfg()
    calls = []
    with pytest.raises(RuntimeError, match="injected failure"):
        _run(spark, cfg, calls, fail_b=True)
    assert read_table(spark, cfg, "t_a").count() == cfg.ingest.n_folds
    runs = {r.stage: r.status for r in read_table(spark, cfg, "stage_runs").collect()}
    assert runs == {"a": "success", "b": "failed"}
    version_a = table_version(spark, cfg, "t_a")
    _run(spark, cfg, calls)
    assert calls == ["a", "b", "b"], "a is up to date and skipped; b resumes"
    assert table_version(spark, cfg, "t_a") == version_a
    assert read_table(spark, cfg, "t_b").count() == cfg.ingest.n_folds


def test_progress_names_position_and_eta_from_last_runs(spark, make_cfg):
    cfg = make_cfg()
    calls, lines = [], []
    _run(spark, cfg, calls, echo=lines.append)
    assert "[t2p] stage 1/2 a: running" in lines and "[t2p] stage 2/2 b: running" in lines, lines
    lines.clear()
    _run(spark, cfg, calls, echo=lines.append, force=["all"])
    seconds = {r.stage: r.seconds for r in read_table(spark, cfg, "stage_runs").where("status = 'success'")
               .orderBy("finished_at").collect()[:2]}
    started = [m for m in lines if ": running" in m]
    assert started[0].startswith("[t2p] stage 1/2 a: running (ETA for the remaining 2 stage(s) ≈ ")
    assert f"≈ {seconds['a'] + seconds['b']:.0f}s" in started[0]
    assert f"≈ {seconds['b']:.0f}s" in started[1]
