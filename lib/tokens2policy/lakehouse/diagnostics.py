"""Where does the code run? A tiny cluster diagnostic job.

``cluster_check`` runs one task per partition on the executors; each task reports the process id, host name,
Spark executor id and the file its copy of ``tokens2policy`` was imported from, and the rows are written to the
``cluster_check`` Delta table together with the driver's own pid and host. On a real cluster (or the loopback
standalone cluster of ``tests/deploy``) that table shows that the work ran in executor processes other than the
driver, and that the package shipped with ``--py-files`` (not a copy installed next to the driver) did the work.
"""
from __future__ import annotations

import os
import socket
from typing import Dict, Iterator

from tokens2policy.config import Config

TABLE = "cluster_check"


def _probe(index: int, rows: Iterator) -> Iterator[tuple]:
    """Runs on an executor: one row describing this Python worker process."""
    import tokens2policy
    from pyspark import TaskContext

    n = sum(1 for _ in rows)
    # Standalone workers start each executor in <work_dir>/<app id>/<executor id>/, the Python worker's cwd.
    cwd = os.getcwd()
    executor = os.environ.get("SPARK_EXECUTOR_ID")
    if executor is None and TaskContext.get() is not None and os.path.basename(os.path.dirname(cwd)).startswith("app-"):
        executor = os.path.basename(cwd)
    yield (
        int(index),
        int(n),
        int(os.getpid()),
        socket.gethostname(),
        str(executor) if executor is not None else None,
        os.path.abspath(tokens2policy.__file__),
        cwd,
    )


def run(spark, config: Config, partitions: int = 8) -> Dict[str, object]:
    """Write ``cluster_check`` (one row per partition) and return a summary of where the tasks ran."""
    from pyspark.sql.types import IntegerType, LongType, StringType, StructField, StructType

    from tokens2policy.lakehouse.tables import table_location, write_table

    if partitions < 1:
        raise ValueError(f"partitions must be >= 1, got {partitions}")
    sc = spark.sparkContext
    rows = (
        sc.parallelize(range(partitions * 16), partitions)
        .mapPartitionsWithIndex(_probe)
        .collect()
    )
    driver_pid, driver_host = os.getpid(), socket.gethostname()
    schema = StructType(
        [
            StructField("partition", IntegerType(), False),
            StructField("n_rows", LongType(), False),
            StructField("pid", LongType(), False),
            StructField("hostname", StringType(), False),
            StructField("executor_id", StringType(), True),
            StructField("module_file", StringType(), False),
            StructField("cwd", StringType(), False),
            StructField("driver_pid", LongType(), False),
            StructField("driver_host", StringType(), False),
            StructField("master", StringType(), False),
            StructField("app_id", StringType(), False),
        ]
    )
    data = [(*r, driver_pid, driver_host, sc.master, sc.applicationId) for r in rows]
    # Enough partitions that the Delta write itself is also spread over the executors.
    df = spark.createDataFrame(data, schema).repartition(min(partitions, 4))
    write_table(df, config, TABLE, mode="overwrite")
    pids = sorted({r[2] for r in rows})
    return {
        "table": table_location(config, TABLE),
        "master": sc.master,
        "app_id": sc.applicationId,
        "driver_pid": driver_pid,
        "executor_pids": pids,
        "n_executor_processes": len(pids),
        "ran_off_driver": driver_pid not in pids,
        "executor_ids": sorted({r[4] for r in rows if r[4] is not None}),
        "module_files": sorted({r[5] for r in rows}),
    }
