"""The Python API and the read-only CLI views (`t2p status`, `tables`, `show`) on a real Delta lakehouse.

The stage runner records real runs in `stage_runs` (here of stand-in stage bodies, so that the test stays fast);
`status` must give the runner's own verdict and reason, `tables` Delta's own versions and operations.
"""
import subprocess
import sys

import pandas as pd
import pytest

from tokens2policy.lakehouse import read_table, table_version, write_table
from tokens2policy.stages import STAGES, run_stages

UNITS = pd.DataFrame({"experiment_id": "e1", "unit_id": [f"u{i}" for i in range(40)],
                      "treatment": [i % 2 for i in range(40)], "engagement": [float(i) for i in range(40)],
                      "text": ["a long text " * 20] * 40, "tenure_days": [float(i % 7) for i in range(40)]})


def _stand_in_ingest(ctx):
    ctx.write("units", ctx.spark.createDataFrame(UNITS), check_schema=False)
    ctx.write("quarantine", ctx.frame("quarantine", []))
    return {"units": len(UNITS), "seconds": {"read": 0.1}}


def _ingest(spark, cfg):
    return run_stages(spark, cfg, ["ingest"], stages=STAGES, resolve={"ingest": _stand_in_ingest}.__getitem__,
                      echo=lambda m: None)


