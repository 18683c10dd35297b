"""The validation study where enterprise data lives (slow: starts Hadoop's MiniDFSCluster): ``t2p run validate``
with ``data_dir`` on a real HDFS writes ``validation_runs`` there and its summaries and figures to
``<data_dir>/validation`` on HDFS (before: a ConfigError, the job wrote them with pathlib to ``cfg.data_path``)."""
from __future__ import annotations

import os

import pytest

from tokens2policy.config import load_config
from tokens2policy.lakehouse import read_table, storage, table_location

pytestmark = pytest.mark.slow

STUDY = [
    "validate.cells=[linear:gaussian]", "validate.n_values=[300]", "validate.effects=[0.8]",
    "validate.repetitions=2", "validate.null_repetitions=1", "validate.null_n=300", "validate.m=10",
    "validate.coverage_n=300", "validate.n_truth=2000", "validate.methods=[nexis_linear,marginal_bh]",
    "validate.calibration=[dense]", "validate.calibration_repetitions=1", "validate.calibration_methods=[nexis_hc2]",
    "validate.pipeline_path_repetitions=1",
]


def test_validate_job_on_hdfs(spark, hdfs, tmp_path, monkeypatch):
    from tokens2policy.validate.job import run, summarize_runs

    monkeypatch.chdir(tmp_path)  # anything written to a local "hdfs:" folder by mistake would land here
    root = f"{hdfs}/t2p-validate"
    cfg = load_config(None, [f"data_dir={root}/data", f"tracking.tracking_uri=sqlite:///{tmp_path}/m.db",
                             f"tracking.artifact_root={(tmp_path / 'artifacts').as_uri()}", *STUDY])
    summary = run(spark, cfg)
    assert summary["out_dir"] == f"{root}/data/validation"
    assert table_location(cfg, "validation_runs").startswith(f"{root}/data/lakehouse/")
    rows = read_table(spark, cfg, "validation_runs").toPandas()
    assert len(rows) == summary["rows"] > 0
    written = {f.path.rsplit("/", 1)[1]: f.size for f in storage.list_files(summary["out_dir"], spark)}
    for name in ("validation_selection_summary.csv", "validation_coverage_summary.csv", "pipeline_path_summary.csv"):
        assert written.get(name, 0) > 0, (name, sorted(written))
    assert any(name.endswith(".png") for name in written)   # figures, as with a local data_dir
    text = storage.read_text(storage.join(summary["out_dir"], "validation_selection_summary.csv"), spark)
    assert text.splitlines()[0].startswith("design,") or "method" in text.splitlines()[0]
    # the chunk summariser writes to a URI too
    out = f"{root}/summaries"
    sel = summarize_runs(spark, cfg, [summary["run_id"]], out, figures=False)
    stored = storage.read_text(storage.join(out, "validation_selection_summary.csv"), spark)
    assert len(stored.strip().splitlines()) == len(sel) + 1
    assert not os.path.exists(tmp_path / "hdfs:")  # nothing went to the local disk under a mangled name
