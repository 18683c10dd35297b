"""A stage killed (a real SIGKILL of its process) between two of its commits reruns in full at the next run.

The toy case (slow: a second Spark process; 182 s under heavy load): a `--force b` of the two-table toy stage is killed after its first commit
— the state that used to be skipped as up to date (new ``t_b`` with the old ``t_b2``). The pipeline case (slow)
kills every multi-commit stage of the demo pipeline in turn and shows the end state equals an uninterrupted run,
row for row.
"""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tokens2policy.context import FAULT_ENV
from tokens2policy.lakehouse import read_table, table_version
from tokens2policy.stages import run_stages

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toy_pipeline import JOBS, STAGES, TOY_PATH  # noqa: E402


def _toy_in_process(spark, cfg, **kw):
    return run_stages(spark, cfg, ["a", "b"], stages=STAGES, resolve=JOBS.__getitem__, echo=lambda m: None, **kw)


def _rows(spark, cfg, name):
    return sorted(tuple(r) for r in read_table(spark, cfg, name).drop("token").collect())


@pytest.mark.slow  # a second Spark process: 182 s under heavy load, well over 20 s even idle
def test_a_forced_stage_killed_between_its_commits_reruns_in_full(spark, make_cfg):
    cfg = make_cfg()
    _toy_in_process(spark, cfg)
    want = {t: _rows(spark, cfg, t) for t in ("t_a", "t_b", "t_b2")}
    before = {t: table_version(spark, cfg, t) for t in ("t_a", "t_b", "t_b2")}

    killed = subprocess.run([sys.executable, str(TOY_PATH), str(cfg.data_path), "--force", "b"],
                            env={**os.environ, FAULT_ENV: "b"}, capture_output=True, text=True, timeout=900)
    assert killed.returncode == -signal.SIGKILL, (killed.stdout, killed.stderr)
    assert f"{FAULT_ENV}: killing b before writing 't_b2' (already committed: t_b)" in killed.stdout
    after = {t: table_version(spark, cfg, t) for t in ("t_a", "t_b", "t_b2")}
    assert after == {**before, "t_b": before["t_b"] + 1}, "t_b committed, t_b2 not"
    tokens = {t: {r.token for r in read_table(spark, cfg, t).collect()} for t in ("t_b", "t_b2")}
    assert tokens["t_b"] != tokens["t_b2"], "a half-written stage: the two tables come from different executions"

    results = _toy_in_process(spark, cfg)  # no --force: b reruns because t_b moved since its last success
    assert [(r["stage"], r["skipped"]) for r in results] == [("a", True), ("b", False)]
    tokens = {t: {r.token for r in read_table(spark, cfg, t).collect()} for t in ("t_b", "t_b2")}
    assert len(tokens["t_b"]) == 1 and tokens["t_b"] == tokens["t_b2"]
    assert {t: _rows(spark, cfg, t) for t in want} == want
    assert [r["skipped"] for r in _toy_in_process(spark, cfg)] == [True, True]
