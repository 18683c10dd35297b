"""The represent stage: train the dictionary, encode every unit into sparse neurons, label the neurons.

Reads ``embeddings`` (document vectors) and/or ``token_states`` (token vectors), per ``represent.train_on``;
writes ``neurons``, ``neuron_stats``, ``neuron_labels`` (docs/represent.md, docs/tables.md) and one MLflow run
with the fitted representation logged (and registered) as a pyfunc model plus its quality metrics.

Data flow: with a distributed backend the training view (filtered to one model version) is written once by
Spark to the staging table ``represent_training``; training workers read their own parquet shards of that
snapshot (the driver only lists files). The local backend and the baselines train in the driver process, so
they collect the view through Arrow instead. In memory (``execution`` scope ``represent``, :func:`execution_choice`:
the default while the document vectors fit the driver bounds) the keys and vectors are collected once and encoding,
the quality sums, ``neuron_stats`` and the labelling sample run on the driver (docs/represent.md). On Spark,
encoding is a ``mapInPandas`` over ``embeddings`` with the fitted model broadcast once and loaded once per Python
worker; with ``represent.encode=tokens_maxpool`` the token states are encoded the same way and max-pooled per unit
(:func:`pool_token_codes`; units without sampled token states keep their document code). Labelling runs on the
driver on a deterministic sample of at most ``represent.label_max_docs`` units (texts from ``units``) and
``represent.label_max_tokens`` token states.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import replace
from typing import Optional

import numpy as np

from tokens2policy.config import Config, ConfigError
from tokens2policy.lakehouse.schemas import table_spec

from .baselines import load_representation, make_representation
from .distributed import BackendUnavailableError, delta_source, horovod_available, train_distributed
from .labels import label_neurons
from .sae import SAEParams, SparseAutoencoder, csr_to_rows, latents_for_corpus, reconstruction_metrics, rows_to_csr

OK_STATUS = ("ok", "truncated", "chunked")
TRAINING_ORDER = ("experiment_id", "unit_id", "position")  # the local trainer's input order (deterministic reruns)
REGISTERED_MODEL = "tokens2policy-represent"

# ------------------------------------------------------------------------------------------------
# model shipping: a saved representation directory as bytes, loaded once per Python worker
# ------------------------------------------------------------------------------------------------
_WORKER_CACHE: dict = {}


def _pack(rep) -> bytes:
    tmp = tempfile.mkdtemp(prefix="t2p_rep_")
    try:
        rep.save(tmp)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            for name in sorted(os.listdir(tmp)):
                z.write(os.path.join(tmp, name), name)
        return buf.getvalue()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _unpack(payload: bytes):
    key = hashlib.sha256(payload).hexdigest()
    if key not in _WORKER_CACHE:
        tmp = tempfile.mkdtemp(prefix="t2p_rep_")
        with zipfile.ZipFile(io.BytesIO(payload)) as z:
            z.extractall(tmp)
        _WORKER_CACHE.clear()
        _WORKER_CACHE[key] = load_representation(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
    return _WORKER_CACHE[key]


def stack_vectors(vectors) -> np.ndarray:
    """A column of vectors (lists / arrays) as one float32 (rows x dim) matrix."""
    return np.stack([np.asarray(v, dtype=np.float32) for v in vectors])


def encode_rows(rep, x: np.ndarray):
    """The code of each row of ``x`` and its reconstruction terms: (indices per row int32, values per row float32,
    sse = ||x - decode(encode(x))||^2, sq = ||x||^2), the float64 sums of which give the exact quality metrics.
    One function for the Spark encoding (per Arrow batch, :func:`encode_frame`) and the in-memory one."""
    z = rep.encode(x)
    xh = rep.decode(z).astype(np.float64)
    idx, val = csr_to_rows(z)
    return idx, val, ((x - xh) ** 2).sum(1), (x.astype(np.float64) ** 2).sum(1)


def encode_frame(spark, df, rep, vector_col: str = "vector", keep=("experiment_id", "unit_id")):
    """Spark: rows with a vector column -> (keep..., indices array<int>, values array<float>, sse, sq)
    where sse = ||x - decode(encode(x))||^2 and sq = ||x||^2 (for exact distributed quality metrics)."""
    from pyspark.sql import types as T

    bc = spark.sparkContext.broadcast(_pack(rep))
    fields = [df.schema[c] for c in keep] + [
        T.StructField("indices", T.ArrayType(T.IntegerType())), T.StructField("values", T.ArrayType(T.FloatType())),
        T.StructField("sse", T.DoubleType()), T.StructField("sq", T.DoubleType())]
    keep = list(keep)

    def _encode(batches):
        model = _unpack(bc.value)
        for pdf in batches:
            if pdf.empty:
                continue
            idx, val, sse, sq = encode_rows(model, stack_vectors(pdf[vector_col]))
            out = pdf[keep].copy()
            out["indices"] = [i.tolist() for i in idx]
            out["values"] = [v.tolist() for v in val]
            out["sse"] = sse
            out["sq"] = sq
            yield out

    return df.select(*keep, vector_col).mapInPandas(_encode, T.StructType(fields))


def pool_token_codes(spark, tokens, doc_codes, rep, keys=("experiment_id", "unit_id")):
    """Spark: each unit's code as the max over the codes of its token states (``represent.encode=tokens_maxpool``).

    tokens: token-state rows (keys..., vector); doc_codes: one row per unit (keys..., indices, values).
    Returns one row per row of ``doc_codes``: (keys..., indices, values, pooled_tokens). A unit with token states
    gets z_j = max_t z_tj over its tokens t (codes are ReLU outputs, so a neuron inactive on every token stays 0,
    and the pooled code says "some token of this text expresses atom j this strongly", which a mean-pooled
    document vector can blur). ``token_states`` holds a *sample* of units: a unit without token states keeps its
    document code and gets ``pooled_tokens = 0`` (never dropped); otherwise ``pooled_tokens`` counts its tokens.
    The pooled code is not bounded by k (up to k x tokens active neurons).
    """
    from pyspark.sql import functions as F

    keys = list(keys)
    tok_codes = encode_frame(spark, tokens.join(doc_codes.select(*keys), keys, "left_semi"), rep, keep=keys)
    counts = tok_codes.groupBy(*keys).agg(F.count(F.lit(1)).cast("int").alias("pooled_tokens"))
    maxima = (tok_codes.select(*keys, F.explode(F.arrays_zip("indices", "values")).alias("c"))
              .groupBy(*keys, F.col("c.indices").alias("neuron")).agg(F.max("c.values").alias("value"))
              .groupBy(*keys).agg(F.array_sort(F.collect_list(F.struct("neuron", "value"))).alias("c")))
    pooled = counts.join(maxima, keys, "left").select(
        *keys,
        F.coalesce(F.transform("c", lambda s: s["neuron"]), F.array().cast("array<int>")).alias("indices"),
        F.coalesce(F.transform("c", lambda s: s["value"]), F.array().cast("array<float>")).alias("values"),
        "pooled_tokens")
    kept = doc_codes.join(counts.select(*keys), keys, "left_anti").select(
        *keys, "indices", "values", F.lit(0).alias("pooled_tokens"))
    return pooled.unionByName(kept)


# ------------------------------------------------------------------------------------------------
# pyfunc wrapper logged to MLflow
# ------------------------------------------------------------------------------------------------

def _pyfunc_class():
    import mlflow.pyfunc

    class RepresentationModel(mlflow.pyfunc.PythonModel):
        """Input: DataFrame with a ``vector`` column (list of floats). Output: ``indices``/``values`` columns."""

        def load_context(self, context):
            self.rep = load_representation(context.artifacts["representation"])

        def predict(self, context, model_input, params=None):
            import pandas as pd

            x = np.stack([np.asarray(v, dtype=np.float32) for v in model_input["vector"]])
            idx, val = csr_to_rows(self.rep.encode(x))
            return pd.DataFrame({"indices": [i.tolist() for i in idx], "values": [v.tolist() for v in val]})

    return RepresentationModel


def model_signature():
    """Input: ``vector`` (an array of numbers: the embedding; array<float> columns widen safely); output: the sparse
    code as ``indices``/``values``."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec(Array("double"), "vector")]),
                          outputs=Schema([ColSpec(Array("integer"), "indices"), ColSpec(Array("double"), "values")]))


