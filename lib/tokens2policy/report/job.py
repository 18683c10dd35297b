"""The report stage: one self-contained HTML page (plus its PNGs) per run, next to the lakehouse and in MLflow.

``<data_dir>/reports/<timestamp>/index.html`` (or ``report.out_dir``) holds the page; the figures are both inlined
(the page needs no other file) and saved beside it. The whole folder is logged as the MLflow run's ``report``
artifact, and ``facts.json`` holds the headline numbers the page shows (used by the printed summary and tests).
"""
from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from tokens2policy.config import Config
from tokens2policy.report.load import load_lakehouse
from tokens2policy.report.page import build_page


def reports_root(config: Config) -> Path:
    return Path(config.report.out_dir).expanduser().resolve() if config.report.out_dir \
        else config.data_path / "reports"


def new_report_dir(config: Config) -> Path:
    """A fresh ``<reports>/<YYYYmmdd-HHMMSS>`` folder (a suffix keeps two reports in one second apart)."""
    root = reports_root(config)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path, i = root / stamp, 1
    while path.exists():
        path, i = root / f"{stamp}-{i}", i + 1
    path.mkdir(parents=True)
    return path


def latest_report(config: Config) -> Path | None:
    root = reports_root(config)
    pages = sorted(root.glob("*/index.html"), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    return pages[-1] if pages else None


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
    """Write ``index.html``, its PNGs and ``facts.json`` into a fresh report folder; return a summary."""
    out = new_report_dir(config)
    page, lakehouse = build_facts(spark, config, out, versions, run_id)
    index = out / "index.html"
    index.write_text(page.html, encoding="utf-8")  # type: ignore[attr-defined]
    facts = {**page.facts, "versions": lakehouse.versions, "report_path": str(index)}
    (out / "facts.json").write_text(json.dumps(facts, indent=2, default=_json_default), encoding="utf-8")
    return {
        "report_path": str(index),
        "report_dir": str(out),
        "figures": [p.name for p in page.figures],
        "experiments": list(page.facts["experiments"]),
        "missing": page.facts["missing"],
        "facts": facts,
    }


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
    if ctx.run is not None:
        ctx.log_artifacts(res["report_dir"], artifact_path="report")
        ctx.log_metrics({"report_missing_items": len(res["missing"]), "report_figures": len(res["figures"])})
        ctx.set_tag("t2p.report_path", res["report_path"])
        res["mlflow_run_id"] = ctx.run_id
    return _summary(res)


def _summary(res: Dict[str, Any]) -> Dict[str, Any]:
    """The small dict ``run_stages`` records (no facts: they live in facts.json)."""
    keep: List[str] = ["report_path", "report_dir", "figures", "experiments", "missing", "mlflow_run_id"]
    return {k: res[k] for k in keep if k in res}
