"""The pipeline on object storage (slow): ingest → policy → report with the lakehouse, the source and the report
on ``s3a://``, against a real S3-compatible server (moto's standalone server) that the test starts, through
Hadoop's S3A connector (``hadoop-aws`` in pyspark's Hadoop version, cached by ``t2p setup --s3a``) put on the
classpath by ``spark.hadoop_connectors: [s3a]``. What landed in the bucket is checked with boto3, independently of
Spark."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent


def test_pipeline_with_lakehouse_source_and_report_on_s3a(s3, tmp_path):
    root = f"s3a://{s3.bucket}/t2p"
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable}
    proc = subprocess.run([sys.executable, str(HERE / "s3a_run.py"), str(tmp_path), root,
                           json.dumps(s3.hadoop_conf())], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=2400)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("T2P_S3A ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + "\n" + proc.stderr[-6000:]
    out = json.loads(lines[-1].split(" ", 1)[1])
    names = ["ingest", "embed", "represent", "identify", "effects", "policy", "report"]
    assert out["ran"] == names
    assert out["n_units"] == 240 and out["n_experiments"] == 1
    # every table is a Delta table in the bucket: its commit files are objects there (listed by boto3, not Spark)
    keys = s3.keys("t2p/")
    for table, loc in out["locations"].items():
        assert loc.startswith(f"{root}/data/lakehouse/"), (table, loc)
        prefix = loc[len(f"s3a://{s3.bucket}/"):] + "/_delta_log/"
        assert any(k.startswith(prefix) and k.endswith(".json") for k in keys), table
        assert any(k.startswith(loc[len(f"s3a://{s3.bucket}/"):] + "/") and k.endswith(".parquet")
                   for k in keys), table
    assert any(k.startswith("t2p/logs/") and k.endswith(".parquet") for k in keys)
    # the report folder was copied into the bucket
    assert out["report_runs"] == 1 and out["report_is_html"]
    assert any(k.startswith("t2p/data/reports/") and k.endswith(".html") for k in keys)
    assert not out["local_mangled"] and not (tmp_path / "s3a:").exists()
    # a rerun finds every stage up to date; a new source file makes ingest stale
    assert out["rerun_skipped"] == names
    assert out["ingest_stale_after_new_file"]
    # the secret key never reached what MLflow logged (its store and artifacts are local files here)
    secret = s3.hadoop_conf()["spark.hadoop.fs.s3a.secret.key"].encode()
    logged = [tmp_path / "mlflow.db", *(Path(b) / f for b, _, fs in os.walk(tmp_path / "artifacts") for f in fs)]
    assert len(logged) > 1
    for f in logged:
        assert secret not in f.read_bytes(), f