def _log_model(cfg: Config, rep, dim: int, register: bool):
    """Log the representation as a pyfunc (signature, an input example, requirements on the built wheel), register
    it under ``tracking.represent_model_name`` and move the ``tracking.model_alias`` alias to the new version.

    Returns (ModelInfo, the model's pinned URI: ``models:/<name>/<version>`` when registered, else ``runs:/...``).
    """
    import mlflow
    import pandas as pd

    from tokens2policy.tracking import model_name, package_requirement, register_alias

    requirement, extra = package_requirement(cfg)
    name = model_name(cfg, "represent", experiment=cfg.represent.experiment_id)
    tmp = tempfile.mkdtemp(prefix="t2p_rep_")
    try:
        rep.save(os.path.join(tmp, "representation"))
        info = mlflow.pyfunc.log_model(
            name="representation", python_model=_pyfunc_class()(),
            artifacts={"representation": os.path.join(tmp, "representation"), **extra},
            signature=model_signature(),
            # a zero vector: a valid input that carries no unit's data
            input_example=pd.DataFrame({"vector": [np.zeros(int(dim), dtype=np.float32).tolist()]}),
            # explicit requirements: inferring them loads the model in a subprocess (slow, and offline here)
            pip_requirements=[requirement, "torch", "numpy", "scipy", "scikit-learn", "pandas"],
            registered_model_name=name if register else None)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    version = getattr(info, "registered_model_version", None)
    if register and version:
        register_alias(cfg, name, version)
        return info, f"models:/{name}/{version}"
    return info, info.model_uri


