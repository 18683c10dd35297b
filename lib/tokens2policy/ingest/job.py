"""The ingest stage: experiment logs → validated, fold-sharded Delta ``units`` plus a ``quarantine`` of rejected rows.

Steps (docs/ingest.md has the rules and their reasons):

1. read the source (``source.kind``: the bundled demo, generated on first use, or Delta/Parquet/CSV/JSON at
   ``source.path``) and map its columns by config — an unmappable schema is a ConfigError naming the column, raised
   before anything is written;
2. classify every row in Spark (:func:`tokens2policy.ingest.validate.classify_rows`): accepted, or rejected with the
   first failing reason code and a message; duplicates keep one row by a deterministic rule;
3. compare accepted rows with the stored ``units`` (as of the Delta version read at the start): new, unchanged or
   changed; a changed row replaces the stored one (``ingest.on_changed_row=update``) or is quarantined (``keep``);
4. give new units their fold (:mod:`tokens2policy.ingest.folds`), MERGE into ``units`` on (experiment_id, unit_id)
   and MERGE the rejects into ``quarantine``; check ``input rows = accepted + quarantined`` and that the MERGE
   inserted/updated exactly the rows classified new/changed — any mismatch raises;
5. randomization check on each touched experiment; counts, balance and warnings go to the MLflow run.
"""
from __future__ import annotations

import functools
import re
from typing import Dict, List, Optional, Tuple

from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from tokens2policy.config import Config, ConfigError
from tokens2policy.ingest.balance import balance_stats, randomization_check
from tokens2policy.ingest.folds import assign_folds
from tokens2policy.ingest.validate import CORRUPT_COL, KEYS, ColumnMap, classify_rows, map_columns

UNITS = "units"
QUARANTINE = "quarantine"


class IngestInvariantError(RuntimeError):
    """The job's own bookkeeping does not add up (rows lost or double-counted): nothing downstream should run."""


class SourceRejectedError(ConfigError):
    """More than ``ingest.max_reject_share`` of the source's rows were rejected: the source or its column mapping
    is wrong. Raised after the quarantine is written (for inspection) and before ``units`` is touched."""


def read_source(spark: SparkSession, cfg: Config) -> Tuple[DataFrame, str]:
    """The raw logs as a DataFrame and a short description of where they came from.

    CSV and JSON are read in Spark's PERMISSIVE mode with the corrupt-record column, so a line with too few or too
    many fields (or broken JSON) keeps its raw text and is quarantined as ``malformed_line`` instead of losing or
    padding fields silently; ``source.malformed=fail`` reads in FAILFAST mode instead. Paths are strings handed to
    Spark (any Hadoop URI, globs included).
    """
    src = cfg.source
    if src.kind == "demo":
        from tokens2policy.ingest.demo import ensure_demo

        return ensure_demo(spark, cfg), _demo_where(cfg)
    key = src.location_key
    location = getattr(src, key)
    if not location:
        raise ConfigError(f"source.{key} is required for source.kind={src.kind}")
    if src.csv_schema is not None and src.kind != "csv":
        raise ConfigError(f"source.csv_schema applies to source.kind=csv only (source.kind={src.kind})")
    where = f"{src.kind}:{location}" if src.kind != "query" else "query:" + " ".join(location.split())[:200]
    mode = "FAILFAST" if src.malformed == "fail" else "PERMISSIVE"
    try:
        if src.kind == "delta":
            is_name = "/" not in location and ":" not in location
            df = spark.read.table(location) if is_name else spark.read.format("delta").load(location)
        elif src.kind == "table":
            df = spark.read.table(location)
        elif src.kind == "query":
            df = spark.sql(location)
        elif src.kind == "parquet":
            df = spark.read.parquet(location)
        elif src.kind == "csv":  # every column as read (strings) unless declared: the checks do the typing
            reader = (spark.read.option("header", str(src.csv_header).lower()).option("multiLine", "true")
                      .option("escape", '"'))
            from pyspark.sql.types import StringType, StructField, StructType

            if src.csv_schema is not None:
                try:
                    columns = StructType.fromDDL(src.csv_schema)
                except Exception:
                    raise ConfigError(f"source.csv_schema {src.csv_schema!r} is not a Spark DDL column list "
                                      "(e.g. 'unit_id string, treatment int, text string')") from None
            else:
                columns = reader.csv(location).schema  # the header's names (or _c0, _c1, ...), all strings
            if mode == "PERMISSIVE":
                columns = StructType([*[f for f in columns.fields if f.name != CORRUPT_COL],
                                      StructField(CORRUPT_COL, StringType(), True)])
                reader = reader.option("columnNameOfCorruptRecord", CORRUPT_COL)
            df = reader.option("mode", mode).schema(columns).csv(location)
        else:
            df = (spark.read.option("mode", mode).option("columnNameOfCorruptRecord", CORRUPT_COL)
                  .json(location))
    except ConfigError:
        raise
    except Exception as exc:  # AnalysisException: path does not exist, not a Delta table, table not found, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"cannot read source {where}: {first[:300]}") from None
    return df, where


