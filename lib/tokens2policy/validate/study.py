"""The validation study: one repetition = one simulated experiment analysed by every method; then summaries with CIs.

A *task* is one (design point, repetition) pair, a plain dict so that it pickles to a Spark executor unchanged.
:func:`run_task` is pure — its rows depend only on the task (seeds derive from ``(base_seed, design key, rep)``) —
so the Spark job (one task per partition) and :func:`run_in_memory` give the same rows.

Per task, on the same draw (paired comparisons):

* **selection** — NEXIS variants (test linear / hc2 / gcm with spline nuisances; backward on/off; rho 0.5/off;
  on the calibration designs also the cluster test and the other GCM learners) and marginal screening (raw,
  Bonferroni, Benjamini–Hochberg; HC2 tests). Metrics against the aligned coordinates:
  IoU = |S ∩ S*| / |S ∪ S*|, precision = |S ∩ S*| / |S| (NaN when S = ∅), recall = |S ∩ S*| / |S*|, and
  ``any_selected`` (under the null every selection is a family-wise error).
* **coverage** — 95 % CIs of :func:`tokens2policy.effects.gates.gate` on the first aligned coordinate (median
  split: both groups and their contrast) and of :func:`~tokens2policy.effects.gates.joint_interaction` on the true
  set (best linear projection of tau), against closed-form truths (gaussian outcome) or a 100k-draw Monte Carlo
  (binary); and of the doubly-robust policy value (:func:`tokens2policy.policy.value.policy_value`) of a policy
  learned on one half of the sample (NEXIS-hc2 selection + interaction OLS, treat when tau_hat > cost) and
  evaluated on the other half with cross-fitted AIPW scores, against its Monte-Carlo true value.

Summaries: means with normal 95 % CIs (mean ± 1.96 sd/√R), proportions (FWER, coverage) with Wilson 95 % CIs
(Wilson 1927; Brown, Cai & DasGupta 2001).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import pandas as pd
from scipy import stats as sstats

from .designs import CalibrationDesign, EntangledDesign, outcome_means, sample_units, simulate, task_seed, \
    true_blp, true_median_split_gate

# --------------------------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class Method:
    name: str
    family: str                  # nexis | marginal
    test: str = "hc2"
    backward: bool = True
    rho: Optional[float] = 0.5
    adjust: str = "FWER"         # marginal: raw | bonferroni | bh
    nuisance: str = "spline"     # GCM learner of y and the pseudo-outcome
    z_nuisance: str = "spline"   # GCM residualization of each candidate


def _nexis_methods() -> List[Method]:
    out = []
    for test in ("linear", "hc2", "gcm"):
        for backward in (True, False):
            for rho in (0.5, None):
                name = f"nexis_{test}" + ("" if backward else "_nobw") + ("" if rho is not None else "_norho")
                out.append(Method(name, "nexis", test, backward, rho))
    return out


# the GCM learners besides the default (spline / spline), and the cluster test (needs cluster ids: calibration
# design ``clusters`` only)
GCM_VARIANTS: List[Method] = [
    Method("nexis_gcm_poly2", "nexis", "gcm", nuisance="poly2", z_nuisance="poly2"),
    Method("nexis_gcm_lgbm", "nexis", "gcm", nuisance="lgbm", z_nuisance="spline"),
    Method("nexis_gcm_lgbm_lgbmz", "nexis", "gcm", nuisance="lgbm", z_nuisance="lgbm"),
    Method("nexis_gcm_poly2_linz", "nexis", "gcm", nuisance="poly2", z_nuisance="linear"),  # the GCM before issue 13
]
CLUSTER_METHOD = Method("nexis_cluster", "nexis", "cluster")
METHODS: List[Method] = _nexis_methods() + [
    Method(f"marginal_{a}", "marginal", "hc2", False, None, a) for a in ("raw", "bonferroni", "bh")
] + GCM_VARIANTS + [CLUSTER_METHOD]
METHOD_NAMES = tuple(m.name for m in METHODS)
# the sweep and the design-1 nulls run these unless validate.methods says otherwise (the LightGBM and cluster
# variants are for the calibration designs)
SWEEP_METHODS = tuple(m.name for m in _nexis_methods()) + ("marginal_raw", "marginal_bonferroni", "marginal_bh")
# every test option, as the calibration designs run them (validate.calibration_methods overrides)
CALIBRATION_METHODS = ("nexis_linear", "nexis_hc2", "nexis_cluster", "nexis_gcm", "nexis_gcm_poly2",
                       "nexis_gcm_lgbm", "nexis_gcm_poly2_linz")
DEFAULT_NEXIS = "nexis_gcm"   # the pipeline's default (identify.test=gcm, spline nuisances, backward, rho=0.5)
POLICY_SELECTOR = "nexis_hc2"

RESULT_COLUMNS = {  # column -> pandas dtype (the validation_runs contract, docs/tables.md)
    "task_id": "int64", "design": "object", "outcome": "object", "n": "int64", "m": "int64", "effect": "float64",
    "rep": "int64", "kind": "object", "method": "object", "family": "object", "test": "object",
    "backward": "bool", "rho": "float64", "selected": "object", "truth": "object", "n_selected": "int64",
    "n_true_selected": "int64", "iou": "float64", "precision": "float64", "recall": "float64",
    "any_selected": "float64", "estimand": "object", "estimate": "float64", "se": "float64",
    "ci_low": "float64", "ci_high": "float64", "true_value": "float64", "covered": "float64",
    "seconds": "float64", "aligned": "object", "iou_aligned": "float64", "precision_aligned": "float64",
    "recall_aligned": "float64", "any_false": "float64",
}


def _rho_method(name: str) -> Optional[Method]:
    """``nexis_<test>[_nobw]_rho<value>``: NEXIS with Gate 2 at another rho (the Gate 2 study, docs/validation.md)."""
    import re

    m = re.fullmatch(r"nexis_(linear|hc2|gcm)(_nobw)?_rho(\d+(?:\.\d+)?)", name)
    return Method(name, "nexis", m.group(1), not m.group(2), float(m.group(3))) if m else None


def resolve_methods(names: Optional[Sequence[str]], default: Sequence[str] = SWEEP_METHODS) -> List[Method]:
    names = names or default
    extra = {n: _rho_method(n) for n in names if n not in METHOD_NAMES}
    unknown = sorted(n for n, m in extra.items() if m is None)
    if unknown:
        raise ValueError(f"unknown validation method(s) {unknown}; choose from {list(METHOD_NAMES)} or "
                         "nexis_<test>[_nobw]_rho<value>")
    known = {m.name: m for m in METHODS}
    return [known[n] if n in known else extra[n] for n in dict.fromkeys(names)]


# --------------------------------------------------------------------------------------------- metrics
def selection_metrics(selected: Iterable[int], truth: Iterable[int],
                      aligned: Optional[Sequence[Iterable[int]]] = None) -> Dict[str, float]:
    """IoU, precision, recall of a selected set against the true set (precision NaN for S = ∅; IoU, recall NaN for
    an empty truth, where only ``any_selected`` — a family-wise error — is meaningful).

    ``aligned``: one group of interchangeable features per true feature (design 2: the neurons aligned with a
    driving topic; default: the singletons of ``truth``). The ``*_aligned`` metrics score the selection modulo
    that equivalence: a group is *hit* when S meets it, a selected feature outside every group is a false
    positive, and several hits of one group are not penalized —
    IoU_aligned = hits / (groups + false positives), precision_aligned = |S ∩ ∪groups| / |S|,
    recall_aligned = hits / groups. With singleton groups they equal IoU, precision and recall."""
    S, T = set(int(s) for s in selected), set(int(s) for s in truth)
    inter, union = len(S & T), len(S | T)
    groups = [set(int(j) for j in g) for g in aligned] if aligned is not None else [{j} for j in sorted(T)]
    groups = [g for g in groups if g]
    covered = set().union(*groups) if groups else set()
    hits, false = sum(bool(S & g) for g in groups), len(S - covered)
    return {
        "n_selected": len(S), "n_true_selected": inter,
        "iou": inter / union if T else np.nan,
        "precision": inter / len(S) if S else np.nan,
        "recall": inter / len(T) if T else np.nan,
        "any_selected": float(len(S) > 0),
        "any_false": float(len(S - covered) > 0),   # a selection outside the truth: a family-wise error
        "iou_aligned": hits / (len(groups) + false) if groups else np.nan,
        "precision_aligned": len(S & covered) / len(S) if S else np.nan,
        "recall_aligned": hits / len(groups) if groups else np.nan,
    }


def wilson_interval(k: float, n: float, level: float = 0.95):
    """Wilson score interval of a binomial proportion k/n."""
    if n <= 0:
        return np.nan, np.nan
    z = sstats.norm.ppf(0.5 + level / 2)
    p = k / n
    den = 1 + z * z / n
    center = (p + z * z / (2 * n)) / den
    half = z / den * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return float(max(0.0, center - half)), float(min(1.0, center + half))


def mean_interval(values, level: float = 0.95):
    """(mean, lo, hi, count) of the finite values, normal interval mean ± z sd/√R."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return np.nan, np.nan, np.nan, 0
    m = float(v.mean())
    if len(v) < 2:
        return m, np.nan, np.nan, 1
    half = sstats.norm.ppf(0.5 + level / 2) * v.std(ddof=1) / np.sqrt(len(v))
    return m, m - half, m + half, len(v)


