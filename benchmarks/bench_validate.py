"""Cost of one validation-study task (docs/validation.md): seconds per method on design 1, in process, no Spark.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_validate.py [--n 4000 8000] [--m 100] [--repeats 5]

Prints one JSON line per n: the best-of-``repeats`` CPU seconds (``time.process_time``: robust to a shared,
loaded machine; BLAS is single-threaded) of each NEXIS variant (linear / hc2 / gcm, with
backward and rho 0.5) and of the marginal screen on the same draw (linear/gaussian cell, effect 0.5), plus the
CPU seconds of one whole task (all 15 methods) and of one coverage block (GATEs, projection, policy value with
100,000 Monte-Carlo truth units). Single-threaded BLAS, as in the Spark tasks. Not a test: numbers for
docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "lib"))

from threadpoolctl import threadpool_limits  # noqa: E402

from tokens2policy.identify import marginal, nexis  # noqa: E402
from tokens2policy.validate.designs import EntangledDesign, simulate  # noqa: E402
from tokens2policy.validate.study import SWEEP_METHODS, run_task  # noqa: E402


def best_of(fn, repeats):
    out = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        out.append(time.process_time() - t0)
    return min(out)


def task(n, m, coverage):
    d = EntangledDesign(kind="linear", outcome="gaussian", n=n, m=m, effect=0.5)
    return dict(base_seed=0, alpha=0.05, methods=list(SWEEP_METHODS), policy_cost=0.2, n_truth=100_000, task_id=0,
                design=d.to_dict(), rep=0, coverage=coverage)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[4000, 8000])
    ap.add_argument("--m", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    threadpool_limits(1)
    for n in a.n:
        sim = simulate(EntangledDesign(kind="linear", outcome="gaussian", n=n, m=a.m, effect=0.5), 1)
        rec = {"n": n, "m": a.m}
        for test in ("linear", "hc2", "gcm"):
            rec[f"nexis_{test}_s"] = round(best_of(lambda: nexis(sim.y, sim.t, sim.z, test=test, n_folds=5, seed=1),
                                                   a.repeats), 4)
        rec["marginal_hc2_s"] = round(best_of(lambda: marginal(sim.y, sim.t, sim.z, test="hc2"), a.repeats), 4)
        for cov in (False, True):
            t0 = time.process_time()
            run_task(task(n, a.m, cov))
            rec["task_cpu_s" + ("_with_coverage" if cov else "")] = round(time.process_time() - t0, 3)
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
