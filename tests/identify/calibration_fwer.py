"""Print the calibration numbers quoted in docs/identify.md (issue 13, findings 3 and 4). Not collected by pytest;
the assertions on these designs are in test_identify_calibration.py.

    PYTHONPATH=$PWD/lib .venv/bin/python tests/identify/calibration_fwer.py sparse|rare|clusters [R=300]
    PYTHONPATH=$PWD/lib .venv/bin/python tests/identify/calibration_fwer.py nonlinear [R=100]
    PYTHONPATH=$PWD/lib .venv/bin/python tests/identify/calibration_fwer.py power [R=100]

sparse / rare / clusters: FWER of the Bonferroni screen at alpha 0.05 (NEXIS' first step) over draws 0..R-1 of
CalibrationDesign(kind, n=2000, m=128), old HC1 / CR1S written out and the current tests. nonlinear: rejection rate
of H0(z_j | {z_s}) per GCM learner pair, and the whole search's false-selection rate with rho 0.5 and off.
power: the sparse design with a planted modifier (CalibrationDesign(kind="sparse", effect=e): tau = 0.5 + e z_0,
neuron 0 active in 20-40 of 2,000 units), draws 0..R-1 through the validation study's task runner: the rate at which
NEXIS selects neuron 0 (power) and selects anything else (FWER) per test option."""
from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_identify_calibration import ALPHA, cr1s_marginal_p, gcm_p_given, hc1_marginal_p  # noqa: E402
from tokens2policy.identify import marginal, nexis  # noqa: E402
from tokens2policy.validate.designs import CalibrationDesign, simulate_calibration  # noqa: E402
from tokens2policy.validate.study import wilson_interval  # noqa: E402


def show(name, k, R):
    lo, hi = wilson_interval(k, R)
    print(f"  {name:28s} {k / R:.3f} [{lo:.3f}, {hi:.3f}]", flush=True)


def screens(kind, R):
    d = CalibrationDesign(kind=kind, n=2000, m=128, **({"n_clusters": 50} if kind == "clusters" else {}))
    ma, cnt = d.min_active, {}
    for rep in range(R):
        s = simulate_calibration(d, rep)
        nnz = np.asarray((s.z != 0).sum(0)).ravel()
        zk = s.z[:, nnz >= ma] if ma else s.z
        p1 = hc1_marginal_p(s.y, s.t, zk)
        res = {"hc1 (old)": (p1 <= ALPHA / len(p1)).any()}
        if s.cluster is not None:
            pc = cr1s_marginal_p(s.y, s.t, zk, s.cluster)
            res["cr1s (old)"] = (pc <= ALPHA / len(pc)).any()
            res["cluster"] = marginal(s.y, s.t, s.z, test="cluster", cluster=s.cluster,
                                      min_active=ma).reject_bonferroni.any()
        for test in ("hc2", "linear", "gcm"):
            res[test] = marginal(s.y, s.t, s.z, test=test, min_active=ma, seed=rep).reject_bonferroni.any()
        for k, v in res.items():
            cnt[k] = cnt.get(k, 0) + bool(v)
    print(f"{kind}: FWER of the Bonferroni screen, {R} null draws, min_active {ma}")
    for k, v in cnt.items():
        show(k, v, R)


def nonlinear(R):
    d = CalibrationDesign(kind="nonlinear", n=4000, m=10)
    draws = [simulate_calibration(d, i) for i in range(R)]
    print(f"nonlinear: rejection rate of H0(z_j | {{z_s}}) at {ALPHA}, {R} draws")
    for pair in [("poly2", "linear"), ("poly2", "poly2"), ("spline", "linear"), ("spline", "spline"),
                 ("lgbm", "spline")]:
        show("/".join(pair), sum(gcm_p_given(s, [0], 1, *pair, seed=i) <= ALPHA for i, s in enumerate(draws)), R)
    print("nonlinear: final selection contains a column other than z_s")
    for kw in [dict(rho=0.5), dict(rho=None), dict(rho=0.5, nuisance="poly2", z_nuisance="linear"),
               dict(rho=None, nuisance="poly2", z_nuisance="linear")]:
        k = sum(bool(set(nexis(s.y, s.t, s.z, test="gcm", min_active=0, seed=i, **kw).selected.tolist()) - {0})
                for i, s in enumerate(draws))
        show(str(kw), k, R)


def power(R, effects=(0.5, 1.0, 2.0, 4.0, 8.0), actives=(25, 50, 100, 200, 400), active_effects=(1.0, 4.0),
          methods=("nexis_linear", "nexis_hc2", "nexis_gcm", "nexis_gcm_lgbm")):
    print(f"power: sparse design with a planted modifier, n = 2000, m = 128, {R} draws per point")
    print(f"  {'effect':>6} {'active':>6} {'method':16s} {'power = P(z_0 selected)':28s} "
          "FWER (a selection other than z_0)")
    for e in effects:   # the modifier active in U{20..40} units like every neuron
        power_point(R, e, 0, methods)
    for e in active_effects:   # the modifier active in a fixed number of units
        for k in actives:
            power_point(R, e, k, methods[:3])


def power_point(R, e, active, methods):
    """One line per method: power and FWER over draws 0..R-1 of the sparse design with a planted modifier."""
    from tokens2policy.validate.study import run_in_memory

    d = CalibrationDesign(kind="sparse", n=2000, m=128, effect=e, modifier_active=active)
    tasks = [dict(task_id=r, design=d.to_dict(), rep=r, base_seed=0, alpha=ALPHA, methods=list(methods),
                  coverage=False) for r in range(R)]
    for meth, g in run_in_memory(tasks).groupby("method", sort=False):
        hit, false = int(g["n_true_selected"].sum()), int(g["any_false"].sum())
        (plo, phi), (flo, fhi) = wilson_interval(hit, R), wilson_interval(false, R)
        print(f"  {e:6g} {active or '20-40':>6} {meth:16s} {hit / R:.2f} [{plo:.2f}, {phi:.2f}]{'':12s} "
              f"{false / R:.2f} [{flo:.2f}, {fhi:.2f}]", flush=True)


if __name__ == "__main__":
    kind = sys.argv[1]
    if kind == "power":
        power(int(sys.argv[2]) if len(sys.argv) > 2 else 100)
    elif kind == "nonlinear":
        nonlinear(int(sys.argv[2]) if len(sys.argv) > 2 else 100)
    else:
        screens(kind, int(sys.argv[2]) if len(sys.argv) > 2 else 300)
