"""identify → effects → policy at scale: the real stage runner on a synthetic experiment of N units.

A fresh lakehouse gets ``units`` and ``neurons`` from :mod:`tokens2policy.scale_experiment` (4,096 neurons, k = 32
active per unit, 5 planted direct effect modifiers each with a co-activating proxy, prognostic neurons,
covariates, clusters, folds — generated in Spark tasks, not on the driver), then each stage runs through
``tokens2policy.stages.run_stages`` (``--force``), exactly as ``t2p run`` would. Prints one JSON line:

* ``seconds`` and ``spark_jobs`` per stage (every Spark job the stage started, the runner's own reads/writes of
  ``stage_runs`` included: counted with a Spark job tag around the stage);
* identify: ``rounds`` (distinct (phase, round) of the selection trace), ``jobs_per_round``, and any pass counts
  the identify stage reports in its summary (keys containing ``pass``);
* ``cpu_seconds`` per stage: CPU time of the driver's Python process and of the JVM (threads included, Spark's
  Python workers not) — on a shared machine a steadier measure of the work than the wall time;
* ``peak_rss_mb``: the driver's Python process and the JVM (in local mode the JVM holds driver and executors), each
  the peak of a 0.2 s sampler over the stage (Spark's Python workers are not included);
* selections: ``selected`` neurons, ``planted``, ``recovered`` (planted ∩ selected), ``proxies_selected`` and
  ``false_selected`` (selected neither planted nor proxy), and how many proxies the marginal screen flags.

    .venv/bin/python benchmarks/bench_pipeline_scale.py --n 20000
    .venv/bin/python benchmarks/bench_pipeline_scale.py --n 1000000 --test hc2 --driver-memory 8g --data-dir /d/1m \
        --stages identify
    .venv/bin/python benchmarks/bench_pipeline_scale.py --n 1000000 --data-dir /d/1m --reuse  # gcm, then the rest

Timings depend on the machine's load: record it (``load_average`` is in the output). The stages run through Spark
at every N (``execution.mode=spark``; ``--set execution.mode=auto`` measures the size-chosen path instead).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import threading
import time

os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

STAGES = ("identify", "effects", "policy")


def _rss_mb(pid) -> float:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def _cpu_seconds(pid) -> float:
    """User + system CPU seconds of a process so far (its threads included, its children not)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return float("nan")