def _demo_where(cfg: Config) -> str:
    from tokens2policy.ingest.demo import SOURCE_TABLE

    return f"demo:{cfg.demo.experiment_id} (table {SOURCE_TABLE})"


def _expected_share(cfg: Config) -> Optional[float]:
    if cfg.ingest.expected_treated_share is not None:
        return cfg.ingest.expected_treated_share
    return cfg.demo.treated_share if cfg.source.kind == "demo" else None


def _check_stored_schema(spark: SparkSession, cfg: Config, cmap: ColumnMap, version: Optional[int]) -> None:
    if version is None:
        return
    from tokens2policy.lakehouse import read_table, table_location

    have = read_table(spark, cfg, UNITS, version=version).columns
    if sorted(have) != sorted(cmap.units_columns):
        raise ConfigError(f"table 'units' at {table_location(cfg, UNITS)} has columns {have} but this source maps to "
                          f"{cmap.units_columns}; ingest into a fresh data_dir or lakehouse.schema")


def _metric_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", text)[:200]


def run(spark: SparkSession, cfg: Config) -> dict:
    """Run the ingest stage directly (tests, notebooks): :func:`main` under a stage context."""
    from tokens2policy.context import run_job

    return run_job(spark, cfg, "ingest", main, preflight=preflight)


def preflight(spark: SparkSession, cfg: Config) -> None:
    """Map the source's columns before anything starts (no MLflow run, no table): an unmappable schema is the
    same one-line ConfigError :func:`main` would raise, with nothing written. The demo's logs are mapped by their
    schema alone (:func:`tokens2policy.ingest.demo.log_schema`): generating them is :func:`main`'s work, done once."""
    if cfg.source.kind == "demo":
        from tokens2policy.ingest.demo import log_schema

        map_columns(log_schema(), cfg, _demo_where(cfg))
        return
    raw, where = read_source(spark, cfg)
    map_columns(raw.schema, cfg, where)


