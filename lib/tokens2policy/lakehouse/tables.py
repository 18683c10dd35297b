"""Stage tables by short name: ``units``, ``embeddings``, ``neurons``, ``modifiers``, ``gates``, ...

A short name resolves to ``catalog.schema.table`` in catalog mode (Unity Catalog on Databricks, or the Hive
metastore of ``spark.sql.catalogImplementation=hive``) and to a Delta table at ``<root>/<schema>/<table>`` in path
mode (the embedded default; ``root`` is ``lakehouse.root`` or ``<data_dir>/lakehouse``), so local runs need no
metastore and several processes (tests, spark-submit jobs) can share one lakehouse. Roots are strings: a local
path or any URI Hadoop can open (``hdfs://``, ``s3a://``, ``abfss://``, ``gs://``, ``dbfs:/``, ``file://``); whether
a table exists is asked of Delta on that file system, never of the local disk (``lakehouse.storage``).

Values from data never reach SQL text unescaped: :func:`sql_string_literal` writes a Spark SQL string literal with
Spark's backslash escapes, and the per-experiment predicates (:func:`experiment_filter`,
:func:`experiments_predicate`) are built from it. The column contracts are in ``docs/tables.md``.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence, Tuple

from delta.tables import DeltaTable
from pyspark.sql import DataFrame, SparkSession

from tokens2policy.config import Config
from tokens2policy.lakehouse import storage


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
    root = storage.resolve(lh.root) if lh.root else storage.join(config.data_uri, "lakehouse")
    return storage.join(root, lh.schema_, name)


def _is_catalog(config: Config) -> bool:
    return config.lakehouse.mode == "catalog"


def table_exists(spark: SparkSession, config: Config, name: str) -> bool:
    ctx = _stage_context(config)
    if ctx is not None:
        return ctx.exists(name)
    loc = table_location(config, name)
    if _is_catalog(config):
        return spark.catalog.tableExists(loc)
    # a path table exists once its log holds a commit (isDeltaTable would plan a snapshot, and on a missing path
    # walk up its parents looking for a table)
    return storage.delta_version(loc, spark) is not None


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
    user_metadata: Optional[str] = None,
    merge_schema: bool = False,
) -> None:
    """Write a stage table in one Delta commit.

    ``replace_where`` (a SQL predicate from :func:`experiment_filter` / :func:`experiments_predicate`, never one
    concatenated from data) overwrites only the matching rows, so one experiment's rerun never touches another
    experiment's rows in a shared lakehouse. ``user_metadata`` is stored in the commit (``DESCRIBE HISTORY``'s
    ``userMetadata``; :func:`commit_metadata` reads it back), e.g. the model version that produced the rows.
    ``merge_schema``: add the frame's new columns to the table in the same commit (Delta ``mergeSchema``; the stage
    context uses it to upgrade a table written by an older tokens2policy, see ``StageContext.write``).
    """
    ctx = _stage_context(config)
    if ctx is not None:
        ctx.write(name, df, mode=mode, partition_by=partition_by, replace_where=replace_where,
                  overwrite_schema=overwrite_schema, user_metadata=user_metadata)
        return
    writer = df.write.format("delta").mode(mode)
    if user_metadata is not None:
        writer = writer.option("userMetadata", user_metadata)
    if partition_by:
        writer = writer.partitionBy(*partition_by)
    if replace_where is not None:
        writer = writer.option("replaceWhere", replace_where)
    if overwrite_schema:
        writer = writer.option("overwriteSchema", "true")
    if merge_schema:
        writer = writer.option("mergeSchema", "true")
    loc = table_location(config, name)
    if _is_catalog(config):
        ensure_schema(df.sparkSession, config)
        writer.saveAsTable(loc)
    else:
        writer.save(loc)


def ensure_schema(spark: SparkSession, config: Config) -> None:
    """Catalog mode: create ``[catalog.]schema`` when it does not exist yet (Unity Catalog: needs CREATE SCHEMA
    on the catalog; the bundle creates it instead, databricks.yml)."""
    lh = config.lakehouse
    name = ".".join(quote_identifier(p) for p in (lh.catalog, lh.schema_) if p)
    if not spark.catalog.databaseExists(".".join(p for p in (lh.catalog, lh.schema_) if p)):
        spark.sql(f"CREATE SCHEMA IF NOT EXISTS {name}")


def quote_identifier(name: str) -> str:
    """A Spark SQL identifier in backticks (a backtick inside doubled)."""
    return "`" + str(name).replace("`", "``") + "`"


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
        # the write's own commit counted its rows (operationMetrics.numOutputRows); re-read the table only when that
        # commit is not the latest one (another writer committed since) or carries no row count
        return {"inserted": _written_rows(spark, config, name), "updated": 0, "unchanged_or_kept": 0}
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


_CREATING_WRITES = ("WRITE", "CREATE TABLE AS SELECT", "CREATE OR REPLACE TABLE AS SELECT",
                    "REPLACE TABLE AS SELECT")


def last_commit(spark: SparkSession, config: Config, name: str) -> Tuple[Optional[int], Optional[str], Dict[str, str]]:
    """(version, operation, operationMetrics) of the table's latest Delta commit — what a write just committed
    (``numOutputRows`` of a write, ``numTargetRowsInserted``/``Updated`` of a MERGE) without reading the data;
    (None, None, {}) for a table without history."""
    row = delta_table(spark, config, name).history(1).select("version", "operation", "operationMetrics").first()
    return (None, None, {}) if row is None else (int(row[0]), row[1], dict(row[2] or {}))


def _written_rows(spark: SparkSession, config: Config, name: str) -> int:
    """Rows in a table just created by one write: the first commit's ``numOutputRows``; a ``count()`` of the table
    when the latest commit is not that first write (a concurrent writer) or has no row count (metrics disabled)."""
    version, operation, metrics = last_commit(spark, config, name)
    if version == 0 and operation in _CREATING_WRITES and "numOutputRows" in metrics:
        return int(metrics["numOutputRows"])
    return read_table(spark, config, name).count()


def table_version(spark: SparkSession, config: Config, name: str) -> Optional[int]:
    """The table's latest Delta version, or None when it does not exist (inside a stage: an input's pinned
    version)."""
    ctx = _stage_context(config)
    if ctx is not None:
        return ctx.version(name)
    if not _is_catalog(config):
        return storage.delta_version(table_location(config, name), spark)
    if not table_exists(spark, config, name):
        return None
    return int(delta_table(spark, config, name).history(1).select("version").first()[0])


def table_history(spark: SparkSession, config: Config, name: str) -> DataFrame:
    return delta_table(spark, config, name).history()


def commit_metadata(spark: SparkSession, config: Config, name: str, version: int) -> Optional[str]:
    """The ``userMetadata`` stored with a table version's commit (``write_table(user_metadata=...)``), or None."""
    from pyspark.sql import functions as F

    row = (delta_table(spark, config, name).history().where(F.col("version") == int(version))
           .select("userMetadata").first())
    return None if row is None else row[0]


def sql_string_literal(value) -> str:
    """``value`` as a Spark SQL string literal: ``'...'`` with a backslash before every backslash and quote.

    Spark's parser reads string literals with backslash escapes (``spark.sql.parser.escapedStringLiterals`` at its
    default, false), so the SQL-standard doubled quote (``'o''brien'``) is two adjacent literals to Spark, and an
    unescaped trailing backslash swallows the closing quote. Tested by parsing hostile values back through Spark.
    """
    text = str(value)
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def experiment_filter(experiment_id: str) -> str:
    """A SQL predicate selecting one experiment's rows (for ``filter`` and Delta's ``replaceWhere``)."""
    return "experiment_id = " + sql_string_literal(experiment_id)


def experiments_predicate(experiment_ids: Iterable[str]) -> str:
    """A SQL predicate selecting the rows of several experiments (``false`` for none)."""
    ids = [sql_string_literal(e) for e in experiment_ids]
    return "experiment_id IN (" + ", ".join(ids) + ")" if ids else "false"

