"""spark-submit against a real Spark standalone cluster on loopback (1 master + 2 workers).

Proves that a job from ``jobs/`` runs with the package shipped as ``--py-files`` in executor processes separate
from the driver and writes a real Delta table that another session can read.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from .standalone import REPO, spark_submit

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def _summary(proc) -> dict:
    lines = [l for l in proc.stdout.splitlines() if l.startswith("T2P_CLUSTER_CHECK ")]
    assert proc.returncode == 0 and lines, f"spark-submit failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n" \
                                           f"{proc.stderr[-6000:]}"
    return json.loads(lines[-1].split(" ", 1)[1])


def test_cluster_has_two_workers(standalone_cluster):
    state = standalone_cluster.state()
    alive = [w for w in state["workers"] if w["state"] == "ALIVE"]
    assert len(alive) == 2
    assert all(w["host"] == "127.0.0.1" and w["cores"] == 1 for w in alive)


def test_spark_submit_runs_on_separate_executors(standalone_cluster, package_py_files, spark, tmp_path):
    from tokens2policy.config import load_config
    from tokens2policy.lakehouse import read_table
    from tokens2policy.lakehouse.jars import cached_jars

    data_dir = tmp_path / "data"
    # conf/local.yaml says spark.master=local[2]: spark-submit's --master must win over the profile
    overrides = [f"data_dir={data_dir}", "spark.delta_jars=cache", "spark.driver_memory=1g",
                 "spark.shuffle_partitions=2"]
    args = ["--config", str(REPO / "conf" / "local.yaml"), "--partitions", "8"]
    for o in overrides:
        args += ["--set", o]
    proc = spark_submit(standalone_cluster, REPO / "jobs" / "cluster_check.py", args, package_py_files,
                        extra_conf={}, cwd=tmp_path, jars=cached_jars())
    summary = _summary(proc)

    assert summary["master"] == standalone_cluster.url
    assert summary["app_id"].startswith("app-")  # a standalone application, not local-*
    assert summary["ran_off_driver"] is True
    assert summary["n_executor_processes"] >= 2
    assert len(summary["executor_ids"]) == 2  # both workers' executors took tasks

    # The executors imported the package from the shipped zip, not from the source tree / editable install.
    for f in summary["module_files"]:
        assert package_py_files.name in f or "/userFiles-" in f, f
        assert not f.startswith(str(REPO / "lib")), f

    # The Delta table written through the cluster reads back in this (separate, local) session.
    cfg = load_config(None, [f"data_dir={data_dir}"])
    rows = read_table(spark, cfg, "cluster_check").collect()
    assert len(rows) == 8 and sorted(r.partition for r in rows) == list(range(8))
    assert sum(r.n_rows for r in rows) == 8 * 16
    driver_pid = rows[0].driver_pid
    assert driver_pid != os.getpid()  # the driver was the spark-submit process, not this test
    executor_pids = {r.pid for r in rows}
    assert len(executor_pids) >= 2 and driver_pid not in executor_pids
    assert {r.executor_id for r in rows} == set(summary["executor_ids"])
    # executors ran in the workers' work dirs under this app id
    assert all(Path(r.cwd).parent.name == summary["app_id"] for r in rows)


def test_spark_submit_pipeline_to_standalone_cluster(standalone_cluster, package_py_files, spark, tmp_path):
    """The whole pipeline (jobs/pipeline.py) submitted to the loopback cluster on a tiny demo experiment."""
    from tokens2policy.config import load_config
    from tokens2policy.lakehouse import read_table
    from tokens2policy.lakehouse.jars import cached_jars
    from tokens2policy.stages import STAGE_NAMES

    data_dir = tmp_path / "data"
    overrides = [f"data_dir={data_dir}", "spark.delta_jars=cache", "spark.driver_memory=1g",
                 "spark.shuffle_partitions=2", "demo.n_units=400", "represent.epochs=2", "effects.n_bootstrap=20"]
    args = ["--config", str(REPO / "conf" / "local.yaml")]
    for o in overrides:
        args += ["--set", o]
    env_conf = {f"spark.executorEnv.{k}": "1" for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    proc = spark_submit(standalone_cluster, REPO / "jobs" / "pipeline.py", args, package_py_files,
                        extra_conf={**env_conf, "spark.databricks.delta.snapshotPartitions": "2"}, cwd=tmp_path,
                        jars=cached_jars(), timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + "\n" + proc.stderr[-6000:]
    assert f"master={standalone_cluster.url}" in proc.stdout
    assert "tokens2policy — run summary" in proc.stdout
    report = [l.split("report: ", 1)[1] for l in proc.stdout.splitlines() if l.startswith("report: ")]
    assert report and Path(report[-1]).is_file()
    cfg = load_config(None, [f"data_dir={data_dir}"])
    runs = read_table(spark, cfg, "stage_runs").collect()
    assert {r.stage for r in runs if r.status == "success"} == set(STAGE_NAMES)