class PeakRss:
    """Samples the RSS of some processes every ``every`` seconds; ``peak`` per process while running."""

    def __init__(self, pids: dict, every: float = 0.2):
        self.pids, self.every = pids, every
        self.peak = {k: 0.0 for k in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            for name, pid in self.pids.items():
                v = _rss_mb(pid)
                if v == v:
                    self.peak[name] = max(self.peak[name], v)
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000, help="units")
    ap.add_argument("--m", type=int, default=4096, help="neurons")
    ap.add_argument("--k", type=int, default=32, help="active neurons per unit")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test", default=None, help="identify.test (default: the config default, gcm)")
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--driver-memory", default="6g")
    ap.add_argument("--data-dir", default=None, help="a fresh directory (default: a new temp dir, removed after)")
    ap.add_argument("--set", action="append", default=[], help="extra config overrides key=value")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--reuse", action="store_true",
                    help="run the stages on the experiment already generated in --data-dir (same --n/--m/--k/--seed): "
                         "a long run split into chunks, e.g. identify with one test, then another, then the rest")
    args = ap.parse_args(argv)

    from tokens2policy.config import load_config
    from tokens2policy.lakehouse import get_spark, read_table
    from tokens2policy.scale_experiment import ScaleDesign, generate
    from tokens2policy.stages import run_stages

    root = args.data_dir or tempfile.mkdtemp(prefix="t2p_bench_scale_")
    reuse = os.path.exists(os.path.join(root, "lakehouse"))
    if reuse and not args.reuse:
        raise SystemExit(f"{root} already holds a lakehouse: give a fresh --data-dir (or --reuse)")
    overrides = [f"data_dir={root}", f"spark.master={args.master}", f"spark.driver_memory={args.driver_memory}",
                 "spark.session=create", *([f"identify.test={args.test}"] if args.test else []),
                 "execution.mode=spark",  # the distributed path at every N (auto would run small N in memory)
                 *args.set]
    cfg = load_config(None, overrides)
    t0 = time.perf_counter()
    spark = get_spark(cfg)
    jvm_start = time.perf_counter() - t0
    sc = spark.sparkContext
    pids = {"python": os.getpid(), "jvm": int(spark._jvm.java.lang.ProcessHandle.current().pid())}

    def tagged(tag):
        return len(sc._jsc.sc().statusTracker().getJobIdsForTag(tag))

    def log(msg):
        print(f"[bench_pipeline_scale] {msg}", file=sys.stderr, flush=True)

    design = ScaleDesign(n=args.n, m=args.m, k=args.k, seed=args.seed)
    t0 = time.perf_counter()
    sc.addJobTag("bench-generate")
    with PeakRss(pids) as gen_rss:
        truth = design.truth() if reuse else generate(spark, cfg, design)
    sc.removeJobTag("bench-generate")
    out = {"n": args.n, "m": args.m, "k": args.k, "master": args.master, "driver_memory": args.driver_memory,
           "identify_test": cfg.identify.test, "execution": cfg.execution.mode, "overrides": args.set,
           "jvm_start_seconds": round(jvm_start, 2),
           "generate_seconds": None if reuse else round(time.perf_counter() - t0, 2),
           "generate_jobs": tagged("bench-generate"), "reused_data": reuse,
           "seconds": {}, "spark_jobs": {}, "peak_rss_mb": {"generate": {k: round(v) for k, v in gen_rss.peak.items()}}}
    log(f"reused the {args.n:,} units in {root}" if reuse else f"generated {args.n:,} units in {out['generate_seconds']} s")

    summaries = {}
    for stage in [s for s in args.stages.split(",") if s]:
        tag = f"bench-{stage}"
        sc.addJobTag(tag)
        t0 = time.perf_counter()
        cpu0 = {k: _cpu_seconds(p) for k, p in pids.items()}
        with PeakRss(pids) as rss:
            res = run_stages(spark, cfg, [stage], force=[stage], echo=log)
        sc.removeJobTag(tag)
        out["seconds"][stage] = round(time.perf_counter() - t0, 2)
        # CPU seconds of the driver's Python and of the JVM over the stage: less sensitive to other processes'
        # load than the wall time (Spark's Python workers are not included)
        out.setdefault("cpu_seconds", {})[stage] = {k: round(_cpu_seconds(p) - cpu0[k], 1) for k, p in pids.items()}
        out["spark_jobs"][stage] = tagged(tag)
        out["peak_rss_mb"][stage] = {k: round(v) for k, v in rss.peak.items()}
        summaries[stage] = res[-1] if res else {}
        exps = summaries[stage].get("experiments")
        laps = {e.get("experiment_id", i): e["seconds"] for i, e in enumerate(exps if isinstance(exps, list) else [])
                if isinstance(e, dict) and isinstance(e.get("seconds"), dict)}
        if laps or summaries[stage].get("phase_seconds"):  # the stage's own timed phases (effects: per experiment)
            out.setdefault("phase_seconds", {})[stage] = laps or summaries[stage]["phase_seconds"]
        log(f"{stage}: {out['seconds'][stage]} s, {out['spark_jobs'][stage]} Spark jobs")
    out["python_maxrss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)

    if "identify" in summaries:
        from pyspark.sql import functions as F

        ident = summaries["identify"]
        out["identify_passes"] = {k: v for k, v in ident.items() if "pass" in k.lower()}
        tr = read_table(spark, cfg, "selection_trace").select("phase", "round", "step", "action").toPandas()
        steps = tr[tr.phase.isin(["W", "joint"])]
        trace = len(steps[["phase", "round"]].drop_duplicates())
        out["rounds"] = int(trace)
        out["jobs_per_round"] = round(out["spark_jobs"]["identify"] / max(trace, 1), 1)
        # a forward step tests every candidate given S; a backward evaluation tests every j in S given S∖{j}
        # (one per drop, plus the one per round that drops nothing)
        fwd = int((steps.step == "forward").sum())
        bwd = int(((steps.step == "backward") & (steps.action == "drop")).sum()) + trace
        out.update(forward_steps=fwd, backward_evaluations=bwd,  # search passes: column moments + the steps
                   passes_per_step=round((ident.get("search_passes", 1) - 1) / max(fwd + bwd, 1), 2))
        mods = read_table(spark, cfg, "modifiers").where(F.col("kind") == "Z").select("feature").collect()
        selected = sorted(int(r[0]) for r in mods)
        planted, proxies = set(truth["planted"]), set(truth["proxies"].values())
        marginal = read_table(spark, cfg, "marginal_screen").where(
            (F.col("kind") == "Z") & F.col("reject_bonferroni")).select("feature").collect()
        flagged = {int(r[0]) for r in marginal}
        out.update({
            "planted": sorted(planted), "selected": selected,
            "recovered": sorted(planted & set(selected)), "proxies_selected": sorted(proxies & set(selected)),
            "false_selected": sorted(set(selected) - planted - proxies),
            "marginal_flagged": len(flagged), "marginal_flagged_proxies": len(flagged & proxies),
        })
    out["load_average"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(out), flush=True)
    spark.stop()
    if not args.data_dir:
        shutil.rmtree(root, ignore_errors=True)
    return out


if __name__ == "__main__":
    main()
