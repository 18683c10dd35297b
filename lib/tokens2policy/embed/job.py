"""The embed stage: ``units`` → ``embeddings`` (one vector per unit) and ``token_states`` (a sample of token vectors).

Incremental and resumable by construction:

* a unit is *done* for a model version when ``embeddings`` holds its ``(experiment_id, unit_id, model_hash)`` with
  the content hash of its current text; a run embeds only the units that are not done, so a rerun after a crash
  (or after new units arrive) picks up exactly the remainder, and a unit whose text changed (ingest updates rows)
  gets its row replaced (a MERGE instead of an append, still one commit) and its token states redone;
* identical texts are embedded once per run (grouped by a SHA-256 content hash) and never again across runs
  (a new unit whose content hash already has a vector for this model reuses it);
* each table gets one Delta commit per run (an append of the new rows), so a job killed mid-way leaves
  either all of a table's new rows or none — never a partial batch;
* ``token_states`` is written before ``embeddings`` and is itself keyed by missing ``(unit, model_hash)``, so a
  crash between the two commits is also completed by the rerun without duplicates.

The token-state sample is a deterministic Bernoulli(``embed.token_sample_rate``) draw per unit (a hash of
``seed``, experiment and unit id), so reruns and incremental runs sample the same units.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Union

from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from tokens2policy.config import Config
from tokens2policy.context import Clock
from tokens2policy.embed.models import ModelSpec, resolve_model
from tokens2policy.embed.udf import make_embed_udf
from tokens2policy.lakehouse import delta_table, last_commit, read_table, sql_string_literal, table_exists, write_table
from tokens2policy.lakehouse.schemas import table_spec
from tokens2policy.progress import spark_progress
from tokens2policy.tracking import tracking_uri

KEYS = ["experiment_id", "unit_id"]
ROWS_PER_PARTITION = 20_000
_SAMPLE_SCALE = 1_000_000


def sample_mask(seed: int, rate: float):
    """Column: True for the units whose token states are kept — P(True) = ``rate``, stable across runs."""
    threshold = int(round(rate * _SAMPLE_SCALE))
    h = F.xxhash64(F.lit(int(seed)), F.col("experiment_id").cast("string"), F.col("unit_id").cast("string"))
    return F.pmod(h, F.lit(_SAMPLE_SCALE)) < F.lit(threshold)


def _empty(spark: SparkSession, schema) -> DataFrame:
    return spark.createDataFrame([], schema)


def _rows_written(spark, cfg, name: str) -> int:
    return int(last_commit(spark, cfg, name)[2].get("numOutputRows", 0))


def _key_match(h: str) -> str:
    return "t.experiment_id <=> s.experiment_id AND t.unit_id <=> s.unit_id AND t.model_hash = " + sql_string_literal(h)


def _delete_units(spark, cfg, name: str, keys: DataFrame, h: str) -> None:
    """Delete a table's rows of ``model_hash = h`` for the units in ``keys`` (one Delta commit)."""
    delta_table(spark, cfg, name).alias("t").merge(keys.select(*KEYS).alias("s"), _key_match(h)) \
        .whenMatchedDelete().execute()


def _upsert(spark, cfg, name: str, rows: DataFrame, h: str) -> None:
    """Insert ``rows``, replacing the stored row of the same unit and model version (one Delta commit)."""
    delta_table(spark, cfg, name).alias("t").merge(rows.alias("s"), _key_match(h)) \
        .whenMatchedUpdateAll().whenNotMatchedInsertAll().execute()