def main(ctx) -> dict:
    """The ingest stage; return counts (see module docstring). Raises ConfigError / IngestInvariantError.

    Its outputs are also what it compares the logs with: ``units`` is read as of the version it had when the
    stage started (the stage context pins it)."""
    spark, cfg = ctx.spark, ctx.config
    raw, where = read_source(spark, cfg)
    cmap = map_columns(raw.schema, cfg, where)
    stored_version = ctx.version(UNITS)
    _check_stored_schema(spark, cfg, cmap, stored_version)
    ing = cfg.ingest
    compare_cols = [c for c in cmap.units_columns if c not in (*KEYS, "fold")]  # what makes a stored row "changed"

    with ctx.clock.timed("classify_merge_check"):
        rows = classify_rows(raw, cmap)
        if stored_version is not None:
            # Pinned to the version read at the start, so a recomputation after the MERGE sees the same snapshot.
            stored = ctx.read(UNITS, version=stored_version)
            side = stored.select(*KEYS, F.col("fold").alias("__fold"),
                                 *[F.col(f"`{c}`").alias(f"__s{i}") for i, c in enumerate(compare_cols)])
            rows = rows.join(side, list(KEYS), "left")
            same = F.lit(True)
            for i, c in enumerate(compare_cols):
                same = same & F.col(f"`{c}`").eqNullSafe(F.col(f"__s{i}"))
            status = F.when(F.col("__fold").isNull(), "new").when(same, "unchanged").otherwise("changed")
            stored_counts = stored.groupBy("experiment_id", "treatment").agg(F.count(F.lit(1)).alias("n_stored"))
        else:
            rows = rows.withColumn("__fold", F.lit(None).cast("int"))
            status = F.lit("new")
            stored_counts = None
        rows = rows.withColumn("status", F.when(F.col("reason").isNull(), status))
        if ing.on_changed_row == "keep":
            conflict = F.col("status") == "changed"
            rows = rows.withColumn("message", F.when(conflict, F.concat(
                F.lit("unit_id '"), F.col("unit_id"), F.lit("' is stored with different values; "
                                                            "ingest.on_changed_row=keep keeps the stored row")))
                                   .otherwise(F.col("message")))
            rows = rows.withColumn("reason", F.when(conflict, "conflicts_with_stored").otherwise(F.col("reason")))
            rows = rows.withColumn("status", F.when(conflict, None).otherwise(F.col("status")))
        # the original row (raw_json, as wide as the row) is kept for the quarantine only: the cache holds it for the
        # rejected rows, not a second copy of every accepted row's text
        rows = rows.withColumn("raw_json", F.when(F.col("reason").isNotNull(), F.col("raw_json")))
        rows = rows.persist(StorageLevel.MEMORY_AND_DISK)
        try:
            summary = _write_and_check(spark, cfg, cmap, raw, rows, stored_counts, where, compare_cols,
                                       first_ingest=stored_version is None)
        except Exception as exc:
            malformed = re.search(r"Malformed (?:CSV |JSON )?record[^:]*: ([^\n]{0,200})", str(exc))
            if malformed and cfg.source.malformed == "fail":  # FAILFAST stopped the read: one line, nothing written
                raise ConfigError(f"source {where} has a line that does not parse ({malformed.group(1).strip()}); "
                                  "source.malformed=fail stops at the first one — fix the file, or "
                                  "--set source.malformed=quarantine to quarantine such lines") from None
            raise
        finally:
            rows.unpersist()

        stats = balance_stats(ctx.read(UNITS).where(F.col("experiment_id").isin(
            [e for e in summary["experiments"] if e != "<missing>"])), cmap.covariate_cols)
        balance, warnings = randomization_check(stats, ing, _expected_share(cfg))
        for w in warnings:
            print(f"[t2p] ingest WARNING: {w}", flush=True)
        summary["warnings"] = warnings
        summary["balance"] = balance

        metrics = {key: summary[key] for key in ("rows_in", "accepted", "quarantined", "inserted", "updated",
                                                  "unchanged")}
        metrics.update({f"quarantine.{reason}": n for reason, n in summary["reasons"].items()})
        for exp, counts in summary["experiments"].items():
            name = _metric_name(exp)
            metrics[f"experiment.{name}.accepted"] = counts["accepted"]
            metrics[f"experiment.{name}.quarantined"] = counts["quarantined"]
            metrics.update({f"experiment.{name}.quarantine.{r}": n for r, n in counts["reasons"].items()})
        for exp, rep in balance.items():
            name = _metric_name(exp)
            metrics[f"balance.{name}.treated_share"] = rep["treated_share"]
            metrics.update({f"balance.{name}.smd.{_metric_name(c)}": v for c, v in rep["smd"].items()})
        metrics["randomization_warnings"] = len(warnings)
        ctx.log_metrics(metrics)  # one batched call
        ctx.set_tag("t2p.ingest.warnings", " | ".join(warnings)[:4000] if warnings else "none")
        ctx.log_dict({k: v for k, v in summary.items()}, "ingest_summary.json")
    return summary


# rows rejected for clashing with another row, not for what they hold: never a sign of a broken source
NOT_SOURCE_FAULTS = ("duplicate_unit_id", "conflicts_with_stored")


