"""Delta's per-commit latency on small tables, and what the stage runner does about it (issue 16, fixed costs).

Three measurements in one warm Spark session (the project's session: ``conf/local.yaml``'s ``local[2]``), printed
as one JSON line:

* ``tables``: writing ``--tables`` small tables (``--rows`` rows each) in one untracked stage, one
  ``StageContext.write_experiments`` after another vs one ``StageContext.write_experiment_tables`` (the first alone,
  the rest at once in threads) — once as first writes (the table created) and once as ``replaceWhere`` overwrites
  of the existing tables, each ``--repeats`` times (the median is printed);
* ``jobs``: the Spark jobs one write of each kind starts (a job group per write);
* ``lock``: the run lock's acquire on a fresh lakehouse (the process's first Delta commit), one renewal (a Delta
  UPDATE and a read of ``run_lock``) and the release.

    PYTHONPATH=lib OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_delta_commits.py --data-dir /tmp/bench_commits

The load average is printed with the numbers: on the 2-core VM every one of them follows the CPU share the
process gets.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "lib"))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True, help="a scratch directory (emptied first)")
    ap.add_argument("--tables", type=int, default=4)
    ap.add_argument("--rows", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    import shutil

    import numpy as np
    import pandas as pd
    from tokens2policy.config import load_config
    from tokens2policy.context import run_stage_job
    from tokens2policy.lakehouse.lock import RunLock
    from tokens2policy.lakehouse.session import get_spark
    from tokens2policy.stages import Stage

    shutil.rmtree(args.data_dir, ignore_errors=True)
    cfg = load_config(os.path.join(ROOT, "conf", "local.yaml"), [f"data_dir={args.data_dir}"])
    started = time.time()
    spark = get_spark(cfg)
    session_seconds = time.time() - started
    sc = spark.sparkContext

    lock = RunLock(spark, cfg, command="bench_delta_commits", echo=lambda m: None)
    t = time.time()
    lock.acquire()
    lock_seconds = {"acquire_first_commit_of_process": time.time() - t}
    t = time.time()
    assert lock.renew()
    lock_seconds["renew"] = time.time() - t
    t = time.time()
    lock.release()
    lock_seconds["release"] = time.time() - t

    rng = np.random.default_rng(0)
    pdf = pd.DataFrame({"experiment_id": ["e"] * args.rows, "k": np.arange(args.rows),
                        "x": rng.random(args.rows)})
    root = os.path.join(args.data_dir, "tables")  # the probes' tables (outside the lakehouse)

    def write(name, replace):
        w = spark.createDataFrame(pdf).write.format("delta").mode("overwrite").partitionBy("experiment_id")
        if replace:
            w = w.option("replaceWhere", "experiment_id = 'e'")
        w.save(os.path.join(root, name))

    def in_stage(names, job):
        """Run ``job(ctx, frames)`` as an untracked stage writing ``names``: the stage context's own writes (a
        ``replaceWhere`` overwrite when the table exists, a create otherwise), as identify/effects/policy do."""
        stage = Stage("bench", (), tuple(names), (), tracked=False)
        run_stage_job(spark, cfg, stage, lambda ctx: job(ctx, [(n, ctx.spark.createDataFrame(pdf)) for n in names]))

    def one_by_one(prefix):
        def job(ctx, frames):
            for name, df in frames:
                ctx.write_experiments(name, df, ["e"])
        in_stage([f"{prefix}{i}" for i in range(args.tables)], job)

    def first_then_together(prefix):
        in_stage([f"{prefix}{i}" for i in range(args.tables)],
                 lambda ctx, frames: ctx.write_experiment_tables(frames, ["e"]))

    for i in range(3):  # warm-up: the first Delta writes of a JVM pay class loading and JIT
        write(f"warm{i}", False)
    seconds = {k: [] for k in ("create_one_by_one", "create_first_then_together", "replace_one_by_one",
                               "replace_first_then_together")}
    for r in range(args.repeats):
        for kind in ("create", "replace"):  # the same tables twice: created, then overwritten (replaceWhere)
            for how, fn in (("one_by_one", one_by_one), ("first_then_together", first_then_together)):
                prefix = f"r{r}_{how}_"
                t = time.time()
                fn(prefix)
                seconds[f"{kind}_{how}"].append(time.time() - t)

    jobs = {}
    for replace, kind in ((False, "create"), (True, "replace_where"), ("append", "append")):
        sc.setJobGroup(f"bench_{kind}", kind)
        if replace == "append":
            spark.createDataFrame(pdf).write.format("delta").mode("append").save(os.path.join(root, "warm0"))
        else:
            write("jobs_probe" if not replace else "warm1", replace)
        jobs[kind] = len(sc.statusTracker().getJobIdsForGroup(f"bench_{kind}"))

    out = {"bench": "delta_commits", "tables": args.tables, "rows": args.rows, "repeats": args.repeats,
           "session_seconds": round(session_seconds, 2),
           "lock_seconds": {k: round(v, 2) for k, v in lock_seconds.items()},
           "median_seconds": {k: round(statistics.median(v), 2) for k, v in seconds.items()},
           "spark_jobs_per_write": jobs, "loadavg": [round(x, 2) for x in os.getloadavg()]}
    print(json.dumps(out), flush=True)
    spark.stop()
    return out


if __name__ == "__main__":
    main()
