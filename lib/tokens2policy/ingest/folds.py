"""Deterministic cross-fitting folds, balanced across treatment arms.

Each unit gets a stable pseudo-random key ``h = first 60 bits of sha256("experiment_id␟unit_id␟seed")`` — the same
on every machine, Spark version and partitioning. Within each (experiment, arm) the new units are ranked by
``(h, unit_id)`` and dealt round-robin to the K folds, continuing after the ``n_stored`` units of that arm already
stored: ``fold = (n_stored + rank) mod K``. So every arm's fold sizes differ by at most one after a one-shot ingest
(and stay within one after incremental batches), the order is a uniformly random permutation of the arm (the hash
acts as a random key), and a stored unit's fold never changes — cross-fitting downstream is reproducible.
"""
from __future__ import annotations

import hashlib
from typing import Optional

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

SEP = "\u001f"


def fold_key(seed: int) -> Column:
    """Spark column: the stable 60-bit hash of (experiment_id, unit_id, seed)."""
    text = F.concat_ws(SEP, F.col("experiment_id"), F.col("unit_id"), F.lit(str(int(seed))))
    return F.conv(F.substring(F.sha2(text, 256), 1, 15), 16, 10).cast("long")


def fold_key_py(experiment_id: str, unit_id: str, seed: int) -> int:
    """The same hash in plain Python (for checks and tests)."""
    text = SEP.join((str(experiment_id), str(unit_id), str(int(seed))))
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:15], 16)


def assign_folds(units: DataFrame, n_folds: int, seed: int, stored_counts: Optional[DataFrame] = None) -> DataFrame:
    """Add ``fold`` (int in [0, n_folds)) to new units; ``stored_counts`` has (experiment_id, treatment, n_stored)."""
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    w = Window.partitionBy("experiment_id", "treatment").orderBy("__key", "unit_id")
    df = units.withColumn("__key", fold_key(seed))
    if stored_counts is not None:
        df = df.join(F.broadcast(stored_counts), ["experiment_id", "treatment"], "left")
    else:
        df = df.withColumn("n_stored", F.lit(0).cast("long"))
    rank = F.row_number().over(w) - 1
    fold = ((F.coalesce(F.col("n_stored"), F.lit(0)) + rank) % n_folds).cast("int")
    return df.withColumn("fold", fold).drop("__key", "n_stored")
