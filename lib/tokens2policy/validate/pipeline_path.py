"""Validation on the pipeline's own path: select → effects → policy exactly as the stages run them.

The main study (``study.py``) validates the pieces (NEXIS, one GATE, one policy value) one at a time. This design
runs the stages' own statistical cores on simulated experiments in the stage-table layout — the identify stage's
NEXIS on the ``selection`` units (:func:`identify_in_memory`, the engine the identify job reduces over Spark, with
the stage's ``identify`` settings), the effects stage's :func:`~tokens2policy.effects.job.effects_in_memory` and the
policy stage's :func:`~tokens2policy.policy.job.policy_in_memory` (the Spark jobs call the same
``experiment_effects`` / ``outcome_policies``) — and checks what a user reads in the tables against the truth:

* **false claims under the null** (no effect modification): the BLP heterogeneity test (``calibration``,
  ``differential_prediction`` p < α), a GATE contrast of a selected modifier (p < α), "the policy beats treat-all"
  (``policy_value`` ``minus treat_all`` CI above 0) and "the budget policy beats random at the same budget"
  (``minus random_same_budget`` CI excluding 0) — each should happen in at most α of the repetitions;
* **coverage** of the GATE CIs of the selected modifiers, of the joint interaction CIs and of the cross-fitted
  policy-value CIs against their true values (closed form, and Monte Carlo over ``n_truth`` fresh units; a
  learned policy's truth is the value of the fold-k rules its estimate averages, weighted by fold size);
* the learned policies' value rows and the budget gain again with the **per-unit SE** (estimands ``per-unit SE:
  …``; same draws, scores and assignments) — the policy stage's SE before it used the cross-fitting variance, kept
  to measure what that variance costs and buys;
* **the power cost of honesty**: IoU of the selection with the true modifiers and the regret of the deployed policy
  (value of the best rule minus value of the learned tree, by Monte Carlo), with ``honesty.mode=split`` against the
  single-sample ``honesty.mode=none``.

Two selectors: ``nexis`` (the identify stage) and ``top_marginal`` — the one feature with the largest marginal
interaction |t| (identify's marginal screen), always selected: the worst case of selection bias, the design of
issue 13 finding 1, where the single-sample path makes false claims most of the time.

Design (``PathDesign``): m dense N(0, 1) features stored as neuron activations (a unit's ``neurons`` row lists all
m), complete randomization, ``τ(x) = base + effect·(1{x₀ > 0} − 1{x₁ > 0})``, ``μ₀(x) = mu·(x₀ + x₂)``,
``Y = μ₀ + Tτ + N(0, noise²)``. Truth: the modifiers {0, 1} (none under the null, effect = 0). GATE truths in closed
form (independent features): E[τ | x_j > 0] = base + effect·(w_j/2) for j ∈ {0, 1} (w = (1, −1)), base otherwise, and
E[τ | x_j ≤ 0] = base − effect·(w_j/2); the joint regression's ``T x neuron_j`` coefficient on the active indicator is
effect·w_j (0 for other features), its ``(treatment)`` row E[τ] = base.

Run it with the study (``t2p run validate``; ``validate.pipeline_path_repetitions``: default 5 at the ``ci`` size
and 500 at ``full``, 0 skips it) or alone: ``python -m tokens2policy.validate.pipeline_path --reps 500``. The
500-repetition run and what it found are in docs/validation.md ("The pipeline's own path"); the CI-size rows are
checked by ``tests/validate/test_pipeline_path.py``.
"""
from __future__ import annotations

import argparse
import time
import zlib
from dataclasses import asdict, dataclass, replace
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import pandas as pd

MODES = ("split", "none")
SELECTORS = ("nexis", "top_marginal")
ROW_COLUMNS = {  # the validation_pipeline_path contract (one row per repetition × mode × selector × estimand)
    "design": "object", "n": "int64", "m": "int64", "effect": "float64", "rep": "int64", "mode": "object",
    "selector": "object", "n_selection": "int64", "n_estimation": "int64", "selected": "object",
    "n_selected": "int64", "iou": "float64", "estimand": "object", "kind": "object", "estimate": "float64",
    "ci_low": "float64", "ci_high": "float64", "p_value": "float64", "true_value": "float64",
    "covered": "float64", "claim": "float64", "seconds": "float64",
}