def represent_model_uri(spark, cfg: Config, neurons_version: Optional[int]) -> Optional[str]:
    """The model that wrote ``neurons`` at ``neurons_version``: the pinned URI represent stored in that commit's
    metadata (None for neurons written otherwise)."""
    from tokens2policy.lakehouse import commit_metadata

    if neurons_version is None:
        return None
    meta = commit_metadata(spark, cfg, "neurons", neurons_version)
    try:
        return json.loads(meta).get("represent_model_uri") if meta else None
    except (ValueError, AttributeError):
        return None


# ------------------------------------------------------------------------------------------------
# the job
# ------------------------------------------------------------------------------------------------

def _pick_model_hash(emb, wanted):
    """(model version, its vectors, their width): ``wanted``, else the version with the most vectors. One Spark
    job, whose counts also size the execution choice."""
    from pyspark.sql import functions as F

    # one row per model version: sorted here (most vectors first, then by name: Spark's orderBy(desc(n), model_hash),
    # strings by code point), not by Spark's global sort, which samples its input in an extra job
    rows = sorted(emb.groupBy("model_hash").agg(F.count("*").alias("n"), F.max("dim").alias("dim")).collect(),
                  key=lambda r: (-r["n"], r["model_hash"] is not None, r["model_hash"] or ""))
    if wanted:
        row = next((r for r in rows if r["model_hash"] == wanted), None)
        return wanted, int(row["n"]) if row else 0, int(row["dim"] or 0) if row else 0
    if not rows:
        raise ValueError("embeddings has no usable vectors (status ok/truncated/chunked): run the embed stage first")
    return rows[0]["model_hash"], int(rows[0]["n"]), int(rows[0]["dim"] or 0)


def _token_states(spark, cfg: Config, model_hash: str, needed_by: str | None = None):
    """token_states of one embedding version (and ``represent.experiment_id``); None when the table does not exist,
    or a one-line error naming the setting ``needed_by`` that requires it."""
    from pyspark.sql import functions as F

    from tokens2policy.lakehouse import read_table, table_exists

    if not table_exists(spark, cfg, "token_states"):
        if needed_by:
            raise ValueError(f"{needed_by} needs token_states, which the embed stage has not written")
        return None
    tok = read_table(spark, cfg, "token_states").where(F.col("model_hash") == model_hash)
    if cfg.represent.experiment_id:
        tok = tok.where(F.col("experiment_id") == cfg.represent.experiment_id)
    return tok.where(F.col("vector").isNotNull())


def _training_view(spark, cfg: Config, emb, model_hash: str):
    from pyspark.sql import functions as F

    rc = cfg.represent
    parts = []
    if rc.train_on in ("documents", "both"):  # a document vector sorts before its unit's token vectors
        parts.append(emb.select(*TRAINING_ORDER[:2], F.lit(-1).alias("position"), "vector"))
    if rc.train_on in ("tokens", "both"):
        parts.append(_token_states(spark, cfg, model_hash, f"represent.train_on={rc.train_on}")
                     .select(*TRAINING_ORDER, "vector"))
    view = parts[0]
    for p in parts[1:]:
        view = view.unionByName(p)
    return view.where(F.col("vector").isNotNull())


