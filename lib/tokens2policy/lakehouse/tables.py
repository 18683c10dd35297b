"""Stage tables by short name: ``units``, ``embeddings``, ``neurons``, ``modifiers``, ``gates``, ...

A short name resolves to ``catalog.schema.table`` in catalog mode (Unity Catalog on Databricks) and to a Delta
table at ``<data_dir>/lakehouse/<schema>/<table>`` in path mode (the embedded default), so local runs need no
metastore and several processes (tests, spark-submit jobs) can share one lakehouse. The column contracts are in
``docs/tables.md``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence

from delta.tables import DeltaTable
from pyspark.sql import DataFrame, SparkSession

from tokens2policy.config import Config


class MissingTableError(RuntimeError):
    """A stage asked for a table that no earlier stage has written."""


def _stage_context(config):
    """The StageContext behind a stage's config view (None for a plain Config): inside a stage, table access goes
    through it, so a read gets the pinned version and every table used is a declared one (tokens2policy.context)."""
    from tokens2policy.context import context_of

    return context_of(config)


def table_location(config: Config, name: str) -> str:
    """The Delta path (path mode) or the fully qualified name (catalog mode) of a stage table."""
    lh = config.lakehouse
    if lh.mode == "catalog":
        return ".".join(p for p in (lh.catalog, lh.schema_, name) if p)
    root = Path(lh.root) if lh.root else config.data_path / "lakehouse"
    return str(root / lh.schema_ / name)


def _is_catalog(config: Config) -> bool:
    return config.lakehouse.mode == "catalog"


def table_exists(spark: SparkSession, config: Config, name: str) -> bool:
    ctx = _stage_context(config)
    if ctx is not None:
        return ctx.exists(name)
    loc = table_location(config, name)
    if _is_catalog(config):
        return spark.catalog.tableExists(loc)
    return Path(loc, "_delta_log").is_dir() and DeltaTable.isDeltaTable(spark, loc)


def delta_table(spark: SparkSession, config: Config, name: str) -> DeltaTable:
    ctx = _stage_context(config)
    if ctx is not None:
        return ctx.delta_table(name)
    loc = table_location(config, name)
    return DeltaTable.forName(spark, loc) if _is_catalog(config) else DeltaTable.forPath(spark, loc)


def read_table(spark: SparkSession, config: Config, name: str, version: Optional[int] = None) -> DataFrame:
    """Read a stage table, optionally as of a Delta version (time travel)."""
    ctx = _stage_context(config)
    if ctx is not None:
        return ctx.read(name, version=version)
    if not table_exists(spark, config, name):
        raise MissingTableError(
            f"table '{name}' does not exist at {table_location(config, name)}: run the stage that writes it first"
        )
    reader = spark.read.format("delta")
    if version is not None:
        reader = reader.option("versionAsOf", int(version))
    loc = table_location(config, name)
    return reader.table(loc) if _is_catalog(config) else reader.load(loc)


def write_table(
    df: DataFrame,
    config: Config,
    name: str,
    mode: str = "overwrite",
    partition_by: Optional[Sequence[str]] = None,
    replace_where: Optional[str] = None,
    overwrite_schema: bool = False,
) -> None:
    """Write a stage table in one Delta commit.

    ``replace_where`` (e.g. ``experiment_id = 'x'``) overwrites only the matching rows, so one experiment's rerun
    never touches another experiment's rows in a shared lakehouse.
    """
    ctx = _stage_context(config)
    if ctx is not None:
        ctx.write(name, df, mode=mode, partition_by=partition_by, replace_where=replace_where,
                  overwrite_schema=overwrite_schema)
        return
    writer = df.write.format("delta").mode(mode)
    if partition_by:
        writer = writer.partitionBy(*partition_by)
    if replace_where is not None:
        writer = writer.option("replaceWhere", replace_where)
    if overwrite_schema:
        writer = writer.option("overwriteSchema", "true")
    loc = table_location(config, name)
    if _is_catalog(config):
        writer.saveAsTable(loc)
    else:
        writer.save(loc)


def merge_table(
    spark: SparkSession,
    config: Config,
    name: str,
    df: DataFrame,
    keys: Iterable[str],
    update_when_changed: bool = True,
    partition_by: Optional[Sequence[str]] = None,
    compare_columns: Optional[Sequence[str]] = None,
) -> Dict[str, int]:
    """Upsert ``df`` into a stage table on ``keys`` (creating it on first use) and return the MERGE's row counts.

    Rows whose key exists and whose values are unchanged are left alone, so merging the same data twice changes no
    row. A changed row for an existing key replaces the stored one when ``update_when_changed`` (latest wins),
    otherwise the stored row is kept (first wins).
    """
    ctx = _stage_context(config)
    if ctx is not None:
        return ctx.merge(name, df, keys, update_when_changed=update_when_changed, partition_by=partition_by,
                         compare_columns=compare_columns)
    keys = list(keys)
    if not table_exists(spark, config, name):
        write_table(df, config, name, mode="overwrite", partition_by=partition_by)
        n = read_table(spark, config, name).count()
        return {"inserted": n, "updated": 0, "unchanged_or_kept": 0}
    target = delta_table(spark, config, name)
    before = table_version(spark, config, name)
    cond = " AND ".join(f"t.`{k}` <=> s.`{k}`" for k in keys)
    merge = target.alias("t").merge(df.alias("s"), cond)
    if update_when_changed:
        cols = [c for c in (compare_columns or df.columns) if c not in keys]
        changed = " OR ".join(f"NOT (t.`{c}` <=> s.`{c}`)" for c in cols) or "false"
        merge = merge.whenMatchedUpdateAll(condition=changed)
    merge.whenNotMatchedInsertAll().execute()
    # Delta makes no commit for a MERGE that changes nothing; then the last commit's metrics are not ours.
    committed = table_version(spark, config, name) != before
    metrics = (target.history(1).select("operationMetrics").first()[0] or {}) if committed else {}
    inserted = int(metrics.get("numTargetRowsInserted", 0))
    updated = int(metrics.get("numTargetRowsUpdated", 0))
    # the MERGE already counted its source rows; recount (recomputing df) only when it made no commit
    n_source = int(metrics["numSourceRows"]) if "numSourceRows" in metrics else df.count()
    return {"inserted": inserted, "updated": updated, "unchanged_or_kept": n_source - inserted - updated}


def table_version(spark: SparkSession, config: Config, name: str) -> Optional[int]:
    """The table's latest Delta version, or None when it does not exist (inside a stage: an input's pinned
    version)."""
    ctx = _stage_context(config)
    if ctx is not None:
        return ctx.version(name)
    if not table_exists(spark, config, name):
        return None
    return int(delta_table(spark, config, name).history(1).select("version").first()[0])


def table_history(spark: SparkSession, config: Config, name: str) -> DataFrame:
    return delta_table(spark, config, name).history()


def experiment_filter(experiment_id: str) -> str:
    """A SQL predicate selecting one experiment's rows (backslashes and quotes escaped: Spark SQL string literals
    treat a backslash as an escape)."""
    return "experiment_id = '" + str(experiment_id).replace("\\", "\\\\").replace("'", "\\'") + "'"