def embed_units(spark: SparkSession, cfg: Config, spec: ModelSpec, units: DataFrame,
                clock: Optional[Clock] = None) -> dict:
    """Embed the units of ``units`` that are missing for ``spec.model_hash``; append to both tables.

    Returns counts: ``n_units_embedded`` (rows added to or replaced in ``embeddings``: units without a vector of
    their current text for this model version, whether their text was run through the model or shared an earlier
    identical text's vector), ``n_units_changed`` (units whose text changed since their vector was stored),
    ``n_texts_embedded`` (distinct texts run through the model), ``n_token_rows`` (rows appended to
    ``token_states``), ``status`` (per-status counts of the texts embedded in this run) and timings (also kept in
    ``clock``: ``plan``, ``embed``, ``write``).
    """
    e = cfg.embed
    missing_cols = [c for c in (*KEYS, "text") if c not in units.columns]
    if missing_cols:
        raise ValueError(f"units table lacks column(s) {missing_cols}; the embed stage needs experiment_id, unit_id, text")
    key_types = {f.name: f.dataType.simpleString() for f in units.schema.fields if f.name in KEYS}
    emb_schema = table_spec("embeddings").schema(key_types=key_types)
    tok_schema = table_spec("token_states").schema(key_types=key_types)
    h = spec.model_hash
    clock = (clock or Clock()).reset()

    # read, deduplicated and hashed once: the plan below and both writes reuse it (no second scan of units)
    units = (
        units.select(*KEYS, F.col("text").cast("string").alias("text"))
        .dropDuplicates(KEYS)
        .withColumn("content_hash", F.sha2(F.coalesce(F.col("text"), F.lit("")), 256))
        .withColumn("sampled", sample_mask(cfg.seed, e.token_sample_rate))
    ).persist(StorageLevel.MEMORY_AND_DISK)
    have_emb = table_exists(spark, cfg, "embeddings")
    have_tok = table_exists(spark, cfg, "token_states")

    # units without a vector of their *current* text for this model version (new units, or changed texts);
    # on a first run (no table yet) that is every unit: no anti-join against an empty table, no count of changes
    n_changed, known = 0, None
    if have_emb:
        emb = read_table(spark, cfg, "embeddings").where(F.col("model_hash") == h)
        todo = units.join(emb.select(*KEYS, "content_hash"), [*KEYS, "content_hash"], "left_anti")
        changed = todo.join(emb.select(*KEYS), KEYS, "left_semi").select(*KEYS, "sampled")
        n_changed = changed.count()
        known = emb.select("content_hash", "vector", "dim", "status", "n_tokens").dropDuplicates(["content_hash"])
    else:
        todo = units
    todo_states = units.where("sampled")
    if have_tok:
        tok = read_table(spark, cfg, "token_states").where(F.col("model_hash") == h)
        todo_states = todo_states.join(tok.select(*KEYS).distinct(), KEYS, "left_anti")
    if n_changed:  # a changed text's old states are replaced too
        todo_states = todo_states.unionByName(
            units.join(changed.where("sampled").select(*KEYS), KEYS, "left_semi")).dropDuplicates(KEYS)

    need_vec = (todo if known is None else todo.join(known.select("content_hash"), "content_hash", "left_anti")) \
        .select("content_hash", "text", F.lit(False).alias("want_states"))
    need_states = todo_states.select("content_hash", "text", F.lit(True).alias("want_states"))
    work = (
        need_vec.unionByName(need_states)
        .groupBy("content_hash")
        .agg(F.first("text").alias("text"), F.max("want_states").alias("want_states"))
    ).persist(StorageLevel.MEMORY_AND_DISK)
    n_work = work.count()
    plan_seconds = clock.lap("plan")

    parallelism = spark.sparkContext.defaultParallelism
    n_parts = e.partitions or max(1, min(max(parallelism, math.ceil(n_work / ROWS_PER_PARTITION)), max(n_work, 1)))
    embed = make_embed_udf(spec, e.load_log)
    computed = (
        work.repartition(n_parts, "content_hash")
        .sortWithinPartitions(F.length("text").desc())  # length-sorted inside each partition: little padding
        .select("content_hash", embed(F.col("text"), F.col("want_states")).alias("r"))
        .select("content_hash", "r.*")
    ).persist(StorageLevel.MEMORY_AND_DISK)

    # one pass over the model; both writes below read the persisted result
    with spark_progress(spark, "embed: model pass", note=f"{n_work:,} texts"):
        counts = computed.groupBy("status").agg(
            F.count(F.lit(1)).alias("count"), F.sum(F.col("states").isNotNull().cast("long")).alias("with_states")
        ).collect() if n_work else []
    status_counts = {r["status"]: int(r["count"]) for r in counts}
    n_with_states = sum(int(r["with_states"] or 0) for r in counts)
    embed_seconds = clock.lap("embed")
    n_computed = sum(status_counts.values())
    work.unpersist()

    # 1) token states of the sampled units still missing them (one commit)
    n_token_rows = 0
    if n_with_states:
        states_rows = (
            todo_states.select(*KEYS, "content_hash")
            .join(computed.where(F.col("states").isNotNull()).select("content_hash", "positions", "tokens", "states"),
                  "content_hash")
            .select(*KEYS, F.lit(h).alias("model_hash"),
                    F.explode(F.arrays_zip("positions", "tokens", "states")).alias("z"))
            .select(*KEYS, "model_hash", F.col("z.positions").cast("int").alias("position"),
                    F.col("z.tokens").alias("token"), F.col("z.states").alias("vector"))
        )
        if n_changed and have_tok:  # drop the stale states of changed texts first (a rerun re-adds them)
            _delete_units(spark, cfg, "token_states", changed.where("sampled"), h)
        write_table(states_rows, cfg, "token_states", mode="append", partition_by=["experiment_id"])
        n_token_rows = _rows_written(spark, cfg, "token_states")
    elif not have_tok:
        write_table(_empty(spark, tok_schema), cfg, "token_states", mode="append", partition_by=["experiment_id"])

    # 2) one vector per missing unit: fresh ones and those shared with already-embedded identical texts (one commit)
    n_written = 0
    if n_work or todo.limit(1).count():
        fresh = computed.select("content_hash", "vector", "dim", "status", "n_tokens")
        vec_source = fresh if known is None else known.unionByName(
            fresh.join(known.select("content_hash"), "content_hash", "left_anti"))
        emb_rows = todo.select(*KEYS, "content_hash").join(vec_source, "content_hash").select(
            *KEYS,
            F.lit(spec.name).alias("model"),
            F.lit(h).alias("model_hash"),
            "content_hash",
            "vector",
            F.col("dim").cast("int").alias("dim"),
            "status",
            F.col("n_tokens").cast("int").alias("n_tokens"),
        )
        if n_changed:  # replace the changed units' rows and add the new ones in one MERGE commit
            _upsert(spark, cfg, "embeddings", emb_rows, h)
            metrics = last_commit(spark, cfg, "embeddings")[2]
            n_written = int(metrics.get("numTargetRowsInserted", 0)) + int(metrics.get("numTargetRowsUpdated", 0))
        else:
            write_table(emb_rows, cfg, "embeddings", mode="append", partition_by=["experiment_id"])
            n_written = _rows_written(spark, cfg, "embeddings")
    elif not have_emb:
        write_table(_empty(spark, emb_schema), cfg, "embeddings", mode="append", partition_by=["experiment_id"])
    computed.unpersist()
    units.unpersist()
    write_seconds = clock.lap("write")

    return {
        "model": spec.name,
        "model_hash": h,
        "weights_hash": spec.weights_hash,
        "n_units_embedded": n_written,
        "n_units_changed": n_changed,
        "n_texts_embedded": n_computed,
        "n_token_rows": n_token_rows,
        "status": status_counts,
        "partitions": n_parts,
        "plan_seconds": round(plan_seconds, 3),  # what is missing, dedup (before the model)
        "embed_seconds": round(embed_seconds, 3),  # the model pass
        "write_seconds": round(write_seconds, 3),  # both Delta commits
        "texts_per_second": round(n_computed / embed_seconds, 1) if embed_seconds > 0 and n_computed else None,
    }