def resolve_n_latents(cfg: Config, emb) -> int | None:
    """``represent.n_latents``, or from the data when it is null and ``represent.docs_per_latent`` is set (the
    number of distinct texts: ``content_hash`` of the embeddings; units sharing a text count once). ``emb``: the
    Spark frame, or its rows collected to a pandas frame (the in-memory path)."""
    import pandas as pd

    rc = cfg.represent
    if rc.n_latents is not None or rc.docs_per_latent is None or rc.kind != "sae":
        return rc.n_latents
    if isinstance(emb, pd.DataFrame):
        n, dim = emb["content_hash"].nunique(dropna=True), emb["dim"].max()
    else:
        row = emb.selectExpr("count(distinct content_hash) as n", "max(dim) as dim").first()
        n, dim = row["n"], row["dim"]
    return latents_for_corpus(int(n), rc.k, rc.docs_per_latent, rc.expansion * int(dim))


def nested_prefixes(prefixes, n_latents) -> tuple:
    """The configured Matryoshka prefixes that fit the dictionary (a data-sized dictionary may be smaller than a
    prefix; n_latents None: all)."""
    return tuple(int(p) for p in prefixes if n_latents is None or int(p) < int(n_latents))


def trains_on_driver(rc) -> bool:
    """The baselines and the SAE's local backend train in the driver process (on the collected vectors)."""
    return rc.kind != "sae" or rc.backend == "local"


def _fit(spark, cfg: Config, train_df, on_epoch=None, n_latents=None, source=None):
    """Fit the representation on ``train_df`` (the training view), or on ``source``: its vectors already collected
    in TRAINING_ORDER (the in-memory path's document vectors)."""
    from tokens2policy.lakehouse import read_table, write_table

    rc = cfg.represent
    n_latents = rc.n_latents if n_latents is None else n_latents
    if source is not None:
        if len(source) == 0:
            raise ValueError("no training vectors for represent.train_on=" + rc.train_on)
    elif trains_on_driver(rc):
        # one process trains on everything anyway: collect the vectors (Arrow) instead of staging a copy, in a
        # fixed order (Spark's partition order is not one), so a rerun trains on the same sequence
        pdf = _sorted_frame(train_df.select(*TRAINING_ORDER, "vector"), TRAINING_ORDER)[["vector"]]
        if pdf.empty:
            raise ValueError("no training vectors for represent.train_on=" + rc.train_on)
        source = stack_vectors(pdf["vector"])
        del pdf
    else:
        # workers read their own parquet shards of a staged snapshot (no deletion vectors, no column mapping)
        n_files = max(2, int(rc.num_processes) * 2)
        write_table(train_df.select("vector").repartition(n_files), cfg, "represent_training", mode="overwrite",
                    overwrite_schema=True)
        source = delta_source(spark, read_table(spark, cfg, "represent_training"), column="vector")
    if rc.kind != "sae":  # the baselines are for ablations on data that fits one machine
        params = {"n_components": rc.pca_components, "seed": cfg.seed} if rc.kind == "pca" else {}
        return make_representation(rc.kind, **params).fit(source)
    params = SAEParams(n_latents=n_latents, expansion=rc.expansion, k=rc.k, lr=rc.lr, epochs=rc.epochs,
                       batch_size=rc.batch_size, seed=cfg.seed, aux_k=rc.aux_k, num_threads=rc.num_threads,
                       matryoshka=nested_prefixes(rc.matryoshka, n_latents))
    return train_distributed(source, params, backend=rc.backend, num_processes=rc.num_processes,
                             use_gpu=rc.use_gpu, spark=spark, on_epoch=on_epoch)


def _sorted_frame(df, keys):
    """``df.orderBy(*keys).toPandas()`` with the sort done on the driver: Spark's global sort samples its input in
    an extra job (recomputing the joins and scans upstream) and shuffles the wide rows, which a driver-side sort of
    the collected frame avoids. Same row order: Spark orders strings by UTF-8 bytes, i.e. by code point, as Python
    does, integers numerically, nulls first in ascending order (``na_position="first"``); the keys used here
    identify a row, so there are no ties whose order could differ."""
    pdf = df.toPandas()
    return pdf.sort_values(list(keys), kind="stable", na_position="first").reset_index(drop=True)


def _sample_fraction(n: int, cap: int) -> float:
    return 1.0 if n <= cap else cap / float(n)


def _sample_key():
    """The labelling sample's key of a unit, in [0, 1e6): a hash of (experiment_id, unit_id) computed by Spark on
    either path (the in-memory path collects it with the vectors), so both label the same units."""
    from pyspark.sql import functions as F

    return F.abs(F.hash("experiment_id", "unit_id")) % 1000000


