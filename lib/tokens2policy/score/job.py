"""The score stage: new units (raw text + covariates) → the registered policy's recommendation, in Delta ``scores``.

Steps (docs/score.md):

1. read the input (``score.input``; ``score.kind`` or inferred: files by URI — delta/parquet/csv/json —, a catalog
   table, or a query) with ingest's reader (:func:`tokens2policy.ingest.job.read_source`) and its column mapping
   (the ``source`` section's ids, text and covariate columns; no treatment or outcome is needed);
2. classify every row with ingest's checks (:func:`tokens2policy.ingest.validate.classify_rows`): a rejected row is
   MERGEd into ``score_quarantine`` with ingest's reason code, message and the raw row — never dropped;
3. resolve the policy model of each (experiment, outcome) (:mod:`tokens2policy.score.models`) and score the
   accepted rows at scale through ``mlflow.pyfunc.spark_udf`` (:func:`tokens2policy.policy.pyfunc.spark_scorer`);
4. MERGE into ``scores`` on (experiment_id, unit_id, outcome): a stored row is replaced only when its input row
   (``input_fingerprint``) or model changed, so rerunning the same input commits nothing; check that
   ``input rows = scored + quarantined``.
"""
from __future__ import annotations

import functools
import logging
from typing import Dict, List, Tuple

from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from tokens2policy.config import Config, ConfigError
from tokens2policy.lakehouse.schemas import table_spec

log = logging.getLogger(__name__)

# the two output tables; their columns, keys and partitioning live in the table registry (lakehouse/schemas.py)
SCORES = "scores"
SCORE_QUARANTINE = "score_quarantine"
# a stored score is replaced only when its input row or its model changed (a rerun commits nothing)
SCORES_COMPARE = ("input_fingerprint", "model_uri")

FILE_KINDS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json", ".ndjson": "json"}


class ScoreInvariantError(RuntimeError):
    """Rows were lost or double-counted between the input and the two output tables."""


def input_kind(spark: SparkSession, cfg: Config) -> str:
    """``score.kind``, else inferred from ``score.input``: a name without ``/`` or ``:`` is a catalog table; a
    location holding ``_delta_log`` is Delta; else the file extension (a directory or glob of parquet files too)."""
    from tokens2policy.lakehouse import storage

    sc = cfg.score
    if sc.kind:
        return sc.kind
    text = sc.input.strip()
    if "/" not in text and ":" not in text and not any(text.lower().endswith(e) for e in FILE_KINDS):
        return "table"
    for ext, kind in FILE_KINDS.items():
        if text.lower().rstrip("/").endswith(ext) or text.lower().endswith(ext.lstrip(".") + "/"):
            return kind
    if "*" not in text and storage.exists(storage.join(storage.resolve(text), "_delta_log"), spark):
        return "delta"
    raise ConfigError(f"cannot tell the format of score.input={text!r} (no .parquet/.csv/.json extension and no "
                      "Delta table there): set score.kind (delta, parquet, csv, json, table or query)")


def scoring_config(spark: SparkSession, cfg: Config) -> Config:
    """``cfg`` with its ``source`` pointed at the score input (same column mapping): what ingest's reader reads."""
    sc = cfg.score
    if not sc.input or not sc.input.strip():
        raise ConfigError("nothing to score: give --input PATH_OR_TABLE (score.input)")
    kind = input_kind(spark, cfg)
    key = {"table": "table", "query": "query"}.get(kind, "path")
    update = {"kind": kind, "path": None, "table": None, "query": None, key: sc.input.strip()}
    if sc.experiment_id is not None:
        update["experiment_id"] = sc.experiment_id
    return cfg.model_copy(update={"source": cfg.source.model_copy(update=update)})


