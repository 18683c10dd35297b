"""Catalog tables in and out on a real metastore (slow): Spark's Hive-compatible catalog with an embedded Derby
metastore, started by the test in fresh processes. The source is a Hive table read by name (``source.kind:
table``), every stage table is a Delta table registered as ``t2p.<name>``, a second process (a new JVM) finds them
through the metastore, and the policy model is registered as ``t2p.policy_<experiment>_<outcome>`` with the
``champion`` alias, pinned to the represent version that wrote the neurons."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent


def _phase(work: Path, phase: str) -> dict:
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable}
    proc = subprocess.run([sys.executable, str(HERE / "catalog_run.py"), str(work), phase], cwd=work, env=env,
                          capture_output=True, text=True, timeout=2400)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("T2P_CATALOG ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + "\n" + proc.stderr[-6000:]
    return json.loads(lines[-1].split(" ", 1)[1])


def test_pipeline_in_catalog_mode_on_a_hive_metastore(tmp_path):
    import mlflow

    first = _phase(tmp_path, "run")
    assert first["catalog"] == "hive"
    assert first["ran"] == ["ingest", "embed", "represent", "identify", "effects", "policy"]
    assert {"units", "quarantine", "embeddings", "neurons", "modifiers", "gates", "effects", "policy_value",
            "assignments", "stage_runs"} <= set(first["tables"])
    assert first["units_location"] == "t2p.units" and first["units_exists"] and first["units_format"] == "delta"
    assert first["units_path"].startswith(f"file:{tmp_path}/data/warehouse/t2p.db/units")
    assert first["n_units"] == 240 and first["source_provider"] == ["parquet"]
    # a new JVM on the same metastore: tables found by name, nothing to redo (the Hive source's row checksum held)
    second = _phase(tmp_path, "check")
    assert second["skipped"] == first["ran"] and second["tables"] == first["tables"]
    # the policy model: a per-experiment/outcome name in the schema, the champion alias, the pinned representation
    uri = first["policy_uris"][0]["engagement"]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    client = mlflow.MlflowClient()
    name, version = uri[len("models:/"):].rsplit("/", 1)
    assert name == "t2p.policy_bbc_news_feature_engagement"
    assert str(client.get_model_version_by_alias(name, "champion").version) == version
    rep = client.get_model_version_by_alias("t2p.represent", "champion")
    mv = client.get_model_version(name, version)
    policy_dir = mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=str(tmp_path / "p"))
    rep_dir = mlflow.artifacts.download_artifacts(f"models:/t2p.represent/{rep.version}",
                                                  dst_path=str(tmp_path / "r"))
    sae = mlflow.models.Model.load(policy_dir).flavors["python_function"]["artifacts"]["sae"]["path"]
    files = os.listdir(Path(rep_dir) / "artifacts" / "representation")
    assert files
    for f in files:
        assert (Path(policy_dir) / sae / f).read_bytes() == \
            (Path(rep_dir) / "artifacts" / "representation" / f).read_bytes(), f
    assert mv.status == "READY"