def _labels(spark, cfg: Config, rep, neurons, model_hash: str, n_units: int):
    """Spark path of the labelling: the sampled units' codes (``neurons``) joined to their texts (``units``) and
    document vectors, collected in key order (:func:`label_units` labels them)."""
    from pyspark.sql import functions as F

    from tokens2policy.lakehouse import read_table

    frac = _sample_fraction(n_units, cfg.represent.label_max_docs)
    keyed = neurons.select("experiment_id", "unit_id", "indices", "values")
    if frac < 1.0:
        keyed = keyed.where(_sample_key() < int(frac * 1000000))
    units = read_table(spark, cfg, "units").select("experiment_id", "unit_id", "text")
    emb = read_table(spark, cfg, "embeddings").where(F.col("model_hash") == model_hash).select(
        "experiment_id", "unit_id", "vector")
    rows = _sorted_frame(keyed.join(units, ["experiment_id", "unit_id"]).join(emb, ["experiment_id", "unit_id"]),
                         ("experiment_id", "unit_id"))
    return label_units(spark, cfg, rep, rows, model_hash)


def _labels_in_memory(spark, cfg: Config, rep, codes, x: np.ndarray, model_hash: str):
    """In-memory path of the labelling: ``codes`` (the driver frame of every unit's code in key order, with its
    ``sample`` key; ``x`` its document vectors, row for row) restricted to the labelling sample, with the texts of
    only those units collected from ``units``."""
    from pyspark.sql import functions as F

    from tokens2policy.lakehouse import read_table

    keys = list(KEYS)
    frac = _sample_fraction(len(codes), cfg.represent.label_max_docs)
    units = read_table(spark, cfg, "units")
    if cfg.represent.experiment_id:
        units = units.where(F.col("experiment_id") == cfg.represent.experiment_id)
    keep = np.ones(len(codes), dtype=bool)
    if frac < 1.0:
        units = units.where(_sample_key() < int(frac * 1000000))
        keep = codes["sample"].to_numpy() < int(frac * 1000000)
    rows = codes.loc[keep, keys + ["indices", "values"]].reset_index(drop=True)
    rows["vector"] = list(x[keep])
    texts = units.select(*keys, "text").toPandas()
    rows = rows.merge(texts, on=keys, how="inner")  # the Spark path's inner join
    rows = rows.sort_values(keys, kind="stable", na_position="first").reset_index(drop=True)
    return label_units(spark, cfg, rep, rows, model_hash)


def label_units(spark, cfg: Config, rep, rows, model_hash: str):
    """Driver-side interpretation of the labelling sample ``rows`` (experiment_id, unit_id, indices, values, text,
    vector; key order), one function for both paths. Top documents rank the codes stored in ``neurons`` (document
    or max-pooled token codes); bottom documents the document vectors' encoder scores; top tokens encode at most
    ``represent.label_max_tokens`` token states."""
    rc = cfg.represent
    if rows.empty:
        return []
    x = stack_vectors(rows["vector"])
    codes = rows_to_csr(rows["indices"].tolist(), rows["values"].tolist(), int(rep.n_latents_))
    score_blocks = (rep.scores(x[a:a + 2048]) for a in range(0, len(x), 2048))
    ids = [f"{e}/{u}" if rc.experiment_id is None else str(u) for e, u in zip(rows["experiment_id"], rows["unit_id"])]
    tok_codes = tokens = None
    tok = _token_states(spark, cfg, model_hash) if rc.label_max_tokens > 0 else None
    if tok is not None:
        tpdf = tok.select("token", "vector").limit(int(rc.label_max_tokens)).toPandas()
        if not tpdf.empty:
            tx = stack_vectors(tpdf["vector"])
            if tx.shape[1] == x.shape[1]:
                tok_codes, tokens = rep.encode(tx), tpdf["token"].astype(str).tolist()
    return label_neurons(codes, rows["text"].astype(str).tolist(), ids, scores=score_blocks,
                         token_codes=tok_codes, tokens=tokens, n_top_docs=rc.label_top_docs,
                         n_examples=rc.n_examples, redact_text=rc.redact)


def run(spark, cfg: Config) -> dict:
    """Run the represent stage directly (tests, notebooks): :func:`main` under a stage context."""
    from tokens2policy.context import run_job

    return run_job(spark, cfg, "represent", main, preflight=preflight)


