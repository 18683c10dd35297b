"""The demo pipeline under the stage contract (slow: a small demo, end to end, several times).

* `t2p run all` twice in a row: the second run makes no Delta commit to any table;
* `--force STAGE` reruns exactly that stage and the stages downstream whose inputs it changed;
* every multi-commit stage killed (a real SIGKILL of the `t2p` process) between two of its commits, one after the
  other in a chain of runs, and the final run's tables equal an uninterrupted run's, row for row;
* no job reads a table or config section it does not declare (the stage contexts raise; the runs complete).
"""
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pyspark.sql import functions as F

from tokens2policy.config import load_config
from tokens2policy.context import FAULT_ENV
from tokens2policy.lakehouse import read_table, table_exists, table_version
from tokens2policy.stages import STAGE_NAMES, STAGES, run_stages

pytestmark = pytest.mark.slow

DEMO = ["demo.n_units=2000", "embed.max_tokens=64", "represent.epochs=2", "represent.register_model=false",
        "policy.register_model=false", "effects.n_bootstrap=20"]
BOOKKEEPING = ("stage_runs", "run_lock")
# the chain: (stage to kill, the table it must be killed before, or None: before its second commit, whichever)
# — each run repairs the stage killed by the run before
KILLS = (("ingest@units", "units"), ("embed", None), ("represent", None), ("identify", None), ("effects", None),
         ("policy", None))


def _cfg(data_dir):
    return load_config(None, [f"data_dir={data_dir}", *DEMO])


def _tables(cfg):
    root = cfg.data_path / "lakehouse" / cfg.lakehouse.schema_
    return sorted(p.name for p in root.iterdir() if (p / "_delta_log").is_dir())


def _versions(spark, cfg):
    return {t: table_version(spark, cfg, t) for t in _tables(cfg)}


def _t2p(data_dir, *args, env=None):
    cmd = [sys.executable, "-m", "tokens2policy.cli", "run", "all", "--set", f"data_dir={data_dir}",
           "--set", "spark.driver_memory=2g", *sum((["--set", s] for s in DEMO), []), *args]
    return subprocess.run(cmd, env={**os.environ, "T2P_PROGRESS": "off", **(env or {})}, capture_output=True,
                          text=True, timeout=3600)


@pytest.fixture(scope="module")
def reference(spark, tmp_path_factory):
    """An uninterrupted `t2p run all` of the small demo (in this process, on the test session)."""
    cfg = _cfg(tmp_path_factory.mktemp("reference") / "data")
    results = run_stages(spark, cfg, STAGE_NAMES, echo=lambda m: None)
    assert [r["skipped"] for r in results] == [False] * len(STAGE_NAMES)
    return cfg


def test_second_run_commits_nothing_and_force_reruns_what_its_outputs_feed(spark, reference):
    cfg = reference
    before = _versions(spark, cfg)
    assert {"run_lock", "stage_runs", "units", "neurons", "modifiers", "gates", "assignments"} <= set(before)
    lines = []
    again = run_stages(spark, cfg, STAGE_NAMES, echo=lines.append)
    assert [r["skipped"] for r in again] == [True] * len(STAGE_NAMES), lines
    assert _versions(spark, cfg) == before, "an up-to-date run commits nothing (not even the run lock)"

    forced = run_stages(spark, cfg, STAGE_NAMES, force=["effects"], echo=lambda m: None)
    ran = [r["stage"] for r in forced if not r["skipped"]]
    assert ran == ["effects", "policy", "report"], "effects, and what reads its outputs (policy: effects; report: " \
                                                   "gates, calibration)"
    after = _versions(spark, cfg)
    moved = {t for t in after if after[t] != before[t]}
    outputs = {s.name: set(s.outputs) for s in STAGES}
    assert moved == outputs["effects"] | outputs["policy"] | {"stage_runs", "run_lock"}
    assert {"gates", "effects", "calibration", "policy_rules", "policy_value", "assignments"} <= moved
    forced = run_stages(spark, cfg, STAGE_NAMES, force=["report"], echo=lambda m: None)
    assert [r["stage"] for r in forced if not r["skipped"]] == ["report"], "nothing reads the report"


def _canonical(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy()
    for c in out.columns:
        if out[c].map(lambda v: isinstance(v, (list, tuple, dict, np.ndarray)) or hasattr(v, "asDict")).any():
            out[c] = out[c].map(repr)
    return out.sort_values(list(out.columns), kind="stable", na_position="last").reset_index(drop=True)


def test_each_stage_killed_between_commits_is_repaired_to_the_uninterrupted_tables(spark, reference,
                                                                                    tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("chain") / "data"
    cfg = _cfg(data_dir)
    for fault, table in KILLS:
        stage = fault.split("@")[0]
        killed = _t2p(data_dir, env={FAULT_ENV: fault})
        assert killed.returncode == -signal.SIGKILL, (fault, killed.stdout[-3000:], killed.stderr[-3000:])
        # killed between two commits of the stage (which commit comes second is the stage's business: embed, for
        # one, commits token_states twice before embeddings)
        assert f"{FAULT_ENV}: killing {stage} before writing '{table or ''}" in killed.stdout, killed.stdout[-3000:]
        if table_exists(spark, cfg, "stage_runs"):  # a run killed in its first stage has recorded nothing yet
            runs = read_table(spark, cfg, "stage_runs").where((F.col("stage") == stage) & (F.col("status") == "success"))
            assert runs.count() == 0, f"{stage} was killed: no success recorded"
    final = _t2p(data_dir)
    assert final.returncode == 0, (final.stdout[-3000:], final.stderr[-3000:])
    ran = [line for line in final.stdout.splitlines() if ": done in" in line]
    assert [line.split()[1].rstrip(":") for line in ran] == ["policy", "report"], final.stdout[-3000:]

    tables = [t for t in _tables(reference) if t not in BOOKKEEPING]
    assert sorted(tables) == sorted(t for t in _tables(cfg) if t not in BOOKKEEPING)
    for t in tables:
        got = _canonical(read_table(spark, cfg, t).toPandas())
        want = _canonical(read_table(spark, reference, t).toPandas())
        pd.testing.assert_frame_equal(got, want, check_exact=True, obj=t)