def quarantine_frame(rows: DataFrame, where: str) -> DataFrame:
    """Rejected rows as ``score_quarantine`` rows: keyed by the raw row's hash and its occurrence, so a rerun of
    the same input adds nothing while k identical broken rows stay k rows."""
    rejected = rows.where(F.col("reason").isNotNull()).withColumn("row_hash", F.sha2(F.col("raw_json"), 256))
    occ = F.row_number().over(Window.partitionBy("row_hash").orderBy("reason", "message"))
    return rejected.select(*[(occ.cast("int") if f.name == "occurrence" else
                              F.lit(where) if f.name == "source" else F.col(f.name)).cast(f.dataType).alias(f.name)
                             for f in table_spec(SCORE_QUARANTINE).schema().fields])


def _not_stored(spark: SparkSession, cfg: Config, name: str, df: DataFrame, columns: List[str]) -> DataFrame:
    """The rows of ``df`` not stored as they are (equal on ``columns``, nulls equal): what a MERGE would change.
    Merging only those keeps a rerun of the same input from committing an empty MERGE."""
    from tokens2policy.lakehouse import read_table, table_exists

    if not table_exists(spark, cfg, name):
        return df
    stored = read_table(spark, cfg, name).select(*[F.col(c).alias(f"__s_{c}") for c in columns])
    same = functools.reduce(lambda a, b: a & b, [F.col(c).eqNullSafe(F.col(f"__s_{c}")) for c in columns])
    return df.join(stored, same, "left_anti")


def _models(cfg: Config, pairs: List[Tuple[str, str]]):
    from tokens2policy.score.models import explicit_model, last_policy_run, registered_models, stage_model

    if cfg.score.model_uri:
        model = explicit_model(cfg.score.model_uri)
        return {pair: model for pair in pairs}
    run_id = last_policy_run(cfg)
    versions = registered_models(run_id) if run_id else []
    return {(exp, outcome): stage_model(cfg, exp, outcome, run_id, versions) for exp, outcome in pairs}


def score_frame(spark: SparkSession, accepted: DataFrame, experiment_id: str, outcome: str, model,
                where: str) -> DataFrame:
    """One experiment's accepted rows scored by one model through ``mlflow.pyfunc.spark_udf``, as ``scores`` rows."""
    from tokens2policy.policy.pyfunc import spark_scorer

    missing = [c for c in model.inputs if c not in accepted.columns]
    if missing:
        raise ConfigError(f"the policy model {model.uri} needs input column(s) {missing} that the input does not map "
                          f"(source.text_cols → text, source.covariate_cols: {accepted.columns})")
    udf = spark_scorer(spark, model.uri)
    part = accepted.where(F.col("experiment_id") == F.lit(experiment_id))
    scored = part.select("experiment_id", "unit_id", "input_fingerprint",
                         udf(*model.inputs).alias("p"))
    values = {"outcome": F.lit(outcome), "treat": F.col("p.recommended"), "model_name": F.lit(model.name),
              "model_version": F.lit(model.version), "model_uri": F.lit(model.uri), "source": F.lit(where),
              "scored_at": F.current_timestamp()}
    return scored.select(*[(values[f.name] if f.name in values else
                            F.col(f"p.{f.name}") if f.name in ("cate", "ci_low", "ci_high", "rule", "leaf_id",
                                                                 "embed_status") else F.col(f.name))
                           .cast(f.dataType).alias(f.name) for f in table_spec(SCORES).schema().fields])


