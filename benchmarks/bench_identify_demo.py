"""The identify stage's in-memory GCM search on the README demo (issue 16: the demo's identify speed).

Two steps. ``extract`` runs the identify stage once (``--force identify``) on a built demo lakehouse and keeps
exactly what its in-memory search gets — the rows of the one Block (y, t, covariates, neurons as CSR, fold ids), the
Block spec and the identify parameters — in a local .npz, so that timing needs no Spark:

    PYTHONPATH=lib OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_identify_demo.py extract \\
        --data-dir /tmp/gcmdemo/demo --npz /tmp/gcmdemo/demo_inputs.npz

``time`` runs the stage's search call (``identify.job._search``: the NEXIS search and the marginal screen, the
engine's in-memory Tester) on those rows and prints one JSON line: seconds (median of ``--repeats``), the
selections, the trace's decisions, the process CPU seconds (``cpu_seconds``: on a shared machine the wall time
follows the CPU share the process gets, which the load average does not tell), the passes, the load average, and, against a reference run (``--ref``, written
by ``--save-ref``), whether the selections and decisions are the same and the largest relative difference of any
p-value (final and in the trace). ``--lib`` times another copy of the library (the code before a change):

    PYTHONPATH=lib .venv/bin/python benchmarks/bench_identify_demo.py time --npz /tmp/gcmdemo/demo_inputs.npz \\
        --lib /tmp/gcmdemo/old/lib --save-ref /tmp/gcmdemo/ref.json
    PYTHONPATH=lib .venv/bin/python benchmarks/bench_identify_demo.py time --npz /tmp/gcmdemo/demo_inputs.npz \\
        --ref /tmp/gcmdemo/ref.json

BLAS threads are the environment's (``OMP_NUM_THREADS``; the demo command leaves it unset: all cores).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from types import SimpleNamespace

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IC_FIELDS = ("alpha", "test", "adjust", "rho", "backward", "nuisance", "z_nuisance", "max_rounds", "min_active")


def _use_lib(path):
    sys.path.insert(0, os.path.abspath(path or os.path.join(ROOT, "lib")))


def extract(args):
    from tokens2policy import api
    from tokens2policy.identify import job

    saved = {}
    search = job._search

    def capture(src, tester_class, spec, ic, seed, on_decision):
        b = src.blocks[0]
        if len(src.blocks) != 1 or tester_class is not job.Tester:
            raise SystemExit("identify did not run in memory (execution.mode): nothing to extract")
        Z = b._zr
        saved.update(y=b.y, t=b.t, W=b.W, folds=b.folds, z_data=Z.data, z_indices=Z.indices, z_indptr=Z.indptr,
                     z_shape=np.array(Z.shape), spec=json.dumps({"m": spec["m"], "covariates": spec["covariates"],
                                                                 "fold_codes": {str(k): v for k, v in
                                                                                spec["fold_codes"].items()}}),
                     ic=json.dumps({f: getattr(ic, f) for f in IC_FIELDS}), seed=seed)
        return search(src, tester_class, spec, ic, seed, on_decision)

    job._search = capture
    api.run("identify", config=os.path.join(ROOT, "conf", "local.yaml"),
            overrides=[f"data_dir={args.data_dir}"], force=["identify"])
    if not saved:
        raise SystemExit("the identify stage did not search")
    np.savez(args.npz, **saved)
    print(json.dumps({"npz": args.npz, "n": int(len(saved["y"])), "m": int(saved["z_shape"][1]),
                      "nnz": int(len(saved["z_data"])), "covariates": json.loads(saved["spec"])["covariates"]}))


def _decisions(res):
    return [(r["phase"], r["round"], r["action"], r.get("feature")) for r in res.trace]


def _pvalues(res):
    return [float(r["p"]) for r in res.trace if r.get("p") is not None] + [float(p) for p in res.pvalues] \
        + [float(p) for p in res.pvalues_w]


def time_search(args):
    import scipy.sparse as sp

    from tokens2policy.identify import job
    from tokens2policy.identify.engine import Source
    from tokens2policy.identify.stats import Block

    d = np.load(args.npz)
    spec = json.loads(str(d["spec"]))
    spec["fold_codes"] = {int(k): v for k, v in spec["fold_codes"].items()}
    ic = SimpleNamespace(**json.loads(str(d["ic"])))
    Z = sp.csr_matrix((d["z_data"], d["z_indices"], d["z_indptr"]), shape=tuple(d["z_shape"]))
    W = d["W"] if d["W"].shape[1] else None
    load0 = os.getloadavg()[0]
    times, cpu, res = [], [], None
    for _ in range(args.repeats):
        block = Block(d["y"], d["t"], W, Z.copy(), None, d["folds"])  # a fresh Block: no state from a prior run
        src = Source([block])
        t0, c0 = time.perf_counter(), time.process_time()
        if args.profile:
            import cProfile

            prof = cProfile.Profile()
            res, mg = prof.runcall(job._search, src, job.Tester, spec, ic, int(d["seed"]), None)
            prof.dump_stats(args.profile)
        else:
            res, mg = job._search(src, job.Tester, spec, ic, int(d["seed"]), None)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    out = {"lib": os.path.dirname(os.path.dirname(job.__file__)), "n": int(len(d["y"])), "m": int(Z.shape[1]),
           "nnz": int(Z.nnz), "seconds": round(float(np.median(times)), 3), "runs": [round(t, 3) for t in times],
           "cpu_seconds": round(float(np.median(cpu)), 3),
           "selected": res.selected.tolist(), "selected_w": res.selected_w.tolist(),
           "decisions": len(res.trace), "passes": res.passes.get("passes"),
           "omp_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
           "loadavg": [round(load0, 2), round(os.getloadavg()[0], 2)]}
    mine = {"selected": out["selected"], "selected_w": out["selected_w"], "decisions": _decisions(res),
            "pvalues": _pvalues(res), "marginal": np.nan_to_num(mg.pvalues, nan=-1.0).tolist()}
    if args.save_ref:
        with open(args.save_ref, "w") as fh:
            json.dump(mine, fh)
    if args.ref:
        with open(args.ref) as fh:
            ref = json.load(fh)
        same = ref["selected"] == mine["selected"] and ref["selected_w"] == mine["selected_w"] \
            and [tuple(x) for x in ref["decisions"]] == mine["decisions"]
        a, b = np.array(mine["pvalues"] + mine["marginal"]), np.array(ref["pvalues"] + ref["marginal"])
        out["same_as_ref"] = bool(same and len(a) == len(b))
        if len(a) == len(b):
            with np.errstate(divide="ignore", invalid="ignore"):
                rel = np.where(a == b, 0.0, np.abs(a - b) / np.maximum(np.abs(a), np.abs(b)))
            out["max_rel_p_diff"] = float(rel.max()) if len(rel) else 0.0
    print(json.dumps(out))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("extract")
    e.add_argument("--data-dir", required=True)
    e.add_argument("--npz", required=True)
    t = sub.add_parser("time")
    t.add_argument("--npz", required=True)
    t.add_argument("--lib", default=None, help="library to time (default: this checkout's lib)")
    t.add_argument("--repeats", type=int, default=1)
    t.add_argument("--ref", default=None)
    t.add_argument("--save-ref", default=None)
    t.add_argument("--profile", default=None, help="write a cProfile of the (last) run here")
    args = ap.parse_args()
    _use_lib(getattr(args, "lib", None))
    extract(args) if args.cmd == "extract" else time_search(args)


if __name__ == "__main__":
    main()