def preflight(spark, cfg) -> None:
    """Settings that cannot work fail in one line before any work (and before the MLflow run opens)."""
    from tokens2policy.stages import require_gpu

    rc = cfg.represent
    if rc.encode == "tokens_maxpool" and rc.kind != "sae":
        raise ConfigError(f"represent.encode=tokens_maxpool max-pools non-negative SAE codes; kind={rc.kind} codes "
                          "can be negative (use encode=document)")
    if rc.kind == "sae" and rc.backend == "horovod":
        ok, why = horovod_available()
        if not ok:  # one line through the CLI, before any work is done
            raise ConfigError(why)
    if rc.kind == "sae" and rc.use_gpu and rc.backend != "local":
        require_gpu(spark, f"represent.use_gpu=true (backend {rc.backend})", "--set represent.use_gpu=false")


KEYS = table_spec("neurons").keys  # a unit: the key of the table this stage writes (lakehouse/schemas.py)


def execution_choice(cfg: Config, n_vectors: int, dim: int):
    """In memory or on Spark (scope ``represent``, :func:`tokens2policy.execution.choose` on the document vectors:
    ``n_vectors`` rows x ``dim`` columns). In memory, the keys and vectors are collected once and encoding, the
    quality metrics, the neuron statistics and the labelling sample come from that driver frame; on Spark, each is a
    Spark job over the tables. The distributed training backends train on Spark workers: always the Spark path."""
    from tokens2policy.execution import choose

    rc = cfg.represent
    choice = choose(cfg.execution, "represent", n_vectors, dim, 0)
    if choice.mode == "memory" and not trains_on_driver(rc):
        return replace(choice, mode="spark",
                       reason=f"represent.backend={rc.backend} trains on Spark workers ({choice.reason})")
    return choice


def neuron_stats_frame(indices, values, n_units: int, n_latents: int):
    """The ``neuron_stats`` rows from the codes on the driver (per-row indices / values): what the Spark path's
    explode + aggregation computes (activation sums in float64 of the stored float32 values)."""
    import pandas as pd

    lens = np.fromiter((len(i) for i in indices), dtype=np.int64, count=len(indices))
    flat_i = np.concatenate([np.asarray(i, dtype=np.int64) for i in indices]) if lens.sum() else np.zeros(0, np.int64)
    flat_v = (np.concatenate([np.asarray(v, dtype=np.float32) for v in values]).astype(np.float64)
              if lens.sum() else np.zeros(0))
    n_active = np.bincount(flat_i, minlength=n_latents).astype(np.int64)
    sums = np.bincount(flat_i, weights=flat_v, minlength=n_latents)
    n = max(int(n_units), 1)
    return pd.DataFrame({"neuron": np.arange(n_latents, dtype=np.int32), "n_active": n_active,
                         "activation_frequency": n_active / n, "mean_activation": sums / n,
                         "mean_activation_when_active": np.where(n_active > 0, sums / np.maximum(n_active, 1), 0.0)})


def _neuron_stats_spark(spark, neurons, n_units: int, n_latents: int):
    """The ``neuron_stats`` rows by Spark over the written codes (one pass), collected: n_latents rows."""
    import pandas as pd
    from pyspark.sql import functions as F

    exploded = neurons.select(F.explode(F.arrays_zip("indices", "values")).alias("c")).select(
        F.col("c.indices").alias("neuron"), F.col("c.values").alias("value"))
    active = exploded.groupBy("neuron").agg(F.count("*").alias("n_active"), F.sum("value").alias("sum_value"))
    stats = (spark.range(n_latents).select(F.col("id").cast("int").alias("neuron"))
             .join(active, "neuron", "left").fillna({"n_active": 0, "sum_value": 0.0})
             .select("neuron", F.col("n_active").cast("long"),
                     (F.col("n_active") / F.lit(max(n_units, 1))).alias("activation_frequency"),
                     (F.col("sum_value") / F.lit(max(n_units, 1))).alias("mean_activation"),
                     F.when(F.col("n_active") > 0, F.col("sum_value") / F.col("n_active"))
                     .otherwise(F.lit(0.0)).alias("mean_activation_when_active"))
             .orderBy("neuron"))
    return pd.DataFrame([r.asDict() for r in stats.collect()], columns=stats.columns)


