"""The stage runner on two small real stages: skip when up to date, rerun on change or --force, resume after failure,
rerun when an output is no longer at the version the last success recorded."""
import json
import sys
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from tokens2policy.lakehouse import read_table, table_version, write_table
from tokens2policy.stages import run_stages

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "contract"))
from toy_pipeline import A, B, JOBS  # noqa: E402


def _resolver(calls, fail_b=False):
    def stage_a(ctx):
        calls.append("a")
        return JOBS["a"](ctx)

    def stage_b(ctx):
        calls.append("b")
        if fail_b:
            raise RuntimeError("injected failure")
        return JOBS["b"](ctx)

    return {"a": stage_a, "b": stage_b}.__getitem__


def _run(spark, cfg, calls, **kw):
    fail_b = kw.pop("fail_b", False)
    echo = kw.pop("echo", lambda m: None)
    return run_stages(spark, cfg, ["a", "b"], stages=(A, B), resolve=_resolver(calls, fail_b), echo=echo, **kw)


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


def test_records_output_versions_and_reruns_a_stage_whose_output_moved(spark, make_cfg):
    """A stage half-rewritten (here: one of b's two outputs overwritten behind the runner's back, as a `--force b`
    killed between its two commits leaves it) is not up to date, although its inputs and config are unchanged.
    Before output versions were recorded, the runner skipped it."""
    cfg = make_cfg()
    calls = []
    _run(spark, cfg, calls)
    last = {r.stage: r for r in read_table(spark, cfg, "stage_runs").where("status = 'success'").collect()}
    assert json.loads(last["b"].output_versions) == {"t_b": table_version(spark, cfg, "t_b"),
                                                    "t_b2": table_version(spark, cfg, "t_b2")}
    assert json.loads(last["b"].input_versions) == {"t_a": table_version(spark, cfg, "t_a")}
    # a new t_b with the old t_b2: what a --force b killed after its first commit leaves behind
    write_table(read_table(spark, cfg, "t_b").withColumn("y", F.lit(-1).cast("long")), cfg, "t_b")
    _run(spark, cfg, calls)
    assert calls == ["a", "b", "b"], "a skipped, b reruns"
    assert sorted(r.y for r in read_table(spark, cfg, "t_b").collect()) == \
        [x * cfg.identify.max_rounds for x in range(cfg.ingest.n_folds)]
    _run(spark, cfg, calls)
    assert calls == ["a", "b", "b"]


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