def test_importing_the_package_loads_no_engine():
    code = ("import sys, tokens2policy as t; t.__all__; "
            "print(sorted(m for m in ('pyspark', 'torch', 'sklearn', 'mlflow', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_status_says_what_the_runner_would_do(spark, make_cfg):
    import tokens2policy as t2p

    cfg = make_cfg()
    st = t2p.status(cfg, spark=spark).set_index("stage")
    assert list(st.index) == [s.name for s in STAGES]
    assert (st["status"] == "never ran").all() and (st["state"] == "stale: never ran successfully").all()
    _ingest(spark, cfg)
    st = t2p.status(cfg, spark=spark).set_index("stage")
    run = read_table(spark, cfg, "stage_runs").collect()[0]
    assert st.loc["ingest", "status"] == "success" and bool(st.loc["ingest", "up_to_date"])
    assert st.loc["ingest", "seconds"] == pytest.approx(run.seconds)
    assert st.loc["ingest", "inputs"] == "source@demo"
    assert st.loc["embed", "state"] == "stale: never ran successfully"
    # a version of units that ingest did not write: ingest's recorded output version no longer holds
    write_table(spark.createDataFrame(UNITS), cfg, "units", mode="append")
    assert t2p.status(cfg, spark=spark).set_index("stage").loc["ingest", "state"] == \
        "stale: outputs changed since its last success: units 0 → 1"
    # a config change in ingest's sections
    st = t2p.status(cfg, ["ingest.n_folds=3"], spark=spark).set_index("stage")
    assert st.loc["ingest", "state"] == "stale: config changed (sections source, demo, ingest or seed)"


def test_tables_and_show(spark, make_cfg):
    import tokens2policy as t2p

    cfg = make_cfg()
    _ingest(spark, cfg)
    write_table(spark.createDataFrame(UNITS.head(10)), cfg, "units", mode="append")
    tab = t2p.tables(cfg, spark=spark).set_index("table")
    history = {r.version: r for r in
               __import__("tokens2policy.lakehouse", fromlist=["delta_table"]).delta_table(spark, cfg, "units")
               .history().collect()}
    assert tab.loc["units", "rows"] == 50 and tab.loc["units", "version"] == table_version(spark, cfg, "units") == 1
    assert tab.loc["units", "operation"] == "WRITE (Append)" == history[1].operation + " (Append)"
    assert tab.loc["units", "written_by"] == "ingest" and tab.loc["stage_runs", "written_by"] == "stage runner"
    assert not tab.loc["modifiers", "exists"] and pd.isna(tab.loc["modifiers", "rows"])
    head = t2p.show("units", limit=3, config=cfg, spark=spark)
    assert len(head) == 3 and list(head.columns) == list(UNITS.columns)
    assert head["text"].iloc[0].endswith("…") and len(head["text"].iloc[0]) == 60
    old = t2p.show("units", limit=100, version=0, config=cfg, spark=spark)
    assert len(old) == 40  # time travel to the first version


def test_readable_cells():
    from tokens2policy.overview import readable

    assert readable(list(range(10))) == "[0, 1, 2, 3, … (+6)]"
    assert readable({"unit_id": "u1", "snippet": "x " * 100}).startswith("{unit_id=u1, snippet=x x")
    assert readable(float("nan")) is None and readable(3) == 3 and readable(b"abc") == "<3 bytes>"


def _t2p(capsys, *args):
    from tokens2policy.cli import main

    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_views_and_one_line_errors(spark, make_cfg, capsys):
    cfg = make_cfg()
    data = f"data_dir={cfg.data_dir}"
    _ingest(spark, cfg)  # a tracked stage: MLflow's own store set-up lines are not the CLI's output
    capsys.readouterr()
    rc, out, err = _t2p(capsys, "status", "--set", data)
    assert rc == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split()[:5] == ["stage", "last_run", "status", "seconds", "inputs"]
    assert next(l for l in lines if l.startswith("ingest")).rstrip().endswith("up to date")
    assert next(l for l in lines if l.startswith("embed")).rstrip().endswith("stale: never ran successfully")
    rc, out, _ = _t2p(capsys, "tables", "--set", data)
    assert rc == 0 and next(l for l in out.splitlines() if l.startswith("units ")).split()[1] == "40"
    rc, out, _ = _t2p(capsys, "show", "units", "--limit", "2", "--set", data)
    assert rc == 0 and out.splitlines()[0] == "units: first 2 row(s)" and len(out.splitlines()) == 4
    for args, message in [
        (("show", "nope"), "t2p: error: unknown table 'nope'; choose one of: units, quarantine, "),
        (("show", "../../etc/units"), "t2p: error: unknown table '../../etc/units'"),
        (("show", "modifiers"), "t2p: error: table 'modifiers' does not exist yet"),
        (("show", "units", "--limit", "0"), "t2p: error: --limit must be at least 1, got 0"),
        (("status", "--set", "identify.alhpa=1"), "t2p: error: unknown config key 'identify.alhpa'"),
    ]:
        rc, out, err = _t2p(capsys, *args, "--set", data)
        assert rc == 2 and len(err.splitlines()) == 1 and err.startswith(message), (args, err)
    assert "run `t2p run identify` first" in _t2p(capsys, "show", "modifiers", "--set", data)[2]


def test_run_from_python_and_log_levels(spark, make_cfg, capsys, monkeypatch):
    """tokens2policy.run runs a real stage (the report, on units only) and returns its summary; the CLI's
    --log-level hides the stage lines, never the summary or an error."""
    import tokens2policy as t2p
    from tokens2policy.cli import main

    cfg = make_cfg("report.screenshot=false", "report.log_to_mlflow=false")
    write_table(spark.createDataFrame(UNITS), cfg, "units")
    results = t2p.run("report", config=cfg, spark=spark)
    assert [r["stage"] for r in results] == ["report"] and not results[0]["skipped"]
    assert t2p.report_path(results) == results[0]["report_path"] and results[0]["report_path"].endswith("index.html")
    assert isinstance(results[0]["seconds"], float)
    out = capsys.readouterr().out
    assert "[t2p] stage 1/1 report: running" in out and "[t2p] report: must run: never ran successfully" in out
    # up to date now: a second run skips it
    assert t2p.run("report", config=cfg, spark=spark)[0]["skipped"]
    sets = ["--set", f"data_dir={cfg.data_dir}", "--set", "report.screenshot=false",
            "--set", "report.log_to_mlflow=false"]
    capsys.readouterr()
    assert main(["run", "report", "--force", "report", "--log-level", "warning", *sets]) == 0
    out, err = capsys.readouterr()
    assert "[t2p]" not in out and "tokens2policy — run summary" in out and err == ""
    monkeypatch.setenv("T2P_LOG_LEVEL", "debug")
    assert main(["run", "report", *sets]) == 0
    assert "[t2p] report: up to date" in capsys.readouterr().out
    monkeypatch.setenv("T2P_LOG_LEVEL", "loud")
    assert main(["status", *sets]) == 2
    assert capsys.readouterr().err.strip() == "t2p: error: T2P_LOG_LEVEL='loud': choose one of debug, info, " \
                                              "warning, error"
    with pytest.raises(t2p.ConfigError, match="unknown stage 'reprt'"):
        t2p.run("reprt", config=cfg, spark=spark)