def run(spark: SparkSession, cfg: Config, loader: Union[str, Callable, None] = None) -> dict:
    """Run the embed stage directly (tests, notebooks, benchmarks): :func:`main` under a stage context."""
    from tokens2policy.context import run_job

    return run_job(spark, cfg, "embed", lambda ctx: main(ctx, loader=loader), preflight=preflight)


def preflight(spark, cfg) -> None:
    """One line before any work when ``embed.device=cuda`` and no GPU is there."""
    if cfg.embed.device == "cuda":
        from tokens2policy.stages import require_gpu

        require_gpu(spark, "embed.device=cuda",
                    "--set embed.device=auto (the GPU when there is one, else the CPU)")


def main(ctx, loader: Union[str, Callable, None] = None) -> dict:
    """Embed every unit missing from ``embeddings`` for the configured model version.

    ``loader`` overrides ``embed.loader`` with an import path or a callable ``ModelSpec -> EmbeddingModel``
    (a plug-in model without a config change; tests use it to inject failures).
    """
    spark, cfg = ctx.spark, ctx.config
    units = ctx.read("units")
    spec = resolve_model(cfg.embed, spark, tracking_uri=tracking_uri(cfg),
                         registry_uri=cfg.tracking.registry_uri, loader=loader)
    ctx.log_params({"resolved.model_hash": spec.model_hash, "resolved.weights_hash": spec.weights_hash,
                    "resolved.model_name": spec.name, "resolved.cpu_threads": str(spec.cpu_threads)})
    summary = embed_units(spark, cfg, spec, units, clock=ctx.clock)
    ctx.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float)) and v is not None})
    ctx.log_metrics({f"status.{k}": v for k, v in summary["status"].items()})
    return summary