# --------------------------------------------------------------------------------------------- one task
def _row(task, method="", family="", **kw) -> Dict:
    d = task["design"]
    row = {c: None for c in RESULT_COLUMNS}
    label = f"cal-{d['kind']}" if d.get("family") == "calibration" else d["kind"]
    row.update(task_id=int(task["task_id"]), design=label, outcome=d.get("outcome", "gaussian"), n=int(d["n"]),
               m=int(task.get("m", d.get("m", 0))),
               effect=float(d.get("effect", 0.0)), rep=int(task["rep"]), kind="selection", method=method,
               family=family,
               test="", backward=False, rho=np.nan, selected="[]", truth="[]", n_selected=0, n_true_selected=0,
               estimand="", aligned="[]")
    row.update(kw)
    return row


def _selection_rows(task, sim, methods, alpha, seed, min_active=0) -> List[Dict]:
    """One row per method. Selected covariates (the calibration design ``covariates``) are recorded as the negative
    ids -1, -2, ... (covariate i as -1 - i): never in the truth, so every one counts as a false selection."""
    from tokens2policy.identify import marginal, nexis

    rows = []
    het = getattr(sim.design, "heterogeneity", 1.0)
    truth = sorted(int(i) for i in sim.truth) if het != 0 else []
    groups = getattr(sim, "aligned", None) if truth else None   # design 2: the neurons aligned with each topic
    groups = [sorted(int(j) for j in g) for g in groups] if groups is not None else [[j] for j in truth]
    extra = dict(truth=json.dumps(truth), aligned=json.dumps(groups))
    w, cluster = getattr(sim, "w", None), getattr(sim, "cluster", None)
    for meth in methods:
        if meth.family != "nexis" or (meth.test == "cluster" and cluster is None):
            continue
        if meth.test == "linear" and cluster is not None:   # refused: nexis raises (not valid for clustered units)
            continue
        t0 = time.perf_counter()
        res = nexis(sim.y, sim.t, sim.z, w=w, alpha=alpha, test=meth.test, adjust="FWER", rho=meth.rho,
                    backward=meth.backward, nuisance=meth.nuisance, z_nuisance=meth.z_nuisance, cluster=cluster,
                    n_folds=5, seed=seed, min_active=min_active)
        sel = sorted(int(i) for i in res.selected) + [-1 - int(i) for i in res.selected_w]
        rows.append(_row(task, meth.name, "nexis", test=meth.test, backward=meth.backward,
                         rho=np.nan if meth.rho is None else meth.rho, selected=json.dumps(sel),
                         seconds=time.perf_counter() - t0, **extra, **selection_metrics(sel, truth, groups)))
    marg = [m for m in methods if m.family == "marginal"]
    if marg:
        t0 = time.perf_counter()
        res = marginal(sim.y, sim.t, sim.z, alpha=alpha, test="hc2", min_active=min_active)
        secs = time.perf_counter() - t0
        for meth in marg:
            mask = {"raw": res.reject_raw, "bonferroni": res.reject_bonferroni, "bh": res.reject_bh}[meth.adjust]
            sel = [int(i) for i in np.nonzero(mask)[0]]
            rows.append(_row(task, meth.name, "marginal", test="hc2", selected=json.dumps(sel), seconds=secs,
                             **extra, **selection_metrics(sel, truth, groups)))
    return rows