def main(ctx) -> dict:
    """Train (or fit a baseline), encode every unit, compute neuron statistics and labels."""
    from pyspark.sql import functions as F

    from tokens2policy.progress import spark_progress

    spark, cfg = ctx.spark, ctx.config
    rc = cfg.represent
    keys = list(KEYS)
    emb = ctx.read("embeddings").where(
        F.col("status").isin(*OK_STATUS) & F.col("vector").isNotNull())
    if rc.experiment_id:
        emb = emb.where(F.col("experiment_id") == rc.experiment_id)
    clock = ctx.clock.reset()
    clock.echo = ctx.echo  # each step's time as it ends

    with clock.timed("total"):
        model_hash, n_vectors, width = _pick_model_hash(emb, rc.model_hash)
        emb = emb.where(F.col("model_hash") == model_hash)
        ctx.log_params({"resolved.model_hash": model_hash, "resolved.seed": cfg.seed,
                        "resolved.training_order": ", ".join(TRAINING_ORDER)})
        choice = execution_choice(cfg, n_vectors, width)
        choice.record(ctx)
        memory = choice.mode == "memory"
        frame = x = None
        if memory:  # keys and vectors collected once, in the trainer's order (TRAINING_ORDER of document vectors)
            sizing = [c for c in ("content_hash", "dim") if c in emb.columns]  # resolve_n_latents' columns
            frame = _sorted_frame(emb.select(*keys, *sizing, "vector", _sample_key().alias("sample")), keys)
            x = stack_vectors(frame.pop("vector")) if len(frame) else np.zeros((0, 0), dtype=np.float32)
        try:
            note = f"SAE, {rc.epochs} epochs, backend {rc.backend}" if rc.kind == "sae" else rc.kind
            with spark_progress(spark, "represent: train", note=note) as bar:

                def show(epoch, entry, bar=bar, note=note, epochs=rc.epochs):
                    bar.set_label(f"{note}: epoch {epoch + 1}/{epochs}, "
                                  f"{entry['dead_fraction_train']:.0%} latents dead")

                n_latents = resolve_n_latents(cfg, frame if memory else emb)
                # train_on=documents: the training view is the collected document vectors, in the same order
                source = x if memory and rc.train_on == "documents" else None
                rep = _fit(spark, cfg, _training_view(spark, cfg, emb, model_hash), on_epoch=show,
                           n_latents=n_latents, source=source)
        except BackendUnavailableError as err:
            raise ConfigError(str(err)) from None
        n_latents = int(rep.n_latents_)
        clock.lap("train")

        spark_codes = None
        if memory:
            idx, val, sse, sq = encode_rows(rep, x)
            n_units, sse_sum, sq_sum = len(x), float(sse.sum()), float(sq.sum())
            col_sums = x.astype(np.float64).sum(0)
            codes = frame[keys + ["sample"]].copy()
            codes["indices"] = [i.tolist() for i in idx]
            codes["values"] = [v.tolist() for v in val]
            codes["pooled_tokens"] = 0
            neurons = ctx.frame("neurons", codes)
            dim = x.shape[1]
        else:
            spark_codes = encode_frame(spark, emb, rep).persist()
            with spark_progress(spark, "represent: encode"):
                agg = spark_codes.agg(F.count("*").alias("n"), F.sum("sse").alias("sse"),
                                      F.sum("sq").alias("sq")).collect()[0]
            n_units, sse_sum, sq_sum = int(agg["n"]), float(agg["sse"] or 0.0), float(agg["sq"] or 0.0)
            # the vectors' width is the fitted model's input width (encode_frame above checked every vector against it)
            dim = int(getattr(rep, "n_features_in_", 0) or 0) or len(emb.select("vector").first()["vector"])
            # FVE's column means by a Spark aggregate
            sums = emb.select([F.sum(F.col("vector")[i]).alias(f"s{i}") for i in range(dim)]).collect()[0]
            col_sums = np.array([sums[f"s{i}"] for i in range(dim)], dtype=np.float64)
            neurons = spark_codes.select(*keys, "indices", "values").withColumn("pooled_tokens", F.lit(0))
        # FVE needs the centred total sum of squares: sum ||x||^2 - n ||mean||^2
        mean = col_sums / max(n_units, 1)
        sst = sq_sum - n_units * float(mean @ mean)
        pooled = rc.encode == "tokens_maxpool"
        if pooled:
            tok = _token_states(spark, cfg, model_hash, "represent.encode=tokens_maxpool")
            neurons = pool_token_codes(spark, tok, neurons.drop("pooled_tokens"), rep)
        # the model first, so that the neurons' commit records the exact version that produced them
        info, model_uri = _log_model(cfg, rep, dim, register=rc.register_model)
        ctx.write("neurons", neurons, mode="overwrite", overwrite_schema=True,
                  user_metadata=json.dumps({"represent_model_uri": model_uri, "mlflow_run_id": ctx.run_id}))
        if pooled or not memory:
            # the written codes, not a recomputation (token pooling is an expensive plan)
            neurons = ctx.read("neurons")
        if memory and pooled:  # the pooled codes back on the driver once, in key order (the rows of x)
            codes = _sorted_frame(neurons.select(*keys, "indices", "values", "pooled_tokens",
                                                 _sample_key().alias("sample")), keys)
        if memory:
            nnz = int(sum(len(i) for i in codes["indices"]))
            n_pooled = int((codes["pooled_tokens"] > 0).sum())
        else:
            written = neurons.agg(F.sum(F.size("indices")).alias("nnz"),
                                  F.sum((F.col("pooled_tokens") > 0).cast("long")).alias("pooled")).collect()[0]
            nnz, n_pooled = int(written["nnz"] or 0), int(written["pooled"] or 0)
        clock.lap("encode")

        # one row per neuron: computed once (one pass over the codes), written from the driver and counted there
        stats = (neuron_stats_frame(codes["indices"], codes["values"], n_units, n_latents) if memory
                 else _neuron_stats_spark(spark, neurons, n_units, n_latents))
        ctx.write("neuron_stats", ctx.frame("neuron_stats", stats), mode="overwrite", overwrite_schema=True)
        n_dead = int((stats["n_active"] == 0).sum())

        metrics = {
            "normalized_mse": sse_sum / sq_sum if sq_sum else float("nan"),
            "fraction_variance_explained": 1.0 - sse_sum / sst if sst > 0 else float("nan"),
            "dead_fraction": n_dead / float(n_latents),
            "mean_l0": float(nnz) / max(n_units, 1),
            "n_units": float(n_units), "n_latents": float(n_latents),
            # encode=tokens_maxpool: units whose code pools token states / keeps the document code (no sampled tokens)
            "units_token_pooled": float(n_pooled),
            "units_document_code": float(n_units - n_pooled),
        }
        ctx.log_metrics(metrics)
        ctx.log_params({"resolved.kind": rep.kind, "resolved.n_latents": n_latents,
                           "resolved.backend": getattr(rep, "training_info_", {}).get("backend", "n/a")})
        if rc.kind == "sae" and getattr(rep, "history_", None):
            for h in rep.history_:
                ctx.log_metrics({"train_mse_normalized_space": h["train_mse_normalized_space"]}, step=h["epoch"])
        clock.lap("stats")

        labels = (_labels_in_memory(spark, cfg, rep, codes, x, model_hash) if memory
                  else _labels(spark, cfg, rep, neurons, model_hash, n_units))
        schema = ctx.schema("neuron_labels")

        def docs(ds):
            return [{"unit_id": str(d["unit_id"]), "activation": float(d["activation"]), "snippet": d["snippet"]}
                    for d in ds]

        label_rows = [{"neuron": int(l["neuron"]), "label": l["label"], "top_terms": [t for t, _ in l["top_terms"]],
                       "top_term_z": [float(z) for _, z in l["top_terms"]], "top_docs": docs(l["top_docs"]),
                       "bottom_docs": docs(l["bottom_docs"]), "top_tokens": [t for t, _ in l["top_tokens"]],
                       "n_active_sample": int(l["n_active"])} for l in labels]
        ctx.write("neuron_labels", spark.createDataFrame(label_rows, schema), mode="overwrite",
                  overwrite_schema=True)
        ctx.log_dict({"labels": label_rows}, "neuron_labels.json")
        if spark_codes is not None:
            spark_codes.unpersist()
        clock.lap("labels")
    summary = {"model_hash": model_hash, "kind": rep.kind, "n_units": n_units, "n_latents": n_latents,
               "model_uri": model_uri, "seconds": dict(clock.laps), "execution": choice.as_dict(),
               "registered_version": (int(info.registered_model_version)
                                      if getattr(info, "registered_model_version", None) else None),
               "encode": rc.encode, "units_document_code": int(metrics["units_document_code"]),
               **{k: metrics[k] for k in ("normalized_mse", "fraction_variance_explained", "dead_fraction", "mean_l0")}}
    return summary
