"""Run in a fresh Python process by test_catalog.py: Spark's Hive-compatible catalog with an embedded Derby
metastore under ``<work>/data`` (spark.sql.catalogImplementation=hive is fixed when a JVM starts, so it cannot
share the test session). ``run``: the demo logs as a Hive table, then ingest → policy in catalog mode with
``source.kind: table``; ``check``: a new process (a new JVM on the same metastore) finds the tables by name and
finds every stage up to date. Prints one JSON line ``T2P_CATALOG {...}``."""
from __future__ import annotations

import json
import sys


def main(work: str, phase: str) -> None:
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from pipeline import AS_FILES, FAST, THROUGH_POLICY, demo_logs

    from tokens2policy.config import load_config
    from tokens2policy.lakehouse import get_spark, table_exists, table_location
    from tokens2policy.stages import run_stages

    tracking = f"sqlite:///{work}/mlflow.db"
    cfg = load_config(None, [
        f"data_dir={work}/data", "spark.session=create", "spark.conf={spark.sql.catalogImplementation: hive}",
        "lakehouse.mode=catalog", "lakehouse.schema=t2p", "source.kind=table", "source.table=experiments.logs",
        f"tracking.tracking_uri={tracking}", f"tracking.artifact_root=file://{work}/artifacts", *AS_FILES, *FAST,
        "policy.register_model=true"])
    spark = get_spark(cfg)
    out = {"catalog": spark.conf.get("spark.sql.catalogImplementation")}
    if phase == "run":
        logs = demo_logs(spark, f"{work}/generator", tracking)
        spark.sql("CREATE SCHEMA IF NOT EXISTS experiments")
        logs.write.format("parquet").saveAsTable("experiments.logs")  # a plain Hive table, not Delta
        results = run_stages(spark, cfg, THROUGH_POLICY, echo=lambda _: None)
        out["ran"] = [r["stage"] for r in results if not r["skipped"]]
        out["policy_uris"] = [e["policy_model_uris"] for e in results[-1]["experiments"]]
    else:
        results = run_stages(spark, cfg, THROUGH_POLICY, echo=lambda _: None)
        out["skipped"] = [r["stage"] for r in results if r["skipped"]]
    out["tables"] = sorted(t.name for t in spark.catalog.listTables("t2p"))
    out["units_location"] = table_location(cfg, "units")
    out["units_exists"] = table_exists(spark, cfg, "units")
    detail = spark.sql("DESCRIBE DETAIL t2p.units").first()
    out["units_format"], out["units_path"] = detail["format"], detail["location"]
    out["n_units"] = spark.table("t2p.units").count()
    out["source_provider"] = [r[1] for r in spark.sql("DESCRIBE EXTENDED experiments.logs").collect()
                              if r[0] == "Provider"]
    print("T2P_CATALOG " + json.dumps(out), flush=True)
    spark.stop()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
