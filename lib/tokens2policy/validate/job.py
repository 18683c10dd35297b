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
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

import pandas as pd

from .study import RESULT_COLUMNS, build_tasks, combine_chunks, rows_frame, run_task, summarize_coverage, \
    summarize_selection, wants_text

TABLE = "validation_runs"


def spark_schema():
    """The ``validation_runs`` schema, from the table registry (its columns: ``run_id``, ``study`` and
    :data:`~tokens2policy.validate.study.RESULT_COLUMNS`)."""
    from tokens2policy.lakehouse.schemas import table_spec

    return table_spec(TABLE).schema()


def representation_dir(cfg) -> Path:
    """The driver's local folder where designs 2 and 3 build and cache their representations (.npz, built with
    numpy and torch): ``<data_dir>/validation`` when ``data_dir`` is local, else a local cache folder — the tasks
    never read it, they get the files' bytes from the job (:func:`study_frame`)."""
    if cfg.data_is_local:
        return cfg.data_path / "validation"
    return Path(tempfile.gettempdir()) / "t2p_validation_cache"


def output_location(cfg) -> str:
    """Where the summaries and figures go: ``validate.out_dir`` or ``<data_dir>/validation``, a local path or a URI
    (written through a local staging folder, ``lakehouse.storage.staged_folder``)."""
    from tokens2policy.lakehouse import storage

    return storage.resolve(cfg.validate_.out_dir) if cfg.validate_.out_dir else storage.join(cfg.data_uri,
                                                                                          "validation")


def _task_runner(tasks: List[Dict], run_id: str, study: str, shipped: Optional[Dict] = None):
    def run_partition(batches):
        if shipped:
            from .text import ship_representation

            for path, value in shipped.items():
                ship_representation(path, value.value)
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


def study_frame(spark, tasks: List[Dict], run_id: str, study: str, tasks_per_partition: int = 1,
                representations: Optional[List[str]] = None):
    """The lazy Spark DataFrame of all result rows (one partition per ``tasks_per_partition`` tasks).

    ``representations``: the driver-local .npz files the tasks' designs name; their bytes are broadcast and the
    tasks read those (executors need not see the driver's disk)."""
    n = len(tasks)
    if n == 0:
        raise ValueError("the validation study has no tasks: check validate.cells / n_values / repetitions")
    shipped = None
    if representations:
        sc = spark.sparkContext
        shipped = {}
        for path in dict.fromkeys(str(p) for p in representations):
            with open(path, "rb") as fh:
                shipped[path] = sc.broadcast(fh.read())
    parts = max(1, math.ceil(n / int(tasks_per_partition)))
    ids = spark.range(0, n, 1, numPartitions=parts).withColumnRenamed("id", "task_id")
    return ids.mapInPandas(_task_runner(tasks, run_id, study, shipped), schema=spark_schema())


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

    from tokens2policy.lakehouse import storage
    from tokens2policy.progress import spark_progress

    from . import plots

    spark, cfg = ctx.spark, ctx.config
    vcfg = cfg.validate_
    destination = output_location(cfg)
    rep_dir = representation_dir(cfg)
    text_rep = None
    if wants_text(vcfg):  # design 2: embed + SAE once on the driver; tasks read the stored codes
        from .text import build_text_representation

        text_rep = str(build_text_representation(cfg, rep_dir, epochs=vcfg.text_epochs,
                                                 n_articles=vcfg.text_articles))
    driver_reps = None
    if vcfg.drivers:  # design 3: one dictionary per (corpus, variant), built once on the driver
        from .drivers import build_driver_representation

        driver_reps = {(c, v): str(build_driver_representation(cfg, c, v, rep_dir, cfg.seed))
                       for c in vcfg.drivers_corpora for v in vcfg.drivers_variants}
    tasks = build_tasks(vcfg, cfg.seed, text_representation=text_rep, driver_representations=driver_reps)
    with ctx.clock.timed("study"):
        run_id = ctx.run_id
        ctx.log_params({"validate.n_tasks": len(tasks)})
        if text_rep:
            from .text import representation_summary

            ctx.log_dict(dict(representation_summary(text_rep), path=text_rep),
                         "validation/text_representation.json")
        shipped = ([text_rep] if text_rep else []) + (list(driver_reps.values()) if driver_reps else [])
        sdf = study_frame(spark, tasks, run_id, vcfg.size, vcfg.tasks_per_partition, representations=shipped)
        with spark_progress(spark, "validate: simulation study", note=f"{len(tasks)} repetitions"):
            ctx.write(TABLE, sdf, mode="append")
        rows = ctx.read(TABLE).where(F.col("run_id") == run_id).toPandas()
        sel, cov = summarize_selection(rows), summarize_coverage(rows)
        ctx.log_metrics(_headline_metrics(sel, cov))
        with storage.staged_folder(destination, spark, prefix="t2p_validation_") as staged:
            out_dir = Path(staged)
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
        "out_dir": destination, "figures": sorted(figures),
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

    from tokens2policy.lakehouse import read_table, storage

    from . import plots

    table = read_table(spark, cfg, TABLE)
    ids = [str(r) for r in run_ids] if run_ids else [r[0] for r in table.select("run_id").distinct().collect()]
    rows = table.where(F.col("run_id").isin(ids)).toPandas()
    missing = sorted(set(ids) - set(rows["run_id"]))
    if missing:
        raise ValueError(f"no validation_runs rows for run id(s) {missing}")
    combined = combine_chunks([g.drop(columns=["run_id", "study", "task_id"]) for _, g in rows.groupby("run_id")])
    sel, cov = summarize_selection(combined), summarize_coverage(combined)
    with storage.staged_folder(storage.resolve(out_dir), spark, prefix="t2p_validation_") as staged:
        sel.to_csv(Path(staged) / "validation_selection_summary.csv", index=False)
        if figures:
            plots.all_figures(sel, cov, Path(staged), cfg.validate_.alpha)
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
