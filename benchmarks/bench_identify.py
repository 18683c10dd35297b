"""Benchmarks of the NEXIS engine against the straightforward dense oracle (tests/identify/oracle.py).

Same-run ratios; the oracle runs where it can (dense cases). Not a test: numbers for docs/benchmarks.md.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_identify.py --case dense
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_identify.py --case sparse
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_identify.py --case gcm
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_identify.py --case sparse --test hc2 --n 200000 --m 4096
        [--robust-reference]   # hc2's robust passes; the reference: every (row, candidate) cell (the old loop)

Each case prints one JSON line, with ``engine_passes``: the engine's time in units of one pass, the time of
``Z.T @ v`` over the same Z in the same process (``pass_s``), against ``target_passes`` = 2·(3 + |S|) (issue 16).
On a shared machine both drift with the neighbours' memory traffic, so the engine runs ``--repeats`` times with
the pass timed before and after: ``engine_s`` and ``pass_s`` are medians, ``stat_passes`` the engine's own
per-statistic times (moments, cross, ...) of the median run in the same unit, ``loadavg`` the 1-minute load
average at the start and the end. ``--test`` replaces the case's test (sparse: hc2 times ``Block.robust``, reported
as ``robust_s_per_pass``); ``--robust-reference`` runs the hc2 sums with tests/identify/test_robust_sparse.py's
every-cell reference (the loop ``Block.robust`` ran before issue 16's rewrite) patched in, for a same-process
comparison. Peak memory is the process's max RSS (data generation included), so run one
case per process when the memory number matters.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import numpy as np
import scipy.sparse as sp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "lib"))
sys.path.insert(0, os.path.join(ROOT, "tests", "identify"))

from tokens2policy.identify import nexis  # noqa: E402


def dense_problem(n, m, seed, planted=(11, 222, 3333, 1717, 900), effects=(0.5, -0.4, 0.35, 0.3, -0.25)):
    planted = tuple(j % m for j in planted)
    rng = np.random.default_rng(seed)
    Z = rng.normal(size=(n, m))
    t = (rng.random(n) < 0.5).astype(float)
    y = 0.5 * t + Z[:, :8].sum(1) * 0.3 + rng.normal(size=n)
    for j, b in zip(planted, effects):
        y += b * t * Z[:, j]
    return y, t, Z, set(planted)


def sparse_problem(n, m, active, seed, planted=(5, 77, 1234, 9999, 16000), effects=(0.5, -0.4, 0.3, 0.3, -0.25)):
    rng = np.random.default_rng(seed)
    cols = rng.integers(0, m, size=(n, active)).astype(np.int32)
    vals = rng.exponential(1.0, size=(n, active))
    indptr = np.arange(0, n * active + 1, active, dtype=np.int64)
    Z = sp.csr_matrix((vals.ravel(), cols.ravel(), indptr), shape=(n, m))
    Z.sum_duplicates()
    del cols, vals
    t = (rng.random(n) < 0.5).astype(float)
    beta_main = np.zeros(m)
    beta_main[:50] = 0.2
    beta_mod = np.zeros(m)
    beta_mod[list(planted)] = effects
    y = 0.5 * t + Z @ beta_main + t * (Z @ beta_mod) + rng.normal(size=n)
    return y, t, Z, set(planted)


def peak_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def pass_seconds(Z, repeats=5):
    """One "pass": the time of the matrix-vector product ``Z.T @ v`` over the same Z (dense, or CSR as given to
    the engine), float64, in this process — the memory-bandwidth unit the engine is measured in (issue 16).
    Median of ``repeats`` after one warm-up."""
    Zp = Z
    v = np.random.default_rng(1).normal(size=Zp.shape[0])
    Zp.T @ v
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        Zp.T @ v
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run_case(case, oracle, seed, n_override=None, m_override=None, repeats=3, test=None, robust_reference=False):
    from oracle import oracle_nexis

    rec = {"case": case}
    if case == "dense":
        n, m = n_override or 20000, m_override or 4096
        y, t, Z, planted = dense_problem(n, m, seed)
        kw = dict(test="linear")
    elif case == "gcm":
        n, m = n_override or 20000, m_override or 4096
        y, t, Z, planted = dense_problem(n, m, seed)
        kw = dict(test="gcm", nuisance="poly2")
    elif case == "sparse":
        n, m = n_override or 1_000_000, m_override or 16_384
        y, t, Z, planted = sparse_problem(n, m, 32, seed, planted=tuple(j % m for j in (5, 77, 1234, 9999, 16000)))
        kw = dict(test="linear")
        oracle = False
    else:
        raise SystemExit(f"unknown case {case}")
    if test:
        kw = dict(kw, test=test)
        oracle = oracle and test in ("linear", "gcm")
    if robust_reference:
        from test_robust_sparse import _robust_dense_reference
        from tokens2policy.identify import stats

        def reference(self, S, J, dy, pi, beta, bread, linv, kind, chol_bread=None):
            assert kind == "hc2", "--robust-reference: hc2 only"
            return _robust_dense_reference(self, S, J, dy, pi, beta, bread, linv)
        stats.Block.robust = reference
        rec["robust"] = "reference (every cell)"
    rec.update(n=n, m=m, nnz=int(Z.nnz) if sp.issparse(Z) else n * m, test=kw["test"],
               data_gb=round((Z.data.nbytes + Z.indices.nbytes) / 1e9 if sp.issparse(Z) else Z.nbytes / 1e9, 3))
    load0 = os.getloadavg()[0]
    pass_times = [pass_seconds(Z)]
    runs = []
    for _ in range(max(1, repeats)):
        runs.append(timed(lambda: nexis(y, t, Z, **kw)))
        pass_times.append(pass_seconds(Z))
    runs.sort(key=lambda r: r[1])
    res, secs = runs[len(runs) // 2]
    one_pass = float(np.median(pass_times))
    S = len(res.selected)
    rec.update(engine_s=round(secs, 3), engine_s_all=[round(r[1], 3) for r in runs], pass_s=round(one_pass, 4),
               pass_s_range=[round(min(pass_times), 4), round(max(pass_times), 4)],
               engine_passes=round(secs / one_pass, 1), target_passes=2 * (3 + S),
               stat_passes={k: [c, round(v / one_pass, 1)] for k, (c, v) in res.passes.get("pass_by_stat", {}).items()},
               loadavg=[round(load0, 2), round(os.getloadavg()[0], 2)], reduces=res.passes.get("passes"),
               selected=res.selected.tolist(), planted=sorted(planted),
               recovered=sorted(set(res.selected.tolist()) & planted))
    rob = [(c, v) for k, (c, v) in res.passes.get("pass_by_stat", {}).items() if k.startswith("robust")]
    if rob:
        rec.update(robust_passes=sum(c for c, _ in rob), robust_s=round(sum(v for _, v in rob), 3),
                   robust_s_per_pass=round(sum(v for _, v in rob) / sum(c for c, _ in rob), 3),
                   pvalues=res.pvalues.tolist())
    if oracle:
        o, osecs = timed(lambda: oracle_nexis(y, t, Z, **kw))
        rec.update(oracle_s=round(osecs, 2), same_selection=o["selected"].tolist() == res.selected.tolist(),
                   max_rel_p=float(np.max(np.abs(res.pvalues / o["pvalues"] - 1))) if len(res.pvalues) else 0.0,
                   speedup=round(osecs / secs, 1))
    rec["peak_rss_gb"] = round(peak_gb(), 2)
    return rec


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", choices=["dense", "sparse", "gcm"], required=True)
    ap.add_argument("--no-oracle", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=None, help="override n")
    ap.add_argument("--m", type=int, default=None, help="override m")
    ap.add_argument("--test", choices=["linear", "hc2", "gcm"], default=None, help="override the case's test")
    ap.add_argument("--robust-reference", action="store_true",
                    help="hc2: the every-cell reference sums (tests/identify/test_robust_sparse.py) instead of Block.robust")
    ap.add_argument("--repeats", type=int, default=3, help="engine runs (median reported)")
    a = ap.parse_args()
    print(json.dumps(run_case(a.case, not a.no_oracle, a.seed, a.n, a.m, a.repeats, a.test,
                                a.robust_reference)), flush=True)


if __name__ == "__main__":
    main()