def _coverage_row(task, estimand, est, se, lo, hi, truth_value, secs):
    covered = float(lo <= truth_value <= hi) if np.isfinite([lo, hi, truth_value]).all() else np.nan
    return _row(task, "", "coverage", kind="coverage", estimand=estimand, estimate=est, se=se, ci_low=lo,
                ci_high=hi, true_value=truth_value, covered=covered, seconds=secs)


def _coverage_rows(task, sim, alpha, policy_cost, n_truth, rng) -> List[Dict]:
    """GATE / projection / policy-value CIs of this draw and whether they cover the true value."""
    from tokens2policy.effects import aipw_scores, cross_fit_nuisances, gate, joint_interaction, NuisanceParams
    from tokens2policy.effects.ols import ols
    from tokens2policy.identify import make_folds, nexis
    from tokens2policy.policy import policy_value

    d, rows = sim.design, []
    t0 = time.perf_counter()
    truth = [int(c) for c in sim.truth]
    a_col = truth[0]
    # policy value: learn on half A (NEXIS-hc2 + interaction OLS), evaluate on half B (cross-fitted AIPW)
    n = len(sim.y)
    perm = rng.permutation(n)
    A_, B_ = perm[: n // 2], perm[n // 2:]
    sel = nexis(sim.y[A_], sim.t[A_], sim.z[A_], alpha=alpha, test="hc2", rho=0.5, backward=True).selected
    sel = [int(c) for c in sel]
    k = len(sel)
    zs_a = sim.z[A_][:, sel]
    fit = ols(np.column_stack([np.ones(len(A_)), zs_a, sim.t[A_], zs_a * sim.t[A_][:, None]]), sim.y[A_])

    def cate(zs):  # zs: the selected columns
        return fit.coef[1 + k] + zs @ fit.coef[2 + k:]

    policy_b = (cate(sim.z[B_][:, sel]) > policy_cost).astype(float)
    folds = make_folds(len(B_), 5, int(rng.integers(2 ** 31)))
    nu = cross_fit_nuisances(sim.z[B_], sim.t[B_], sim.y[B_], folds, NuisanceParams("ridge"), seed=0)
    scores = aipw_scores(sim.t[B_], sim.y[B_], nu["mu0"], nu["mu1"], nu["e"])
    pv = policy_value(scores, policy_b, cost=policy_cost, alpha=alpha)
    # the truths: closed form (gaussian) or Monte Carlo (binary; and the learned policy's value) on n_truth fresh
    # units of the same representation, drawing only the coordinates they read (truth and selected)
    need = sorted(set(truth) | set(sel))
    pos = {c: i for i, c in enumerate(need)}
    U_f, Z_need = sample_units(d, sim.loadings, sim.noise_sd, n_truth, rng, cols=need)
    Z_f = lambda cols: Z_need[:, [pos[c] for c in cols]]  # noqa: E731
    mu0_f, tau_f = outcome_means(d, U_f)
    if d.outcome == "gaussian":
        g_true = true_median_split_gate(d, sim.loadings[a_col], sim.noise_sd[a_col])
        blp = true_blp(d, sim.loadings[truth], sim.noise_sd[truth])
    else:
        hi = Z_f([a_col])[:, 0] > 0
        g_true = {"> median": tau_f[hi].mean(), "<= median": tau_f[~hi].mean()}
        g_true["> median - <= median"] = g_true["> median"] - g_true["<= median"]
        blp = np.linalg.lstsq(np.column_stack([np.ones(n_truth), Z_f(truth)]), tau_f, rcond=None)[0]
    for r in gate(sim.y, sim.t, sim.z[:, a_col], "continuous", feature="z_aligned1", alpha=alpha):
        rows.append(_coverage_row(task, f"gate {r.group}", r.estimate, r.se, r.ci_low, r.ci_high,
                                  g_true[r.group], 0.0))
    names = [f"z{j}" for j in truth]
    joint = joint_interaction(sim.y, sim.t, sim.z[:, truth], names, alpha=alpha)
    for r, truth_value, label in zip(joint, blp, ["blp intercept", "blp slope aligned1", "blp slope aligned2"]):
        rows.append(_coverage_row(task, label, r.estimate, r.se, r.ci_low, r.ci_high, truth_value, 0.0))
    pi_f = (cate(Z_f(sel)) > policy_cost).astype(float)
    v_true = float(np.mean(mu0_f + pi_f * (tau_f - policy_cost)))
    rows.append(_coverage_row(task, "policy value", pv["estimate"], pv["se"], pv["ci_low"], pv["ci_high"], v_true,
                              time.perf_counter() - t0))
    return rows


def run_task(task: Dict) -> List[Dict]:
    """All result rows of one (design point, repetition) task. Pure: same task, same rows (``seconds`` aside)."""
    methods = resolve_methods(task.get("methods"))
    if task["design"].get("family") == "calibration":
        from .designs import CalibrationDesign, simulate_calibration

        design = CalibrationDesign.from_dict(task["design"])
        sim_seed, nexis_seed = task_seed(task["base_seed"], design.key(), task["rep"]).spawn(2)
        sim = simulate_calibration(design, sim_seed)
        gcm_seed = int(nexis_seed.generate_state(1)[0] % (2 ** 31))
        return _selection_rows(task, sim, methods, task["alpha"], gcm_seed, design.min_active)
    if task["design"]["kind"] == "text" or task["design"]["kind"].startswith("drivers/"):
        from .text import TextDesign, simulate_text

        design = TextDesign.from_dict(task["design"])
        sim_seed, nexis_seed = task_seed(task["base_seed"], design.key(), task["rep"]).spawn(2)
        sim = simulate_text(design, sim_seed)
        gcm_seed = int(nexis_seed.generate_state(1)[0] % (2 ** 31))
        rows = _selection_rows(task, sim, methods, task["alpha"], gcm_seed, task.get("min_active", 20))
        if task.get("coverage", False) and design.effect != 0:   # design 3: heterogeneity coverage of methods[0]
            from .drivers import coverage_rows

            chosen = json.loads(next(r["selected"] for r in rows if r["method"] == methods[0].name))
            rows += coverage_rows(task, sim, chosen, task["alpha"], gcm_seed)
        return rows
    design = EntangledDesign(**{k: tuple(v) if isinstance(v, list) else v for k, v in task["design"].items()})
    ss = task_seed(task["base_seed"], design.key(), task["rep"])
    sim_seed, nexis_seed, cov_seed = ss.spawn(3)
    sim = simulate(design, sim_seed)
    gcm_seed = int(nexis_seed.generate_state(1)[0] % (2 ** 31))
    rows = _selection_rows(task, sim, methods, task["alpha"], gcm_seed)
    if task.get("coverage", False):
        rows += _coverage_rows(task, sim, task["alpha"], task.get("policy_cost", 0.2), task.get("n_truth", 100_000),
                               np.random.default_rng(cov_seed))
    return rows


def rows_frame(rows: List[Dict]) -> pd.DataFrame:
    """Result rows as a DataFrame with the :data:`RESULT_COLUMNS` dtypes."""
    df = pd.DataFrame(rows, columns=list(RESULT_COLUMNS))
    for col, dtype in RESULT_COLUMNS.items():
        if dtype == "object":
            df[col] = df[col].fillna("").astype(str)
        elif dtype == "float64":
            df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
        else:
            df[col] = df[col].fillna(0).astype(dtype)
    return df


def run_in_memory(tasks: Sequence[Dict]) -> pd.DataFrame:
    """The same study as the Spark job, sequentially in this process (reference and small runs)."""
    rows: List[Dict] = []
    for task in tasks:
        rows += run_task(task)
    return rows_frame(rows)


# --------------------------------------------------------------------------------------------- the grid
# calibration designs (designs.CalibrationDesign) per size: kind -> constructor arguments. The ci size is small
# enough for the default test suite; full is the specification (n = 2000, 4000 for the nonlinear null).
CALIBRATION_CI = {"dense": dict(n=400, m=40), "sparse": dict(n=600, m=40), "rare": dict(n=600, m=40),
                  "covariates": dict(n=300, m=40), "clusters": dict(n=600, m=40, n_clusters=30),
                  "nonlinear": dict(n=1000, m=6)}
CALIBRATION_FULL = {"dense": dict(n=2000, m=128), "sparse": dict(n=2000, m=128), "rare": dict(n=2000, m=128),
                    "covariates": dict(n=300, m=100), "clusters": dict(n=2000, m=128, n_clusters=50),
                    "nonlinear": dict(n=4000, m=10)}
SIZES = {
    # small: a couple of minutes on 2 cores
    "ci": dict(cells=[("linear", "gaussian")], n_values=[300, 2000], effects=[0.5], repetitions=6, m=50,
               null_outcomes=["gaussian"], null_n=1000, null_repetitions=100, coverage_n=2000, n_truth=20000,
               text=False, text_n_values=[500, 2000], text_effects=[1.0],
               calibration=list(CALIBRATION_CI), calibration_repetitions=40),
    # the paper-sized sweep
    "full": dict(cells=[("linear", "gaussian"), ("quadratic", "gaussian"), ("linear", "binary"),
                        ("quadratic", "binary")],
                 n_values=[250, 500, 1000, 2000, 4000, 8000], effects=[0.25, 0.5, 1.0], repetitions=50, m=100,
                 null_outcomes=["gaussian", "binary"], null_n=2000, null_repetitions=500, coverage_n=2000,
                 n_truth=100000, text=True, text_n_values=[250, 500, 1000, 2000, 4000, 8000],
                 text_effects=[0.5, 1.0], calibration=list(CALIBRATION_FULL), calibration_repetitions=500),
}


def wants_text(vcfg) -> bool:
    """Whether the study includes design 2 (its representation must then be built first)."""
    return bool(vcfg.text if vcfg.text is not None else SIZES[vcfg.size]["text"])


def build_tasks(vcfg, base_seed: int = 0, text_representation: Optional[str] = None,
                driver_representations: Optional[Dict] = None) -> List[Dict]:
    """The study's task list from a :class:`tokens2policy.config.ValidateConfig` (size preset + overrides).

    ``text_representation``: the .npz of :func:`tokens2policy.validate.text.build_text_representation`, needed
    when the study includes design 2."""
    preset = SIZES[vcfg.size]
    get = lambda name: getattr(vcfg, name) if getattr(vcfg, name) is not None else preset[name]  # noqa: E731
    cells = [tuple(c.split(":")) for c in vcfg.cells] if vcfg.cells is not None else preset["cells"]
    n_values, effects, reps, m = get("n_values"), get("effects"), get("repetitions"), get("m")
    null_outcomes, null_n, null_reps = get("null_outcomes"), get("null_n"), get("null_repetitions")
    coverage_n, n_truth = get("coverage_n"), get("n_truth")
    methods = resolve_methods(vcfg.methods)
    common = dict(base_seed=int(base_seed), alpha=float(vcfg.alpha), methods=[mm.name for mm in methods],
                  policy_cost=float(vcfg.policy_cost), n_truth=int(n_truth))
    points = []
    for kind, outcome in cells:
        for n in n_values:
            for eff in effects:
                cov = bool(vcfg.coverage) and n == coverage_n
                points.append((EntangledDesign(kind=kind, outcome=outcome, n=int(n), m=int(m), effect=float(eff)),
                               reps, cov))
    for outcome in null_outcomes:
        points.append((EntangledDesign(kind="null", outcome=outcome, n=int(null_n), m=int(m), effect=0.0),
                       null_reps, bool(vcfg.coverage)))
    tasks = []
    for design, r, cov in points:
        for rep in range(int(r)):
            tasks.append(dict(common, task_id=len(tasks), design=design.to_dict(), rep=rep, coverage=cov))
    cal_sizes = CALIBRATION_FULL if vcfg.size == "full" else CALIBRATION_CI
    cal_kinds = vcfg.calibration if vcfg.calibration is not None else preset["calibration"]
    cal_reps, cal_first = int(get("calibration_repetitions")), int(getattr(vcfg, "calibration_first_repetition", 0))
    cal_methods = [mm.name for mm in resolve_methods(vcfg.calibration_methods, CALIBRATION_METHODS)]
    for kind in cal_kinds:
        design = CalibrationDesign(kind=kind, **cal_sizes[kind])
        for rep in range(cal_first, cal_first + cal_reps):
            tasks.append(dict(common, task_id=len(tasks), design=design.to_dict(), rep=rep, coverage=False,
                              methods=cal_methods))
    if wants_text(vcfg):
        if not text_representation:
            raise ValueError("validate.text needs the text representation: build it with "
                             "tokens2policy.validate.text.build_text_representation first")
        from .text import TextDesign, load_representation

        m_text = int(load_representation(str(text_representation))["codes"].shape[1])
        for n in get("text_n_values"):
            for eff in get("text_effects"):
                design = TextDesign(n=int(n), effect=float(eff), representation=str(text_representation))
                for rep in range(int(reps)):
                    tasks.append(dict(common, task_id=len(tasks), design=design.to_dict(), rep=rep, coverage=False,
                                      m=m_text, min_active=int(vcfg.text_min_active)))
    if getattr(vcfg, "drivers", False):   # design 3 (validate/drivers.py)
        from .drivers import driver_design
        from .text import load_representation

        if not driver_representations:
            raise ValueError("validate.drivers needs the driver representations: build them with "
                             "tokens2policy.validate.drivers.build_driver_representation first")
        d_reps = vcfg.drivers_repetitions or reps
        d_common = dict(common, methods=[mm.name for mm in resolve_methods(vcfg.drivers_methods)])
        for (corpus, variant), path in driver_representations.items():
            m_rep = int(load_representation(str(path))["codes"].shape[1])
            for n in vcfg.drivers_n_values:
                for eff in vcfg.drivers_effects:
                    design = driver_design(corpus, variant, n, eff, path)
                    for rep in range(int(d_reps)):
                        tasks.append(dict(d_common, task_id=len(tasks), design=design.to_dict(), rep=rep,
                                          coverage=bool(vcfg.drivers_coverage), m=m_rep,
                                          min_active=int(vcfg.text_min_active)))
    return tasks


# --------------------------------------------------------------------------------------------- summaries
POINT_KEYS = ["design", "outcome", "n", "m", "effect"]


def summarize_selection(df: pd.DataFrame) -> pd.DataFrame:
    """Per design point and method: mean IoU / precision / recall / |S| with normal 95 % CIs, the rate of any
    selection (the FWER under the null) with its Wilson 95 % CI, and the mean seconds per repetition."""
    out = []
    sel = df[df["kind"] == "selection"]
    for key, g in sel.groupby(POINT_KEYS + ["method", "family"], sort=True):
        rec = dict(zip(POINT_KEYS + ["method", "family"], key))
        rec["reps"] = len(g)
        for metric in ("iou", "precision", "recall", "n_selected", "iou_aligned", "precision_aligned",
                       "recall_aligned"):
            if metric not in g:   # frames written before the aligned metrics existed
                continue
            m, lo, hi, _ = mean_interval(g[metric])
            rec[metric], rec[f"{metric}_lo"], rec[f"{metric}_hi"] = m, lo, hi
        if "seconds" in g:   # mean wall seconds of the method per repetition (inside the task)
            rec["seconds"] = float(pd.to_numeric(g["seconds"], errors="coerce").mean())
        for col in ("any_selected", "any_false"):  # under a null design: the family-wise error rate
            if col not in g:
                continue
            k = float(g[col].sum())
            rec[col] = k / len(g)
            rec[f"{col}_lo"], rec[f"{col}_hi"] = wilson_interval(k, len(g))
        out.append(rec)
    return pd.DataFrame(out)


DRAW_KEYS = POINT_KEYS + ["rep", "kind", "method", "estimand"]


def combine_chunks(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """The rows of several runs of one study (chunks of repetitions, ``validate.calibration_first_repetition``) as
    one frame: each (design point, repetition, method, estimand) once. A draw run in two chunks must have given the
    same result (rows are a function of the seed, the design and the repetition index): identical duplicates are
    kept once, a conflicting one is an error, never silently averaged."""
    if not frames:
        raise ValueError("combine_chunks needs at least one frame of rows")
    df = pd.concat(list(frames), ignore_index=True)
    dup = df.duplicated(DRAW_KEYS, keep=False)
    if dup.any():
        outcome = [c for c in ("selected", "estimate", "ci_low", "ci_high") if c in df]
        same = df[dup].groupby(DRAW_KEYS, dropna=False)[outcome].nunique(dropna=False).le(1).all(axis=1)
        if not same.all():
            bad = same[~same].index[0]
            raise ValueError(f"runs disagree on the same draw {dict(zip(DRAW_KEYS, bad))}: not one study")
        df = df.drop_duplicates(DRAW_KEYS, keep="first").reset_index(drop=True)
    return df


def summarize_coverage(df: pd.DataFrame) -> pd.DataFrame:
    """Per design point and estimand: empirical coverage with its Wilson 95 % CI, mean CI width, mean bias."""
    out = []
    cov = df[(df["kind"] == "coverage") & df["covered"].notna()]
    for key, g in cov.groupby(POINT_KEYS + ["estimand"], sort=True):
        rec = dict(zip(POINT_KEYS + ["estimand"], key))
        k = float(g["covered"].sum())
        rec.update(reps=len(g), coverage=k / len(g), mean_width=float((g["ci_high"] - g["ci_low"]).mean()),
                   mean_bias=float((g["estimate"] - g["true_value"]).mean()))
        rec["coverage_lo"], rec["coverage_hi"] = wilson_interval(k, len(g))
        out.append(rec)
    return pd.DataFrame(out)
