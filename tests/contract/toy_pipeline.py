"""A two-stage toy pipeline on the real runner (real Spark, Delta, stage_runs, run lock), also runnable as a process:

    python tests/contract/toy_pipeline.py DATA_DIR [--force b] [--set key=value ...]

(environment: ``TOY_B_SECONDS`` makes ``b`` sleep first, ``TOY_GO_FILE`` = a path: the runner starts once it exists).

Stage ``a`` writes ``t_a`` (``ingest.n_folds`` rows); stage ``b`` reads it and writes two tables, ``t_b`` then
``t_b2`` (two commits, so a kill between them leaves ``t_b`` new and ``t_b2`` old), both stamped with a ``token``
unique to that execution of ``b``, so a table pair from two different executions is visible. Errors print one line and exit 2,
like ``t2p``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import uuid

from pyspark.sql import functions as F

from tokens2policy.stages import Stage

A = Stage("a", (), ("t_a",), ("ingest",), tracked=False)
B = Stage("b", ("t_a",), ("t_b", "t_b2"), ("identify",), tracked=False)
STAGES = (A, B)


def stage_a(ctx):
    n = ctx.config.ingest.n_folds
    ctx.write("t_a", ctx.spark.range(n).withColumnRenamed("id", "x"))
    return {"rows": n}


def stage_b(ctx):
    pause = float(os.environ.get("TOY_B_SECONDS", "0"))
    if pause:
        time.sleep(pause)
    src = ctx.read("t_a").withColumn("token", F.lit(uuid.uuid4().hex))
    scale = ctx.config.identify.max_rounds
    ctx.write("t_b", src.withColumn("y", F.col("x") * scale))
    ctx.write("t_b2", src.withColumn("z", F.col("x") + scale))
    return {}


JOBS = {"a": stage_a, "b": stage_b}
TOY_PATH = os.path.abspath(__file__)


def main(argv=None) -> int:
    from tokens2policy.config import ConfigError, load_config
    from tokens2policy.lakehouse import get_spark
    from tokens2policy.lakehouse.lock import LockHeldError
    from tokens2policy.stages import run_stages

    p = argparse.ArgumentParser()
    p.add_argument("data_dir")
    p.add_argument("--force", action="append", default=[])
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args(argv)
    cfg = load_config(None, [f"data_dir={args.data_dir}", "spark.driver_memory=1g", "spark.shuffle_partitions=2",
                             "spark.app_name=toy", *args.overrides])
    spark = get_spark(cfg)
    go = os.environ.get("TOY_GO_FILE")  # racers: say ready, then start the runner when the file appears
    print(f"[toy] pid {os.getpid()} ready", flush=True)
    while go and not os.path.exists(go):
        time.sleep(0.02)
    try:
        # progress lines on stdout, flushed, as `t2p run` shows them (run_stages' default echo is the logger)
        run_stages(spark, cfg, ["a", "b"], force=args.force, stages=STAGES, resolve=JOBS.__getitem__,
                   echo=lambda line: print(line, flush=True))
    except (ConfigError, LockHeldError) as exc:
        print(f"t2p: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