# --------------------------------------------------------------------------------------------- design
@dataclass(frozen=True)
class PathDesign:
    """A simulated experiment in the stage-table layout; see the module docstring."""

    name: str = "null"
    n: int = 1000
    m: int = 100
    effect: float = 0.0
    base: float = 0.2
    mu: float = 0.5
    noise: float = 1.0
    n_folds: int = 5
    treated_share: float = 0.5
    selectors: tuple = SELECTORS  # the worst-case selector matters under the null; the alternative runs nexis

    @property
    def truth(self) -> List[int]:
        return [0, 1] if self.effect != 0 else []

    def weight(self, j: int) -> float:
        return {0: 1.0, 1: -1.0}.get(int(j), 0.0) if self.effect != 0 else 0.0

    def tau(self, x: np.ndarray) -> np.ndarray:
        return self.base + self.effect * ((x[:, 0] > 0).astype(float) - (x[:, 1] > 0).astype(float))

    def mu0(self, x: np.ndarray) -> np.ndarray:
        return self.mu * (x[:, 0] + x[:, 2])

    def features(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.standard_normal((n, self.m)).astype(np.float32).astype(np.float64)

    def draw(self, rng: np.random.Generator, experiment_id: str = "path"):
        """(units, neurons, x): the ``units`` and ``neurons`` tables of one experiment, and the features."""
        n = self.n
        x = self.features(rng, n)
        t = np.zeros(n, dtype=int)
        t[rng.permutation(n)[: int(round(self.treated_share * n))]] = 1
        y = self.mu0(x) + t * self.tau(x) + self.noise * rng.standard_normal(n)
        unit_id = np.array([f"u{i:06d}" for i in range(n)], dtype=object)
        units = pd.DataFrame({"experiment_id": experiment_id, "unit_id": unit_id, "treatment": t, "outcome": y,
                              "fold": (rng.permutation(n) % self.n_folds).astype(np.int32)})
        idx = np.arange(self.m, dtype=np.int32)
        neurons = pd.DataFrame({"experiment_id": experiment_id, "unit_id": unit_id,
                                "indices": [idx] * n, "values": list(x.astype(np.float32))})
        return units, neurons, x

    def gate_truth(self, j: int, group: str) -> float:
        half = self.effect * self.weight(j) / 2
        return {"active": self.base + half, "inactive": self.base - half,
                "active - inactive": 2 * half}.get(group, np.nan)


# --------------------------------------------------------------------------------------------- the stages' cores
def identify_params(ic) -> dict:
    """The identify stage's NEXIS settings (``identify.job.identify_frame``) as ``identify.nexis`` arguments."""
    return dict(alpha=ic.alpha, test=ic.test, adjust=ic.adjust, rho=ic.rho, backward=ic.backward,
                nuisance=ic.nuisance, max_rounds=ic.max_rounds, min_active=ic.min_active)


def _selection_frame(cfg, units: pd.DataFrame, neurons: pd.DataFrame, exp: str):
    from tokens2policy.effects.design import neuron_matrix
    from tokens2policy.effects.job import experiment_frame
    from tokens2policy.honesty import selects

    pdf = experiment_frame(cfg, units, neurons, exp)
    pdf = pdf[selects(pdf["sample"].to_numpy())].reset_index(drop=True)
    m = int(max((int(np.max(ix)) for ix in pdf["indices"] if len(ix)), default=-1)) + 1
    z = neuron_matrix(pdf["indices"].tolist(), pdf["values"].tolist(), range(m))
    return pdf, z


def identify_in_memory(cfg, units: pd.DataFrame, neurons: pd.DataFrame, outcome: str = "outcome") -> pd.DataFrame:
    """The identify stage on pandas tables: NEXIS with the stage's settings on the units it selects on (role
    ``selection``, or all with ``honesty.mode=none``), stored folds for the GCM; the ``modifiers`` rows it writes
    (``identify.job.modifier_rows``; labels empty). Covariates are not used (the design has none)."""
    from tokens2policy.identify import nexis
    from tokens2policy.identify.job import modifier_rows
    from tokens2policy.lakehouse.schemas import table_spec

    cols = list(table_spec("modifiers").column_names)
    rows = []
    for exp in sorted(units["experiment_id"].unique()):
        pdf, z = _selection_frame(cfg, units, neurons, exp)
        ic = cfg.identify
        cluster = pdf["cluster"].astype(str).to_numpy() if ic.test == "cluster" else None
        res = nexis(pdf[outcome].to_numpy(float), pdf["treatment"].to_numpy(float), z, None, cluster=cluster,
                    folds=pdf["fold"].to_numpy(), seed=cfg.seed, **identify_params(ic))
        rows += modifier_rows(exp, outcome, res, [], ic)
    return pd.DataFrame(rows, columns=cols)


def top_marginal_in_memory(cfg, units: pd.DataFrame, neurons: pd.DataFrame, outcome: str = "outcome") -> pd.DataFrame:
    """The worst-case selector: the single feature with the largest marginal interaction |t| (the identify
    stage's marginal screen, HC2), on the same units the identify stage selects on; ``modifiers`` rows."""
    from tokens2policy.identify import marginal
    from tokens2policy.lakehouse.schemas import table_spec

    cols = list(table_spec("modifiers").column_names)
    rows = []
    for exp in sorted(units["experiment_id"].unique()):
        pdf, z = _selection_frame(cfg, units, neurons, exp)
        mg = marginal(pdf[outcome].to_numpy(float), pdf["treatment"].to_numpy(float), z, test="hc2")
        j = int(np.nanargmax(np.abs(mg.tstats)))
        t = float(mg.tstats[j])
        rows.append((exp, outcome, str(j), "Z", "neuron", None, float(mg.pvalues[j]), t, "+" if t > 0 else "-", 1,
                     "joint", "top_marginal", None, float(cfg.identify.alpha)))
    return pd.DataFrame(rows, columns=cols)


def run_path(cfg, units: pd.DataFrame, neurons: pd.DataFrame, selector: str = "nexis",
             policy: bool = True) -> Dict[str, object]:
    """select → effects → policy on pandas tables, as ``t2p run identify effects policy`` would (one experiment,
    outcome ``outcome``). Returns the frames and fitted pieces of the stages (``policy=False``: stop after
    effects)."""
    from tokens2policy.effects.job import effects_in_memory
    from tokens2policy.policy.job import policy_in_memory

    if selector not in SELECTORS:
        raise ValueError(f"selector must be one of {SELECTORS}, got {selector!r}")
    select = identify_in_memory if selector == "nexis" else top_marginal_in_memory
    modifiers = select(cfg, units, neurons)
    (exp,) = units["experiment_id"].unique()
    eff = effects_in_memory(cfg, units, neurons, modifiers, keep_learners=True, learners=[cfg.policy.learner])[exp]
    if not policy:
        return {"modifiers": modifiers, "effects": eff, "policy": None}
    pol = policy_in_memory(cfg, units, neurons, modifiers, eff["effects"])[exp]["outcome"]
    return {"modifiers": modifiers, "effects": eff, "policy": pol}


# --------------------------------------------------------------------------------------------- one repetition
STUDY_SETTINGS = ("effects.nuisance_neurons=8", "effects.n_bootstrap=20")


def path_config(mode: str, overrides: Sequence[str] = ()):
    """The stage configuration the study runs: the defaults with ``honesty.mode``, the design's columns and
    :data:`STUDY_SETTINGS` — fewer nuisance features (the 8 most active neurons besides the selected ones) and the
    fewest RATE bootstrap draws, which cost time and touch no estimand checked here (the AIPW scores stay valid
    with any nuisance; RATE's bootstrap SEs are not checked)."""
    from tokens2policy.config import load_config

    return load_config(None, ["source.outcome_cols=[outcome]", "source.covariate_cols=[]", "effects.se=hc1",
                              *STUDY_SETTINGS, f"honesty.mode={mode}", *overrides])


def selected_neurons(modifiers: pd.DataFrame) -> List[int]:
    from tokens2policy.effects.design import neuron_id

    return sorted(neuron_id(f) for f, s in zip(modifiers["feature"], modifiers["source"]) if s == "neuron")


def _policy_truths(design: PathDesign, cfg, res, x_fresh: np.ndarray) -> Dict[str, float]:
    """True values (Monte Carlo over ``x_fresh``) of the cross-fitted policies the value CIs are for — the fold-k
    rules weighted by fold k's share of the estimation units — and of the deployed rules and the best rule."""
    from tokens2policy.effects.gates import encode_modifiers
    from tokens2policy.policy.job import tree_design
    from tokens2policy.policy.rules import budget_branches

    pol, fitted = res["policy"], res["effects"]["fitted"]["outcome"]
    cost = cfg.policy.cost
    gain = design.tau(x_fresh) - cost
    mods, kinds = pol["mods"], pol["kinds"]
    values = {m.feature: x_fresh[:, m.neuron] for m in mods}
    Xt = tree_design(values, kinds, mods)[0] if mods else np.zeros((len(x_fresh), 0))
    Z = encode_modifiers(values, kinds, cfg.effects.modifier_encoding)[0] if mods else np.zeros((len(x_fresh), 0))
    learner = fitted["learners"][cfg.policy.learner]
    sub = pol["sub"]
    from tokens2policy.policy.job import estimation_mask

    est = estimation_mask(sub)
    folds, weights = np.unique(sub["fold"].to_numpy()[est], return_counts=True)
    weights = weights / weights.sum()
    out = {"tree": 0.0, "threshold": 0.0, "budget": 0.0}
    for k, w in zip(folds, weights):
        s_k = learner.effect_without(Z, int(k))
        pi = {"tree": pol["fold_rules"]["tree"][int(k)].predict(Xt).astype(float),
              "threshold": (s_k > cost).astype(float)}
        c_k, p_k = pol["fold_rules"]["budget"][int(k)]
        above, tied = budget_branches(s_k, c_k)
        pi["budget"] = above + p_k * tied
        for name, v in pi.items():
            out[name] += w * float(np.mean(v * gain))
    base = float(np.mean(design.mu0(x_fresh)))
    out = {f"value {k}": base + v for k, v in out.items()}
    best = float(np.mean(np.maximum(gain, 0.0)))
    out["regret tree"] = best - float(np.mean(pol["tree"].predict(Xt) * gain))
    out["regret threshold"] = best - float(np.mean((learner.effect(Z) > cost) * gain))
    return out


def _per_unit_values(cfg, res) -> pd.DataFrame:
    """The ``policy_value`` rows of this run with the per-unit SE (``compare_policies`` without ``folds``: each
    learned rule's cross-fitted assignments valued as if they were a fixed rule — the stage before it used the
    cross-fitting variance), on the same estimation units, scores and assignments."""
    from tokens2policy.policy.job import estimation_mask
    from tokens2policy.policy.value import compare_policies

    pol = res["policy"]
    sub = pol["sub"]
    est = estimation_mask(sub)
    held = {name: a[1][est] for name, a in pol["learned"].items()}
    cluster = pol["cluster"]
    return compare_policies(sub[["dr_score0", "dr_score1"]].to_numpy(dtype=float)[est], held, cost=cfg.policy.cost,
                            cluster=None if cluster is None else cluster[est], alpha=cfg.policy.alpha)


def evaluate(design: PathDesign, cfg, res, x_fresh: np.ndarray) -> List[dict]:
    """The rows (estimand, estimate, CI, truth, covered, claim) of one run of the path."""
    alpha = cfg.effects.alpha
    mods = res["modifiers"]
    selected = selected_neurons(mods)
    rows: List[dict] = []

    def add(estimand, kind, est=np.nan, lo=np.nan, hi=np.nan, p=np.nan, truth=np.nan, claim=np.nan):
        covered = float(lo <= truth <= hi) if np.isfinite([lo, hi, truth]).all() else np.nan
        rows.append(dict(estimand=estimand, kind=kind, estimate=est, ci_low=lo, ci_high=hi, p_value=p,
                         true_value=truth, covered=covered, claim=claim))

    cal = res["effects"]["calibration"]
    blp = cal[(cal.learner == "dr_selected") & (cal.metric == "blp") & (cal.group == "differential_prediction")]
    p = float(blp.p_value.iloc[0]) if len(blp) else np.nan
    add("blp heterogeneity", "claim", est=float(blp.estimate.iloc[0]) if len(blp) else np.nan, p=p,
        claim=float(p < alpha) if np.isfinite(p) else 0.0)
    gates = res["effects"]["gates"]
    contrast_ps = []
    for _, g in gates.iterrows():
        feat = str(g.feature)
        if not feat.startswith("neuron_"):
            if feat == "(treatment)":
                add("joint (treatment)", "coverage", g.estimate, g.ci_low, g.ci_high, g.p_value, design.base)
            continue
        j = int(feat.split("_")[1])
        if g.split == "joint":
            add("joint T x feature", "coverage", g.estimate, g.ci_low, g.ci_high, g.p_value,
                design.effect * design.weight(j) if cfg.effects.modifier_encoding == "indicator" else np.nan)
            continue
        add(f"gate {g.group}", "coverage", g.estimate, g.ci_low, g.ci_high, g.p_value, design.gate_truth(j, g.group))
        if g.group == "active - inactive":
            contrast_ps.append(float(g.p_value))
    ps = [q for q in contrast_ps if np.isfinite(q)]
    add("gate contrast", "claim", p=min(ps) if ps else np.nan,
        claim=float(min(ps) < alpha) if ps else 0.0)  # any selected modifier's contrast (one under top_marginal)
    val = res["policy"]["value"].set_index(["policy", "comparison"])
    truths = _policy_truths(design, cfg, res, x_fresh)
    for pol in ("tree", "threshold", "budget"):
        r = val.loc[(pol, "value")]
        add(f"value {pol}", "coverage", r.estimate, r.ci_low, r.ci_high, r.p_value, truths[f"value {pol}"])
        d = val.loc[(pol, "minus treat_all")]
        add(f"{pol} beats treat_all", "claim", d.estimate, d.ci_low, d.ci_high, d.p_value,
            claim=float(d.ci_low > 0))
    g = val.loc[("budget", "minus random_same_budget")]
    add("budget gain over random", "claim", g.estimate, g.ci_low, g.ci_high, g.p_value,
        claim=float(g.ci_low > 0 or g.ci_high < 0))
    # the same rows with the per-unit SE the policy stage used before the cross-fitting variance (for comparison)
    old = _per_unit_values(cfg, res).set_index(["policy", "comparison"])
    for pol in ("tree", "threshold", "budget"):
        r = old.loc[(pol, "value")]
        add(f"per-unit SE: value {pol}", "coverage", r.estimate, r.ci_low, r.ci_high, r.p_value,
            truths[f"value {pol}"])
    g = old.loc[("budget", "minus random_same_budget")]
    add("per-unit SE: budget gain over random", "claim", g.estimate, g.ci_low, g.ci_high, g.p_value,
        claim=float(g.ci_low > 0 or g.ci_high < 0))
    for name in ("regret tree", "regret threshold"):
        add(name, "power", est=truths[name])
    return rows


def iou(selected: Iterable[int], truth: Iterable[int]) -> float:
    S, T = set(selected), set(truth)
    return len(S & T) / len(S | T) if (S | T) else np.nan


def run_repetition(design: PathDesign, rep: int, seed: int = 0, modes: Sequence[str] = MODES,
                   selectors: Optional[Sequence[str]] = None, n_truth: int = 20000,
                   overrides: Sequence[str] = ()) -> pd.DataFrame:
    """One simulated experiment, analysed by the path in every mode × selector (paired: the same draw;
    ``selectors`` default: the design's)."""
    selectors = design.selectors if selectors is None else selectors
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, zlib.crc32(design.name.encode()), int(rep)])
    rng_data, rng_truth = (np.random.default_rng(s) for s in ss.spawn(2))
    units, neurons, _ = design.draw(rng_data, experiment_id=f"{design.name}-{rep}")
    x_fresh = design.features(rng_truth, n_truth)
    out = []
    for mode in modes:
        cfg = path_config(mode, overrides)
        from tokens2policy.honesty import estimates, selects, unit_roles

        roles = unit_roles(units["experiment_id"].iloc[0], units["unit_id"], cfg.honesty)
        for selector in selectors:
            start = time.perf_counter()
            res = run_path(cfg, units, neurons, selector)
            selected = selected_neurons(res["modifiers"])
            rows = evaluate(design, cfg, res, x_fresh)
            secs = time.perf_counter() - start
            for r in rows:
                r.update(design=design.name, n=design.n, m=design.m, effect=design.effect, rep=rep, mode=mode,
                         selector=selector, n_selection=int(selects(roles).sum()),
                         n_estimation=int(estimates(roles).sum()), selected=",".join(map(str, selected)),
                         n_selected=len(selected), iou=iou(selected, design.truth), seconds=secs)
            out += rows
    return pd.DataFrame(out)[list(ROW_COLUMNS)].astype(ROW_COLUMNS)


