"""What `t2p status` and the run summary say about stages: the runner's own skip reason and every stage's time."""
import pytest

from tokens2policy.lakehouse import read_table, write_table
from tokens2policy.stages import Stage, run_stages, stale_reason

A = Stage("a", (), ("t_a",), ("ingest",))
B = Stage("b", ("t_a",), ("t_b",), ("identify",))


def _resolver(calls):
    def stage_a(ctx):  # a stage job: main(ctx) (tokens2policy.context)
        spark_, cfg = ctx.spark, ctx.config
        calls.append("a")
        write_table(spark_.range(cfg.ingest.n_folds).withColumnRenamed("id", "x"), cfg, "t_a")
        # a stage may report its own phase timings under "seconds" (represent, effects and policy do)
        return {"rows": cfg.ingest.n_folds, "seconds": {"train": 0.5, "write": 0.25}}

    def stage_b(ctx):
        spark_, cfg = ctx.spark, ctx.config
        calls.append("b")
        write_table(read_table(spark_, cfg, "t_a"), cfg, "t_b")
        return {}

    return {"a": stage_a, "b": stage_b}.__getitem__


def _run(spark, cfg, calls, lines=None, **kw):
    return run_stages(spark, cfg, ["a", "b"], stages=(A, B), resolve=_resolver(calls),
                      echo=(lines.append if lines is not None else (lambda m: None)), **kw)


def test_every_stage_that_ran_has_its_time_in_the_summary(spark, make_cfg):
    """Failed before the fix: a stage's own "seconds" (phase timings) replaced the runner's wall time, so the
    summary printed "a: ran" without a time (represent did this in the demo)."""
    from tokens2policy.report.summary import summary_lines

    cfg = make_cfg()
    results = _run(spark, cfg, [])
    seconds = {r.stage: r.seconds for r in read_table(spark, cfg, "stage_runs").collect()}
    by_stage = {r["stage"]: r for r in results}
    assert isinstance(by_stage["a"]["seconds"], float)
    assert by_stage["a"]["seconds"] == pytest.approx(seconds["a"], abs=0.5)
    assert by_stage["a"]["phase_seconds"] == {"train": 0.5, "write": 0.25}  # the stage's own timings are kept
    line = next(l for l in summary_lines({}, results) if l.startswith("stages: "))
    assert f"a: ran in {by_stage['a']['seconds']:.1f}s" in line and f"b: ran in {by_stage['b']['seconds']:.1f}s" \
        in line, line


def test_stale_reason_is_the_skip_rule(spark, make_cfg):
    cfg = make_cfg("ingest.n_folds=3")
    assert stale_reason(spark, cfg, A) == "never ran successfully"
    calls, lines = [], []
    _run(spark, cfg, calls, lines)
    assert "[t2p] a: must run: never ran successfully" in lines
    assert stale_reason(spark, cfg, A) is None and stale_reason(spark, cfg, B) is None
    # a new version of b's input written outside the runner: b is stale and says which version it saw and which
    # exists now; a is stale too (its output is no longer the one its last success recorded) and rewrites it
    write_table(spark.range(2).withColumnRenamed("id", "x"), cfg, "t_a")
    assert stale_reason(spark, cfg, B) == "inputs changed: t_a 0 → 1"
    assert stale_reason(spark, cfg, A) == "outputs changed since its last success: t_a 0 → 1"
    lines.clear()
    _run(spark, cfg, calls, lines)
    assert calls == ["a", "b", "a", "b"]  # both rerun, each for the reason shown
    assert "[t2p] a: must run: outputs changed since its last success: t_a 0 → 1" in lines
    assert "[t2p] b: must run: inputs changed: t_a 0 → 2" in lines
    # a config change in a's sections
    cfg4 = make_cfg("ingest.n_folds=4")
    assert stale_reason(spark, cfg4, A) == "config changed (sections ingest or seed)"
    # a missing output
    from tokens2policy.lakehouse import table_location
    import shutil

    shutil.rmtree(table_location(cfg, "t_b"))
    assert stale_reason(spark, cfg, B) == "outputs changed since its last success: t_b 1 → missing"
    lines.clear()
    _run(spark, cfg, calls, lines, force=["a"])
    assert "[t2p] a: must run: forced (--force a)" in lines
