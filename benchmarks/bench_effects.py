"""Effects/policy core timings on synthetic data (in-memory; no Spark).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_effects.py [--n 20000]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from tokens2policy.effects.calibration import rate
from tokens2policy.effects.gates import gates_table
from tokens2policy.effects.learners import DRLearner, NuisanceParams, cross_fit_nuisances
from tokens2policy.effects.synthetic import make_synthetic_rct
from tokens2policy.policy.tree import PolicyTree


def timed(label, fn):
    start = time.perf_counter()
    out = fn()
    print(f"{label:<58s} {time.perf_counter() - start:8.2f} s")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    args = ap.parse_args()
    d = make_synthetic_rct(n=args.n, n_neurons=40, seed=0)
    u, act = d["units"], d["active"]
    X = np.column_stack([act.astype(float), u.age])
    t, y, folds = u.treatment.to_numpy(), u.outcome.to_numpy(), u.fold.to_numpy()
    Z = act[:, [3, 7]].astype(float)
    print(f"n = {args.n}, 41 nuisance features, 5 folds")
    timed("GATEs (2 sparse + 1 continuous) + joint, HC1", lambda: gates_table(
        y, t, {"n3": act[:, 3], "n7": act[:, 7], "age": u.age.to_numpy()}, {"n3": "sparse", "n7": "sparse"}))
    for model in ("ridge", "hgb"):
        timed(f"cross-fit nuisances ({model}), sequential 5 folds",
              lambda: cross_fit_nuisances(X, t, y, folds, NuisanceParams(model)))
    nu = cross_fit_nuisances(X, t, y, folds, NuisanceParams("ridge"))
    m = timed("DR-learner final stage linear (+5 out-of-fold refits)",
              lambda: DRLearner().fit(X, t, y, folds, Z=Z, nuisances=nu))
    phi = m.scores_[:, 1] - m.scores_[:, 0]
    timed("RATE AUTOC+Qini, 200 bootstrap replicates", lambda: rate(phi, m.oof_cate_, n_bootstrap=200))
    Xb = act[:, :10].astype(float)
    for depth in (2, 3):
        timed(f"exact policy tree depth {depth}, 10 binary features",
              lambda: PolicyTree(depth=depth).fit(Xb, m.scores_))
    Xc = np.where(act[:, :5], np.exp(np.random.default_rng(0).normal(size=(args.n, 5))), 0.0)
    timed("exact policy tree depth 2, 5 continuous features, 32 cands",
          lambda: PolicyTree(depth=2, max_candidates=32).fit(Xc, m.scores_))
    timed("exact policy tree depth 3, 3 continuous features, 16 cands",
          lambda: PolicyTree(depth=3, max_candidates=16).fit(Xc[:, :3], m.scores_))


if __name__ == "__main__":
    main()