# --------------------------------------------------------------------------------------------- study + summary
def designs(size: str = "full") -> List[PathDesign]:
    """The designs of the study: the null of issue 13 (n = 1000, m = 100) and an alternative with two modifiers;
    ``ci``: smaller versions (n = 600 / 800, m = 30, 3 folds) for the default test suite and the CI-size run."""
    if size == "ci":
        return [PathDesign("null", n=600, m=30, effect=0.0, n_folds=3),
                PathDesign("alternative", n=800, m=30, effect=1.0, n_folds=3, selectors=("nexis",))]
    return [PathDesign("null", n=1000, m=100, effect=0.0),
            PathDesign("alternative", n=2000, m=100, effect=0.75, selectors=("nexis",))]


def summarize(rows: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """Per design × mode × selector × estimand: claim rate or coverage with Wilson 95 % CIs, mean estimate."""
    from .study import wilson_interval

    out = []
    keys = ["design", "mode", "selector", "estimand", "kind"]
    for key, g in rows.groupby(keys, sort=True):
        rec = dict(zip(keys, key))
        rec["reps"] = int(g["rep"].nunique())
        rec["rows"] = int(len(g))
        if key[-1] == "claim":
            k, n = float(g["claim"].sum()), float(g["claim"].notna().sum())
            rec.update(rate=k / n if n else np.nan)
            rec["ci_low"], rec["ci_high"] = wilson_interval(k, n)
        elif key[-1] == "coverage":
            c = g["covered"].dropna()
            rec.update(rate=float(c.mean()) if len(c) else np.nan)
            rec["ci_low"], rec["ci_high"] = wilson_interval(float(c.sum()), float(len(c)))
        else:
            v = g["estimate"].dropna()
            rec.update(rate=float(v.mean()) if len(v) else np.nan)
            half = 1.96 * float(v.std(ddof=1)) / np.sqrt(len(v)) if len(v) > 1 else np.nan
            rec["ci_low"], rec["ci_high"] = rec["rate"] - half, rec["rate"] + half
        out.append(rec)
    summary = pd.DataFrame(out)
    sel = rows.drop_duplicates(["design", "rep", "mode", "selector"]).assign(
        any_selected=lambda d: (d["n_selected"] > 0).astype(float)).groupby(["design", "mode", "selector"])
    power = sel.agg(iou=("iou", "mean"), n_selected=("n_selected", "mean"), any_selected=("any_selected", "mean"),
                    seconds=("seconds", "mean")).reset_index()
    return summary.merge(power, on=["design", "mode", "selector"], how="left")


DEFAULT_REPETITIONS = {"ci": 5, "full": 500}


def run_in_study(spark, cfg, run_id: str, out_dir) -> Dict[str, float]:
    """The validation job's hook (``t2p run validate``): run this design at the study's size (``validate.size``;
    repetitions ``validate.pipeline_path_repetitions``, default 5 for ci and 500 for full; 0 skips it) as Spark
    tasks, append the rows to the ``validation_pipeline_path`` Delta table with the MLflow run id, write
    ``pipeline_path_summary.csv`` to ``out_dir`` and the MLflow run; returns headline metrics."""
    import mlflow

    from tokens2policy.lakehouse import write_table

    vcfg = cfg.validate_
    reps = vcfg.pipeline_path_repetitions
    reps = DEFAULT_REPETITIONS[vcfg.size] if reps is None else int(reps)
    if reps <= 0:
        return {}
    rows = run_study(reps, cfg.seed, vcfg.size, spark=spark, tasks_per_partition=vcfg.tasks_per_partition)
    rows.insert(0, "run_id", run_id)
    write_table(spark.createDataFrame(rows.astype(object).where(rows.notna(), None).values.tolist(),
                                      row_schema(with_run_id=True)), cfg, "validation_pipeline_path", mode="append")
    summary = summarize(rows.drop(columns="run_id"), vcfg.alpha)
    from pathlib import Path

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    path = Path(out_dir) / "pipeline_path_summary.csv"
    summary.to_csv(path, index=False)
    mlflow.log_artifact(str(path), "validation")
    metrics = {}
    for r in summary.itertuples():
        key = f"pipeline_path.{r.design}.{r.mode}.{r.selector}.{r.estimand}".replace(" ", "_")
        key = "".join(ch if ch.isalnum() or ch in "_-.:/" else "_" for ch in key)  # names MLflow accepts
        if np.isfinite(r.rate):
            metrics[key] = float(r.rate)
    mlflow.log_metrics({k.replace(">", "gt"): v for k, v in metrics.items()})
    return metrics


def row_schema(with_run_id: bool = False):
    """Spark schema of the rows (:data:`ROW_COLUMNS`)."""
    from pyspark.sql.types import BooleanType, DoubleType, LongType, StringType, StructField, StructType

    kinds = {"int64": LongType(), "float64": DoubleType(), "object": StringType(), "bool": BooleanType()}
    fields = [StructField("run_id", StringType(), False)] if with_run_id else []
    return StructType(fields + [StructField(c, kinds[t], True) for c, t in ROW_COLUMNS.items()])


def run_study(reps: int, seed: int = 0, size: str = "full", n_truth: int = 20000, spark=None,
              tasks_per_partition: int = 1, overrides: Sequence[str] = ()) -> pd.DataFrame:
    """All repetitions of every design; with ``spark``, one Spark task per (design, repetition)."""
    tasks = [(d, r) for d in designs(size) for r in range(reps)]
    if spark is None:
        return pd.concat([run_repetition(d, r, seed, n_truth=n_truth, overrides=overrides) for d, r in tasks],
                         ignore_index=True)
    import math

    schema = row_schema()
    ids = spark.range(0, len(tasks), 1, numPartitions=max(1, math.ceil(len(tasks) / tasks_per_partition)))

    def run_partition(batches):
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1):
            for pdf in batches:
                for tid in pdf["id"].tolist():
                    d, r = tasks[int(tid)]
                    yield run_repetition(d, r, seed, n_truth=n_truth, overrides=overrides)

    return ids.mapInPandas(run_partition, schema=schema).toPandas()


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=500)
    parser.add_argument("--first", type=int, default=0, help="first repetition index (split a run over processes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-truth", type=int, default=20000)
    parser.add_argument("--out", default="pipeline_path")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--design", action="append", default=None, help="run only these designs (names)")
    parser.add_argument("--summarize", nargs="*", default=None, help="only summarize these row CSVs")
    args = parser.parse_args(argv)
    from pathlib import Path

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.summarize is not None:
        rows = pd.concat([read_rows(p) for p in args.summarize], ignore_index=True)
    else:
        from threadpoolctl import threadpool_limits

        rows, tag = [], "_".join(args.design or ["all"]) + (f"_from{args.first}" if args.first else "")
        with threadpool_limits(1):  # one core per process, as the Spark tasks
            for d in [d for d in designs() if args.design is None or d.name in args.design]:
                for r in range(args.first, args.first + args.reps):
                    rows.append(run_repetition(d, r, args.seed, n_truth=args.n_truth, overrides=args.overrides))
                    if (r + 1 - args.first) % 10 == 0:
                        pd.concat(rows, ignore_index=True).to_csv(out / f"pipeline_path_rows_{tag}.csv", index=False)
                        print(f"{d.name}: {r + 1 - args.first}/{args.reps}", flush=True)
        rows = pd.concat(rows, ignore_index=True)
        rows.to_csv(out / f"pipeline_path_rows_{tag}.csv", index=False)
    summary = summarize(rows)
    summary.to_csv(out / "pipeline_path_summary.csv", index=False)
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.max_rows", 500):
        print(summary.to_string())


def read_rows(path) -> pd.DataFrame:
    """Rows written by :func:`main` (the ``selected`` column stays a string)."""
    return pd.read_csv(path, keep_default_na=False, na_values=[""], dtype={"selected": str})


if __name__ == "__main__":
    main()
