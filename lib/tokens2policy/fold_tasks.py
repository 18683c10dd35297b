"""One Spark task per cross-fitting fold: the per-fold pattern shared by the effects and identify jobs.

Cross-fitted nuisances (EconML-style) fit fold k's model on the rows of the other folds. Such a model has no
additive statistics, so its training rows must meet in one task. :func:`run_fold_tasks` replicates each row once
per fold task (or, with ``training_only``, only into the K - 1 tasks whose model it trains), hash-partitions
the copies on a per-fold key chosen so that fold i's task lands in partition i (:func:`fold_partition_keys`),
and runs ``task(rows, fold)`` with ``groupBy(key).applyInPandas`` — K parallel Spark tasks; the grouping reuses
that partitioning, so there is one shuffle. Only the columns of the given DataFrame travel: select the few a
task needs first.

The task is a plain function of a pandas frame; Spark delivers its rows in no particular order, so a task that
must reproduce an in-memory fit sorts them by a stable unit key first.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Sequence

import pandas as pd

TASK_COLUMNS = "task_fold int, partition_id int, fit_seconds double"
_KEYS: Dict[int, List[int]] = {}  # n_folds -> partition keys (Spark's Murmur3 hash does not change)


def fold_partition_keys(spark, n_folds: int) -> List[int]:
    """For each i < n_folds a long key whose Spark hash lands in partition i of ``repartition(n_folds, key)`` —
    so the K fold tasks get K distinct partitions (plain hashing of 0..K-1 can put two folds in one task).
    Spark's hash is fixed, so the keys are found once per K (one small job) and remembered."""
    if n_folds not in _KEYS:
        from pyspark.sql import functions as F

        rows = spark.range(0, 64 * n_folds).select("id", F.expr(f"pmod(hash(id), {n_folds})").alias("p")).collect()
        first: Dict[int, int] = {}
        for r in rows:
            first.setdefault(int(r["p"]), int(r["id"]))
        if len(first) < n_folds:
            raise RuntimeError(f"could not find a partition key for each of {n_folds} folds")
        _KEYS[n_folds] = [first[i] for i in range(n_folds)]
    return list(_KEYS[n_folds])


def run_fold_tasks(spark, df, folds: Sequence[int], task: Callable[[pd.DataFrame, int], pd.DataFrame], schema: str,
                   fold_col: str = "fold", training_only: bool = False):
    """``task(rows, k)`` for each fold k in ``folds``, each in its own Spark task.

    rows: every row of ``df`` (the task trains on ``fold_col != k`` and may predict ``fold_col == k``), or with
    ``training_only`` just the rows of the other folds. ``schema`` is the DDL of the task's output; the result is a
    DataFrame with those columns plus ``task_fold``, ``partition_id`` and ``fit_seconds`` (so callers can check
    and log the task layout)."""
    from pyspark.sql import functions as F

    folds = [int(k) for k in folds]
    if len(folds) < 2:
        raise ValueError(f"cross-fitting needs at least 2 folds, got {folds}")
    keys = fold_partition_keys(spark, len(folds))
    fold_df = spark.createDataFrame(list(zip(folds, keys)), "task_fold int, task_key long")
    replicated = df.crossJoin(F.broadcast(fold_df))
    if training_only:
        replicated = replicated.where(F.col(fold_col) != F.col("task_fold"))
    replicated = replicated.repartition(len(folds), "task_key")

    def one_task(pdf: pd.DataFrame) -> pd.DataFrame:
        from pyspark import TaskContext

        start = time.perf_counter()
        k = int(pdf["task_fold"].iloc[0])
        res = task(pdf.drop(columns=["task_fold", "task_key"]), k)
        ctx = TaskContext.get()
        return res.assign(task_fold=k, partition_id=ctx.partitionId() if ctx else -1,
                          fit_seconds=time.perf_counter() - start)

    return replicated.groupBy("task_key").applyInPandas(one_task, f"{schema}, {TASK_COLUMNS}")
