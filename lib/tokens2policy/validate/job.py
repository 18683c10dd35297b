"""Spark job of the validation study: one Spark task per (design point, repetition), results to ``validation_runs``.

    t2p run validate [--set validate.size=full] [--force validate]

The task list (:func:`tokens2policy.validate.study.build_tasks`) becomes ``spark.range(N, numPartitions=N)`` —
exactly one task id per partition (``validate.tasks_per_partition`` groups them) — and ``mapInPandas`` runs
:func:`~tokens2policy.validate.study.run_task` for each id on an executor, single-threaded BLAS, so the cluster's
cores run repetitions in parallel. The rows are appended to the ``validation_runs`` Delta table with the MLflow run
id; the driver reads them back (no recomputation), summarises them and logs summaries, headline metrics and
figures to the MLflow run.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List

import pandas as pd

from .study import RESULT_COLUMNS, build_tasks, combine_chunks, rows_frame, run_task, summarize_coverage, \
    summarize_selection, wants_text

TABLE = "validation_runs"


def spark_schema():
    """The ``validation_runs`` schema, from the table registry (its columns: ``run_id``, ``study`` and
    :data:`~tokens2policy.validate.study.RESULT_COLUMNS`)."""
    from tokens2policy.lakehouse.schemas import table_spec

    return table_spec(TABLE).schema()


def _task_runner(tasks: List[Dict], run_id: str, study: str):
    def run_partition(batches):
        try:
            from threadpoolctl import threadpool_limits

            limit = threadpool_limits(1)
        except ImportError:  # pragma: no cover - sklearn ships threadpoolctl
            limit = None
        for pdf in batches:
            for tid in pdf["task_id"].tolist():
                df = rows_frame(run_task(tasks[int(tid)]))
                df.insert(0, "study", study)
                df.insert(0, "run_id", run_id)
                yield df
        if limit is not None:
            limit.restore_original_limits()

    return run_partition


def study_frame(spark, tasks: List[Dict], run_id: str, study: str, tasks_per_partition: int = 1):
    """The lazy Spark DataFrame of all result rows (one partition per ``tasks_per_partition`` tasks)."""
    n = len(tasks)
    if n == 0:
        raise ValueError("the validation study has no tasks: check validate.cells / n_values / repetitions")
    parts = max(1, math.ceil(n / int(tasks_per_partition)))
    ids = spark.range(0, n, 1, numPartitions=parts).withColumnRenamed("id", "task_id")
    return ids.mapInPandas(_task_runner(tasks, run_id, study), schema=spark_schema())


def _headline_metrics(sel: pd.DataFrame, cov: pd.DataFrame) -> Dict[str, float]:
    out: Dict[str, float] = {}
    real = sel[(sel["design"] != "null") & ~sel["design"].astype(str).str.startswith("drivers/")]
    for (design, outcome), g in real.groupby(["design", "outcome"]):
        top = g[g["n"] == g["n"].max()]
        top = top[top["effect"] == top["effect"].max()]
        for _, r in top.iterrows():
            out[f"iou_maxn.{design}.{outcome}.{r['method']}"] = float(r["iou"])
            if design == "text" and "iou_aligned" in r:  # design 2: modulo topic-aligned neurons
                out[f"iou_aligned_maxn.{design}.{outcome}.{r['method']}"] = float(r["iou_aligned"])
    for _, r in sel[sel["design"] == "null"].iterrows():
        out[f"fwer.{r['outcome']}.{r['method']}"] = float(r["any_selected"])
    for _, r in sel[sel["design"].astype(str).str.startswith("cal-")].iterrows():
        out[f"fwer.{r['design']}.{r['method']}"] = float(r["any_false"])
    for _, r in cov.iterrows():
        key = f"coverage.{r['design']}.{r['outcome']}.n{int(r['n'])}.e{r['effect']:g}.{r['estimand']}"
        out[key.replace(" ", "_").replace(">", "gt").replace("<=", "le")] = float(r["coverage"])
    return {k: v for k, v in out.items() if v == v}  # drop NaN


def run(spark, cfg) -> dict:
    """Run the validate stage directly (tests, notebooks): :func:`main` under a stage context."""
    from tokens2policy.context import run_job

    return run_job(spark, cfg, "validate", main)


def main(ctx) -> dict:
    """Run the study on the cluster; append rows to ``validation_runs``; log summaries/figures to MLflow."""
    from pyspark.sql import functions as F

    from tokens2policy.progress import spark_progress

    from . import plots

    spark, cfg = ctx.spark, ctx.config
    vcfg = cfg.validate_
    out_dir = Path(vcfg.out_dir) if vcfg.out_dir else cfg.data_path / "validation"
    text_rep = None
    if wants_text(vcfg):  # design 2: embed + SAE once on the driver; tasks read the stored codes
        from .text import build_text_representation

        text_rep = str(build_text_representation(cfg, cfg.data_path / "validation", epochs=vcfg.text_epochs,
                                                 n_articles=vcfg.text_articles))
    driver_reps = None
    if vcfg.drivers:  # design 3: one dictionary per (corpus, variant), built once on the driver
        from .drivers import build_driver_representation

        driver_reps = {(c, v): str(build_driver_representation(cfg, c, v, cfg.data_path / "validation", cfg.seed))
                       for c in vcfg.drivers_corpora for v in vcfg.drivers_variants}
    tasks = build_tasks(vcfg, cfg.seed, text_representation=text_rep, driver_representations=driver_reps)
    with ctx.clock.timed("study"):
        run_id = ctx.run_id
        ctx.log_params({"validate.n_tasks": len(tasks)})
        if text_rep:
            from .text import representation_summary

            ctx.log_dict(dict(representation_summary(text_rep), path=text_rep),
                         "validation/text_representation.json")
        sdf = study_frame(spark, tasks, run_id, vcfg.size, vcfg.tasks_per_partition)
        with spark_progress(spark, "validate: simulation study", note=f"{len(tasks)} repetitions"):
            ctx.write(TABLE, sdf, mode="append")
        rows = ctx.read(TABLE).where(F.col("run_id") == run_id).toPandas()
        sel, cov = summarize_selection(rows), summarize_coverage(rows)
        ctx.log_metrics(_headline_metrics(sel, cov))
        out_dir.mkdir(parents=True, exist_ok=True)
        sel.to_csv(out_dir / "validation_selection_summary.csv", index=False)
        cov.to_csv(out_dir / "validation_coverage_summary.csv", index=False)
        ctx.log_artifact(str(out_dir / "validation_selection_summary.csv"), "validation")
        ctx.log_artifact(str(out_dir / "validation_coverage_summary.csv"), "validation")
        figures = plots.all_figures(sel, cov, out_dir, vcfg.alpha) if vcfg.figures else {}
        if vcfg.drivers:
            from .drivers import driver_figures, driver_metrics, summarize_drivers

            drv = summarize_drivers(rows)
            drv.to_csv(out_dir / "validation_drivers_summary.csv", index=False)
            ctx.log_artifact(str(out_dir / "validation_drivers_summary.csv"), "validation")
            ctx.log_metrics(driver_metrics(drv))
            if vcfg.figures:
                figures.update(driver_figures(drv, out_dir))
        for path in figures.values():
            ctx.log_artifact(str(path), "validation")
        from .pipeline_path import run_in_study  # select -> effects -> policy as the stages run them

        with spark_progress(spark, "validate: the pipeline's own path", note="select -> effects -> policy"):
            path_metrics = run_in_study(spark, cfg, run_id, out_dir)
    return {
        "run_id": run_id, "study": vcfg.size, "tasks": len(tasks), "rows": int(len(rows)),
        "out_dir": str(out_dir), "figures": sorted(figures),
        "headline": {k: round(v, 4) for k, v in _headline_metrics(sel, cov).items()
                     if k.startswith(("fwer.", "iou_maxn")) and ("nexis_gcm" in k or "nexis_hc2" in k or "marginal" in k)},
        "pipeline_path": {k: round(v, 4) for k, v in path_metrics.items() if ".split.nexis." in k},
    }


def summarize_runs(spark, cfg, run_ids: List[str], out_dir, figures: bool = True) -> pd.DataFrame:
    """Summarise the ``validation_runs`` rows of several runs as one study (a study run in chunks of repetitions,
    ``validate.calibration_first_repetition``): rows combined by :func:`~tokens2policy.validate.study.combine_chunks`
    (a draw counted once), ``validation_selection_summary.csv`` and the figures written to ``out_dir``; returns the
    selection summary. Every run id must have rows; no run ids: every run in the table."""
    from pyspark.sql import functions as F

    from tokens2policy.lakehouse import read_table

    from . import plots

    table = read_table(spark, cfg, TABLE)
    ids = [str(r) for r in run_ids] if run_ids else [r[0] for r in table.select("run_id").distinct().collect()]
    rows = table.where(F.col("run_id").isin(ids)).toPandas()
    missing = sorted(set(ids) - set(rows["run_id"]))
    if missing:
        raise ValueError(f"no validation_runs rows for run id(s) {missing}")
    combined = combine_chunks([g.drop(columns=["run_id", "study", "task_id"]) for _, g in rows.groupby("run_id")])
    sel, cov = summarize_selection(combined), summarize_coverage(combined)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sel.to_csv(out / "validation_selection_summary.csv", index=False)
    if figures:
        plots.all_figures(sel, cov, out, cfg.validate_.alpha)
    return sel


def _summarize_main(argv=None) -> int:
    """``python -m tokens2policy.validate.job --set data_dir=... [--runs ID[,ID...]] --out DIR``: the summary of a
    study run in chunks (default: every run in the data_dir's validation_runs table)."""
    import argparse

    from tokens2policy.config import load_config
    from tokens2policy.lakehouse.session import get_spark

    p = argparse.ArgumentParser(description=_summarize_main.__doc__)
    p.add_argument("--config", default=None)
    p.add_argument("--set", action="append", default=[], dest="overrides")
    p.add_argument("--runs", default="", help="comma-separated MLflow run ids of the chunks (default: every run "
                                                "in the table)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    cfg = load_config(a.config, a.overrides)
    sel = summarize_runs(get_spark(cfg), cfg, [r for r in a.runs.split(",") if r], a.out)
    print(f"{len(sel)} summary rows -> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_summarize_main())
