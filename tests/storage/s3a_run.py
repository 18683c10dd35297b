"""Run in a fresh Python process by test_s3a.py: a session with Hadoop's S3A connector on its classpath
(``spark.hadoop_connectors: [s3a]``; jars are fixed when a JVM starts, so it cannot share the test session), then
ingest → policy → report with the lakehouse, the source (parquet files) and the report under ``s3a://``, a rerun
that finds every stage up to date, and one new source file that makes ingest stale. Prints one JSON line
``T2P_S3A {...}``. Arguments: the local work folder, the s3a root, the Hadoop settings as JSON."""
from __future__ import annotations

import json
import os
import sys


def main(work: str, root: str, hadoop_conf: str) -> None:
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from pipeline import AS_FILES, FAST, THROUGH_POLICY, demo_logs
    from pyspark.sql import functions as F

    from tokens2policy.config import load_config
    from tokens2policy.lakehouse import get_spark, storage, table_location
    from tokens2policy.stages import STAGES, is_up_to_date, run_stages

    os.chdir(work)  # anything written to a local "s3a:" folder by mistake would land here
    tracking = f"sqlite:///{work}/mlflow.db"
    cfg = load_config(None, [
        f"data_dir={root}/data", "spark.session=create", "spark.hadoop_connectors=[s3a]",
        f"spark.conf={hadoop_conf}", f"tracking.tracking_uri={tracking}",
        f"tracking.artifact_root=file://{work}/artifacts", "source.kind=parquet", f"source.path={root}/logs",
        *AS_FILES, *FAST])
    spark = get_spark(cfg)
    logs = demo_logs(spark, f"{root}/generator", tracking)
    logs.repartition(3).write.parquet(f"{root}/logs")
    names = [*THROUGH_POLICY, "report"]
    out = {"ran": [r["stage"] for r in run_stages(spark, cfg, names, echo=lambda _: None) if not r["skipped"]]}
    out["locations"] = {t: table_location(cfg, t) for t in ("units", "quarantine", "embeddings", "neurons",
                                                              "modifiers", "gates", "effects", "policy_value",
                                                              "assignments", "stage_runs")}
    units = spark.read.format("delta").load(out["locations"]["units"])
    out["n_units"], out["n_experiments"] = units.count(), units.select("experiment_id").distinct().count()
    runs = spark.read.format("delta").load(out["locations"]["stage_runs"])
    report = [r for r in runs.where(F.col("stage") == "report").collect()]
    out["report_runs"] = len(report)
    out["reports"] = [f.path for f in storage.list_files(f"{root}/data/reports", spark)]
    html = [p for p in out["reports"] if p.endswith(".html")]
    out["report_is_html"] = bool(html) and "<html" in storage.read_text(html[0], spark).lower()
    out["local_mangled"] = os.path.exists(os.path.join(work, "s3a:"))
    # a rerun: every stage up to date (the source fingerprint is S3's listing through S3A)
    out["rerun_skipped"] = [r["stage"] for r in run_stages(spark, cfg, names, echo=lambda _: None) if r["skipped"]]
    # a new file in the source makes ingest stale again
    logs.limit(5).withColumn("unit_id", F.concat(F.lit("late-"), "unit_id")).write.mode("append").parquet(
        f"{root}/logs")
    out["ingest_stale_after_new_file"] = not is_up_to_date(spark, cfg, next(s for s in STAGES if s.name == "ingest"))
    print("T2P_S3A " + json.dumps(out), flush=True)
    spark.stop()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
