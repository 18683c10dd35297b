"""The report stage: one self-contained HTML page (plus its PNGs) per run, next to the lakehouse and in MLflow.

``<data_dir>/reports/<timestamp>/index.html`` (or ``report.out_dir``) holds the page; the figures are both inlined
(the page needs no other file) and saved beside it. The whole folder is logged as the MLflow run's ``report``
artifact, ``facts.json`` holds the headline numbers the page shows (used by the printed summary and tests) and
``screenshot.png`` the top of the page as headless Chromium renders it (when Chromium is installed).
The reports folder may be any URI (``hdfs://``, ``s3a://``, ``abfss://``, ``dbfs:/``): the page is then built in a
local staging folder and copied there through Hadoop's FileSystem (``lakehouse.storage``).
"""
from __future__ import annotations

import datetime as _dt
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from tokens2policy.config import Config
from tokens2policy.lakehouse import storage
from tokens2policy.report.load import load_lakehouse
from tokens2policy.report.page import build_page
from tokens2policy.report.screenshot import try_screenshot


def reports_root(config: Config) -> str:
    """The reports folder: ``report.out_dir`` or ``<data_dir>/reports``, a local absolute path or a URI."""
    return storage.resolve(config.report.out_dir) if config.report.out_dir \
        else storage.join(config.data_uri, "reports")


def _fresh_name(root: str, spark=None) -> str:
    """``YYYYmmdd-HHMMSS`` (a suffix keeps two reports in one second apart)."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    name, i = stamp, 1
    while storage.exists(storage.join(root, name), spark):
        name, i = f"{stamp}-{i}", i + 1
    return name


def new_report_dir(config: Config) -> Path:
    """A fresh local ``<reports>/<YYYYmmdd-HHMMSS>`` folder (a local reports folder only)."""
    root = reports_root(config)
    path = Path(storage.local_path(storage.join(root, _fresh_name(root))))
    path.mkdir(parents=True)
    return path


def latest_report(config: Config, spark=None) -> Union[Path, str, None]:
    """The newest report page (a local Path, or the URI of a page in a remote reports folder)."""
    root = reports_root(config)
    if storage.is_local(root):
        local = Path(storage.local_path(root))
        pages = sorted(local.glob("*/index.html"), key=lambda p: p.stat().st_mtime) if local.is_dir() else []
        return pages[-1] if pages else None
    for name in reversed(storage.child_dirs(root, spark)):
        page = storage.join(root, name, "index.html")
        if storage.exists(page, spark):
            return page
    return None


def build_facts(spark, config: Config, out_dir: Path, versions: Optional[Dict[str, Optional[int]]] = None,
                run_id: Optional[str] = None):
    """Read the lakehouse once and build the page for every experiment (or ``report.experiment_id``)."""
    lakehouse = load_lakehouse(spark, config, versions)
    datasets = [lakehouse.for_experiment(e) for e in lakehouse.experiments(config.report.experiment_id)]
    info = {"generated": _dt.datetime.now().isoformat(timespec="seconds"), "versions": lakehouse.versions,
            "mlflow_run_id": run_id or "—"}
    page = build_page(config, datasets, out_dir, info)
    return page, lakehouse


def build_report(spark, config: Config, run_id: Optional[str] = None,
                 versions: Optional[Dict[str, Optional[int]]] = None) -> Dict[str, Any]:
    """Write ``index.html``, its PNGs and ``facts.json`` into a fresh report folder; return a summary.

    ``report_dir``/``report_path`` name the folder and page where they live (a URI for a remote reports folder);
    ``local_dir`` is a local copy of the folder (the folder itself when local; else a staging copy the caller
    removes with :func:`discard_staging`).
    """
    root = reports_root(config)
    if storage.is_local(root):
        out = new_report_dir(config)
        report_dir, staging = str(out), None
    else:
        name = _fresh_name(root, spark)
        staging = tempfile.mkdtemp(prefix="t2p_report_")
        out = Path(staging) / name
        out.mkdir()
        report_dir = storage.join(root, name)
    page, lakehouse = build_facts(spark, config, out, versions, run_id)
    index = out / "index.html"
    report_path = str(index) if staging is None else storage.join(report_dir, "index.html")
    index.write_text(page.html, encoding="utf-8")
    facts = {**page.facts, "versions": lakehouse.versions, "report_path": report_path}
    (out / "facts.json").write_text(json.dumps(facts, indent=2, default=_json_default), encoding="utf-8")
    shot = try_screenshot(index, out / "screenshot.png") if config.report.screenshot else None
    if staging is not None:
        storage.upload_dir(str(out), report_dir, spark)
    return {
        "report_path": report_path,
        "report_dir": report_dir,
        "local_dir": str(out),
        "staging": staging,
        "screenshot": None if shot is None else str(shot) if staging is None else storage.join(report_dir, shot.name),
        "figures": [p.name for p in page.figures],
        "experiments": list(page.facts["experiments"]),
        "missing": page.facts["missing"],
        "facts": facts,
    }


def discard_staging(res: Dict[str, Any]) -> None:
    """Remove the local staging copy of a report written to a remote folder (no-op for a local folder)."""
    if res.get("staging"):
        shutil.rmtree(res["staging"], ignore_errors=True)


def _json_default(x):
    import numpy as np

    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.bool_,)):
        return bool(x)
    return str(x)


def run(spark, config: Config) -> Dict[str, Any]:
    """Run the report stage directly (tests, notebooks): :func:`main` under a stage context."""
    from tokens2policy.context import run_job

    return run_job(spark, config, "report", main)


def main(ctx) -> Dict[str, Any]:
    """Build the page from the input tables as of their pinned versions; log the folder to the MLflow run (unless
    ``report.log_to_mlflow`` is off)."""
    versions = {t: ctx.versions.get(t) for t in ctx.stage.inputs}
    res = build_report(ctx.spark, ctx.config, run_id=ctx.run_id, versions=versions)
    try:
        if ctx.run is not None:
            ctx.log_artifacts(res["local_dir"], artifact_path="report")
            ctx.log_metrics({"report_missing_items": len(res["missing"]), "report_figures": len(res["figures"])})
            ctx.set_tag("t2p.report_path", res["report_path"])
            res["mlflow_run_id"] = ctx.run_id
    finally:
        discard_staging(res)
    return _summary(res)


def _summary(res: Dict[str, Any]) -> Dict[str, Any]:
    """The small dict ``run_stages`` records (no facts: they live in facts.json)."""
    keep: List[str] = ["report_path", "report_dir", "screenshot", "figures", "experiments", "missing",
                       "mlflow_run_id"]
    return {k: res[k] for k in keep if k in res}