def run(spark: SparkSession, cfg: Config) -> dict:
    """Score ``score.input`` (module docstring); return counts, the models used and the ``scores`` version."""
    import mlflow

    from tokens2policy.ingest.job import read_source
    from tokens2policy.ingest.validate import classify_rows, map_columns
    from tokens2policy.lakehouse import merge_table, table_version
    from tokens2policy.tracking import configure_mlflow, stage_run

    src_cfg = scoring_config(spark, cfg)
    raw, where = read_source(spark, src_cfg)
    cmap = map_columns(raw.schema, src_cfg, where, pre_treatment_only=True)
    outcomes = [cfg.score.outcome] if cfg.score.outcome else list(cfg.source.outcome_cols)
    rows = classify_rows(raw, cmap).withColumn("input_fingerprint", F.sha2(F.col("raw_json"), 256))
    rows = rows.persist(StorageLevel.MEMORY_AND_DISK)
    try:
        accepted = rows.where(F.col("reason").isNull())
        experiments = sorted(r[0] for r in accepted.select("experiment_id").distinct().collect())
        configure_mlflow(cfg)
        models = _models(cfg, [(e, o) for e in experiments for o in outcomes])  # a missing model: before writing
        with stage_run(cfg, "score", inputs={SCORES: table_version(spark, cfg, SCORES)}):
            counts = rows.groupBy("reason").agg(F.count(F.lit(1)).alias("n")).collect()
            rows_in = raw.count()
            reasons = {r.reason: int(r.n) for r in counts if r.reason is not None}
            n_accepted = sum(int(r.n) for r in counts if r.reason is None)
            if rows_in != n_accepted + sum(reasons.values()):
                raise ScoreInvariantError(f"score lost or duplicated rows: input {rows_in}, accepted {n_accepted}, "
                                          f"quarantined {sum(reasons.values())}")
            if reasons:
                quarantine = _not_stored(spark, cfg, SCORE_QUARANTINE, quarantine_frame(rows, where),
                                         [f.name for f in table_spec(SCORE_QUARANTINE).schema().fields])
                if quarantine.limit(1).count():
                    merge_table(spark, cfg, SCORE_QUARANTINE, quarantine, keys=list(table_spec(SCORE_QUARANTINE).keys))
            merged = {"inserted": 0, "updated": 0, "unchanged_or_kept": 0}
            if experiments:
                frames = [score_frame(spark, accepted, e, o, models[(e, o)], where) for e in experiments
                          for o in outcomes]
                scores = functools.reduce(DataFrame.unionByName, frames).persist(StorageLevel.MEMORY_AND_DISK)
                try:
                    n_scored = scores.count()
                    if n_scored != n_accepted * len(outcomes):
                        raise ScoreInvariantError(f"scored {n_scored} rows for {n_accepted} accepted units x "
                                                  f"{len(outcomes)} outcome(s)")
                    pending = _not_stored(spark, cfg, SCORES, scores, [*table_spec(SCORES).keys, *SCORES_COMPARE])
                    n_pending = pending.count()
                    if n_pending:
                        merged = merge_table(spark, cfg, SCORES, pending, keys=list(table_spec(SCORES).keys),
                                             partition_by=list(table_spec(SCORES).partition_by),
                                             compare_columns=list(SCORES_COMPARE))
                    merged["unchanged_or_kept"] = n_scored - n_pending + merged["unchanged_or_kept"]
                finally:
                    scores.unpersist()
            summary = {
                "source": where, "rows_in": rows_in, "scored": n_accepted, "quarantined": sum(reasons.values()),
                "reasons": dict(sorted(reasons.items())), "outcomes": outcomes,
                "models": {f"{e}/{o}": m.uri for (e, o), m in models.items()},
                "inserted": merged["inserted"], "updated": merged["updated"],
                "unchanged": merged["unchanged_or_kept"],
                "scores_version": table_version(spark, cfg, SCORES),
                "quarantine_version": table_version(spark, cfg, SCORE_QUARANTINE),
            }
            mlflow.log_metrics({k: summary[k] for k in ("rows_in", "scored", "quarantined", "inserted", "updated")})
            mlflow.log_dict(summary, "score_summary.json")
    finally:
        rows.unpersist()
    log.info("[t2p] score: %d row(s) from %s: %d scored (%d new, %d updated), %d quarantined%s", summary["rows_in"],
             where, summary["scored"], summary["inserted"], summary["updated"], summary["quarantined"],
             "".join(f"; {k}: {v}" for k, v in summary["models"].items()))
    return summary