def check_reject_share(rows: DataFrame, rows_in: int, quarantined: int, reasons: Dict[str, int], cfg: Config,
                       where: str) -> None:
    """Raise :class:`SourceRejectedError` (one line: share, top reasons with counts, one example message, where the
    rows are) when the share of rows rejected for their content (every reason but duplicates and
    ``conflicts_with_stored``) exceeds ``ingest.max_reject_share``."""
    from tokens2policy.lakehouse import table_location

    limit = cfg.ingest.max_reject_share
    bad = {r: n for r, n in reasons.items() if r not in NOT_SOURCE_FAULTS}
    rejected = sum(bad.values())
    if not rows_in or rejected / rows_in <= limit:
        return
    top = sorted(bad.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
    example = rows.where(F.col("reason") == top[0][0]).select("message").first()
    raise SourceRejectedError(
        f"ingest rejected {rejected} of {rows_in} rows ({rejected / rows_in:.0%} > ingest.max_reject_share="
        f"{limit:g}) from {where}; top reasons: " + ", ".join(f"{r} ({n})" for r, n in top)
        + (f" — e.g. {example[0]}" if example and example[0] else "")
        + f"; the rejected rows are in table 'quarantine' ({table_location(cfg, QUARANTINE)}), units is unchanged: "
        "fix the source or its column mapping (docs/ingest.md), or raise ingest.max_reject_share")


def _write_and_check(spark, cfg: Config, cmap: ColumnMap, raw: DataFrame, rows: DataFrame, stored_counts,
                     where: str, compare_cols: List[str], first_ingest: bool) -> dict:
    from tokens2policy.lakehouse import merge_table, read_table, table_exists, table_version

    counts = rows.groupBy("experiment_id", "reason", "status").agg(F.count(F.lit(1)).alias("n")).collect()
    rows_in = raw.count()
    total = sum(r.n for r in counts)
    accepted = sum(r.n for r in counts if r.reason is None)
    quarantined = sum(r.n for r in counts if r.reason is not None)
    by_status = {s: sum(r.n for r in counts if r.status == s) for s in ("new", "unchanged", "changed")}
    if rows_in != total or rows_in != accepted + quarantined or accepted != sum(by_status.values()):
        raise IngestInvariantError(f"ingest lost or duplicated rows: input {rows_in}, classified {total}, accepted "
                                   f"{accepted} + quarantined {quarantined}, statuses {by_status}")
    reasons: Dict[str, int] = {}
    experiments: Dict[str, dict] = {}
    for r in counts:
        exp = r.experiment_id if r.experiment_id is not None else "<missing>"
        e = experiments.setdefault(exp, {"accepted": 0, "quarantined": 0, "reasons": {}})
        if r.reason is None:
            e["accepted"] += r.n
        else:
            e["quarantined"] += r.n
            e["reasons"][r.reason] = e["reasons"].get(r.reason, 0) + r.n
            reasons[r.reason] = reasons.get(r.reason, 0) + r.n

    # quarantine: the original row (raw_json) with reason and message; MERGE on (row_hash, occurrence) so a rerun of
    # the same input adds nothing, while k identical broken rows are kept as k rows.
    rejected = rows.where(F.col("reason").isNotNull()).withColumn("row_hash", F.sha2(F.col("raw_json"), 256))
    occ = F.row_number().over(Window.partitionBy("row_hash").orderBy("reason", "message"))
    quarantine = rejected.select(
        "experiment_id", "unit_id", "reason", "message", "raw_json", "row_hash",
        occ.cast("int").alias("occurrence"), F.lit(where).alias("source"))
    if table_exists(spark, cfg, QUARANTINE):  # MERGE only what is not stored as is (no no-op commit on a rerun)
        stored_q = read_table(spark, cfg, QUARANTINE)
        same = [quarantine[c].eqNullSafe(stored_q[c]) for c in quarantine.columns]
        quarantine = quarantine.join(stored_q, functools.reduce(lambda a, b: a & b, same), "left_anti")
        pending = quarantine.limit(1).count() > 0
    else:
        pending = True
    if pending:
        merge_table(spark, cfg, QUARANTINE, quarantine, keys=["row_hash", "occurrence"], update_when_changed=True)
    check_reject_share(rows, rows_in, quarantined, reasons, cfg, where)

    # units: new rows get a fold; changed rows (update rule) keep their stored fold.
    acc = rows.where(F.col("status").isin("new", "changed"))
    new = assign_folds(acc.where(F.col("status") == "new"), cfg.ingest.n_folds, cfg.ingest.fold_seed,
                       stored_counts)
    changed = acc.where(F.col("status") == "changed").withColumn("fold", F.col("__fold").cast("int"))
    cols = [F.col(f"`{c}`") for c in cmap.units_columns]
    to_merge = new.select(*cols).unionByName(changed.select(*cols))
    if first_ingest or by_status["new"] or by_status["changed"]:
        merged = merge_table(spark, cfg, UNITS, to_merge, keys=list(KEYS), update_when_changed=True,
                             partition_by=["experiment_id"], compare_columns=compare_cols)
    else:
        merged = {"inserted": 0, "updated": 0}
    if merged["inserted"] != by_status["new"] or merged["updated"] != by_status["changed"]:
        raise IngestInvariantError(f"units MERGE inserted {merged['inserted']} / updated {merged['updated']} rows but "
                                   f"{by_status['new']} were new / {by_status['changed']} changed")
    return {
        "source": where,
        "rows_in": rows_in,
        "accepted": accepted,
        "quarantined": quarantined,
        "inserted": by_status["new"],
        "updated": by_status["changed"],
        "unchanged": by_status["unchanged"],
        "reasons": dict(sorted(reasons.items())),
        "experiments": experiments,
        "units_version": table_version(spark, cfg, UNITS),
        "quarantine_version": table_version(spark, cfg, QUARANTINE),
    }
