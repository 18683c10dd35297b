"""Effects stage job: GATEs, cross-fitted CATE learners (nuisances one Spark task per fold), calibration.

Reads ``units``, ``neurons``, ``modifiers``; writes ``gates``, ``effects``, ``calibration`` and
``cate_final_stages`` (the fitted linear final stages, :mod:`tokens2policy.effects.final_stage`) (one experiment's rows
replaced at a time). **Selection-aware** (``honesty.mode=split``, the default; :mod:`tokens2policy.honesty`): every
number about the selected modifiers is estimated on the ``estimation`` units only — the units the identify stage
did not select on; per-unit rows of the ``selection`` units are still written (their CATE predicted by the final
stage fitted on the estimation units), marked by the ``sample`` column.

Nuisance cross-fitting is distributed: the unit rows (with their sparse activations) are replicated once per
nuisance task — one per fold, plus one per pair of folds for the nested cross-fit that keeps the out-of-fold final
stages free of their fold's outcomes (``effects.learners``) — hash-partitioned on a per-task key chosen so each
task lands in its own partition, and ``groupBy(key).applyInPandas`` runs :func:`fit_task`. ``fit_task`` is also
what :func:`cross_fit_local` loops over, so both paths give the same numbers (same rows in the same unit_id order,
seeds derived from ``(seed, left-out folds)``). The statistical body, :func:`experiment_effects`, takes pandas
frames: :func:`effects_in_memory` runs the whole stage without Spark on the same code.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from tokens2policy.execution import choose
from tokens2policy.fold_tasks import fold_partition_keys, run_fold_tasks  # noqa: F401 (re-exported)

from tokens2policy.honesty import estimated_on, estimates, role_column, unit_roles

from .calibration import calibration_table
from .coverage import outcome_coverage
from .design import (
    FeatureSpec, build_feature_spec, feature_matrix, modifier_values, resolve_modifiers,
)
from .final_stage import LinearFinalStage, final_stage_frame
from .gates import encode_modifiers, gates_table, infer_split_kind
from .learners import DRLearner, NuisanceParams, RLearner, aipw_scores, fit_fold_nuisances, nuisance_tasks

def nuisance_params(cfg) -> NuisanceParams:
    e = cfg.effects
    prop = "model" if e.propensity_model else e.propensity
    return NuisanceParams(model=e.nuisance, propensity=prop, clip=e.propensity_clip)


def _estimation_rows(pdf: pd.DataFrame) -> np.ndarray:
    """Rows the effects stage may estimate on: role ``estimation`` (or ``both``); every row without a ``sample``."""
    if "sample" not in pdf.columns:
        return np.ones(len(pdf), dtype=bool)
    return estimates(pdf["sample"].to_numpy())


def fit_task(pdf: pd.DataFrame, fold, spec: FeatureSpec, outcomes: Sequence[str], params: NuisanceParams,
             seed: int) -> pd.DataFrame:
    """One nuisance fit for every outcome, leaving out ``fold`` (a fold id, or a pair of fold ids — nested).

    Trains on the estimation rows (:mod:`tokens2policy.honesty`) whose fold is not left out and whose outcome is
    finite. A single left-out fold k predicts every row of fold k (``without = k``: the plain cross-fit, also for
    the selection units, whose rows the effects table keeps); a pair (j, k) predicts the estimation rows of fold j
    with ``without = k`` and of fold k with ``without = j`` (nested: what fold ``without``'s held-out final stage
    trains on). Rows are put in unit_id order first so the result does not depend on how Spark delivered them."""
    pdf = pdf.sort_values("unit_id", kind="stable").reset_index(drop=True)
    return _fit_sorted(pdf, feature_matrix(pdf, spec), fold, outcomes, params, seed)


def _fit_sorted(pdf: pd.DataFrame, X: np.ndarray, fold, outcomes: Sequence[str], params: NuisanceParams,
                seed: int) -> pd.DataFrame:
    """:func:`fit_task` on rows already in unit_id order with their feature matrix ``X``."""
    excl = tuple(int(k) for k in np.atleast_1d(fold))
    t = pdf["treatment"].to_numpy()
    fold_ids = pdf["fold"].astype(int).to_numpy()
    est = _estimation_rows(pdf)
    out_fold = np.isin(fold_ids, excl)
    train = ~out_fold & est
    pred = out_fold if len(excl) == 1 else out_fold & est
    without = np.full(int(pred.sum()), excl[0]) if len(excl) == 1 else \
        np.where(fold_ids[pred] == excl[0], excl[1], excl[0])
    out = []
    for outcome in outcomes:
        y = pdf[outcome].astype(float).to_numpy()
        ok = train & np.isfinite(y)
        res = fit_fold_nuisances((X[ok], t[ok], y[ok]), X[pred], excl if len(excl) > 1 else excl[0], params, seed)
        out.append(pd.DataFrame({"unit_id": pdf["unit_id"].to_numpy()[pred], "outcome": outcome,
                                 "without": without.astype(np.int32), "mu0": res["mu0"], "mu1": res["mu1"],
                                 "e": res["e"]}))
    return pd.concat(out, ignore_index=True)


def cross_fit_local(pdf: pd.DataFrame, spec: FeatureSpec, outcomes, params, seed, nested: bool = True) -> pd.DataFrame:
    """Sequential reference of :func:`cross_fit_spark` on one in-memory frame."""
    folds = pdf["fold"].astype(int).unique()
    tasks = nuisance_tasks(folds, nested and len(folds) >= 3)  # nesting needs a third fold to train on
    pdf = pdf.sort_values("unit_id", kind="stable").reset_index(drop=True)
    X = feature_matrix(pdf, spec)  # once: what every task would build from the same rows
    return pd.concat([_fit_sorted(pdf, X, excl, outcomes, params, seed) for excl in tasks], ignore_index=True)


def cross_fit_spark(spark, joined, spec: FeatureSpec, outcomes, params, seed, folds: Sequence[int],
                    nested: bool = True) -> pd.DataFrame:
    """Nuisances with one Spark task per nuisance fit (:func:`tokens2policy.fold_tasks.run_fold_tasks`, task i
    leaving out the folds ``nuisance_tasks(folds)[i]``): every row reaches each task, which trains on the other
    folds and predicts the left-out ones (:func:`fit_task`). The result carries ``partition_id`` and
    ``fit_seconds`` per row so the caller can check and log the task layout."""
    outcomes = list(outcomes)
    tasks = nuisance_tasks(folds, nested and len(folds) >= 3)  # nesting needs a third fold to train on
    unit_type = joined.schema["unit_id"].dataType.simpleString()
    schema = f"unit_id {unit_type}, outcome string, without int, mu0 double, mu1 double, e double"

    def task(pdf: pd.DataFrame, i: int) -> pd.DataFrame:
        return fit_task(pdf, tasks[i], spec, outcomes, params, seed)

    return run_fold_tasks(spark, joined, range(len(tasks)), task, schema).toPandas()


def nuisance_arrays(nu_pdf: pd.DataFrame, sub: pd.DataFrame, outcome: str) -> Dict[str, object]:
    """The learners' ``nuisances`` for the rows of ``sub`` from the cross-fit frame: plain ``mu0/mu1/e`` (the fit
    without the unit's own fold) for every row, and the nested (n, K) arrays (NaN for selection units)."""
    nu = nu_pdf[nu_pdf["outcome"] == outcome]
    fold_ids = np.sort(sub["fold"].astype(int).unique())
    pos = pd.Series(np.arange(len(sub)), index=sub["unit_id"].to_numpy())
    col = pd.Series(np.arange(fold_ids.size), index=fold_ids)
    have = nu["unit_id"].isin(pos.index) & nu["without"].isin(fold_ids)
    nu = nu[have]
    rows, cols = pos.loc[nu["unit_id"]].to_numpy(), col.loc[nu["without"]].to_numpy()
    out: Dict[str, object] = {"fold_ids": fold_ids, "nested": {}}
    own = col.loc[sub["fold"].astype(int)].to_numpy()
    for key in ("mu0", "mu1", "e"):
        cube = np.full((len(sub), fold_ids.size), np.nan)
        cube[rows, cols] = nu[key].to_numpy()
        out[key] = cube[np.arange(len(sub)), own]
        out["nested"][key] = cube
    if not np.isfinite(out["mu0"]).all():
        raise ValueError(f"{outcome}: cross-fitted nuisances are missing for some units")
    if fold_ids.size < 3:  # two folds: plain cross-fitting only (the learners then say oof_nested_ = False)
        out.pop("nested")
        out.pop("fold_ids")
    return out


def subset_nuisances(nuisances: Dict[str, object], rows: np.ndarray) -> Dict[str, object]:
    """The ``nuisances`` of :func:`nuisance_arrays` restricted to ``rows`` (boolean mask)."""
    out = {k: nuisances[k][rows] for k in ("mu0", "mu1", "e")}
    if "nested" in nuisances:
        out.update(fold_ids=nuisances["fold_ids"], nested={k: v[rows] for k, v in nuisances["nested"].items()})
    return out


def top_neurons(indices: Sequence, n: int) -> List[int]:
    """The ``n`` most frequently active neurons (ties by lower index), from per-unit index arrays."""
    if n <= 0:
        return []
    flat = [np.asarray(ix, dtype=np.int64) for ix in indices if ix is not None and len(ix)]
    if not flat:
        return []
    counts = np.bincount(np.concatenate(flat))
    order = np.lexsort((np.arange(counts.size), -counts))
    return [int(i) for i in order[:n] if counts[i] > 0]


def load_experiment(spark, cfg, units, neurons, exp: str):
    """Driver frame (unit_id order) of one experiment's units joined with their activations and their honesty role
    (``sample``: selection / estimation / both), plus the Spark join."""
    from pyspark.sql import functions as F

    from tokens2policy.lakehouse import experiment_filter

    u = units.filter(experiment_filter(exp))
    nrn = neurons.filter(experiment_filter(exp)).select("unit_id", "indices", "values")
    joined = u.join(nrn, "unit_id", "left").withColumn(
        "indices", F.coalesce("indices", F.array().cast("array<int>"))).withColumn(
        "values", F.coalesce("values", F.array().cast("array<float>"))).withColumn(
        "sample", role_column(cfg.honesty))
    pdf = joined.toPandas().sort_values("unit_id", kind="stable").reset_index(drop=True)
    return joined, pdf


def experiment_frame(cfg, units: pd.DataFrame, neurons: pd.DataFrame, exp: str) -> pd.DataFrame:
    """In-memory twin of :func:`load_experiment`'s driver frame from pandas ``units`` and ``neurons`` tables."""
    u = units[units["experiment_id"] == exp]
    nrn = neurons[neurons["experiment_id"] == exp][["unit_id", "indices", "values"]]
    pdf = u.merge(nrn, on="unit_id", how="left")
    empty = [np.zeros(0, np.int32)] * len(pdf)
    pdf["indices"] = [ix if isinstance(ix, (list, np.ndarray)) else e for ix, e in zip(pdf["indices"], empty)]
    pdf["values"] = [v if isinstance(v, (list, np.ndarray)) else np.zeros(0, np.float32) for v in pdf["values"]]
    pdf["sample"] = unit_roles(exp, pdf["unit_id"].to_numpy(), cfg.honesty)
    return pdf.sort_values("unit_id", kind="stable").reset_index(drop=True)


def covariate_columns(cfg, columns) -> List[str]:
    return [c for c in cfg.source.covariate_cols if c in columns]


def outcome_columns(cfg, columns) -> List[str]:
    out = [c for c in cfg.source.outcome_cols if c in columns]
    if not out:
        raise ValueError(f"none of the configured outcome columns {cfg.source.outcome_cols} is in the units table")
    return out


def modifier_frame(pdf, mods_pdf, covariates, cfg):
    """Selected modifiers of one outcome: (Modifier list, raw values dict, split kinds dict)."""
    mods = resolve_modifiers(mods_pdf, covariates)
    values = modifier_values(pdf, mods)
    kinds = {}
    for m in mods:
        v = values[m.feature]
        kinds[m.feature] = infer_split_kind(v, m.source, cfg.effects.max_levels)
        if kinds[m.feature] != "categorical":
            v = pd.to_numeric(pd.Series(v), errors="coerce").astype(float)
            values[m.feature] = v.fillna(v.mean() if v.notna().any() else 0.0).to_numpy()
    return mods, values, kinds


def cluster_ids(cfg, pdf):
    if cfg.effects.se != "cluster":
        return None
    if "cluster" not in pdf.columns or pdf["cluster"].isna().any():
        raise ValueError("effects.se=cluster needs a non-null 'cluster' column in the units table")
    return pdf["cluster"].astype(str).to_numpy()


def _learners(cfg, seed):
    e = cfg.effects
    return {
        "dr_selected": DRLearner(final="linear", alpha=e.alpha, seed=seed),
        "r_selected": RLearner(final="linear", alpha=e.alpha, seed=seed),
        "dr_full": DRLearner(final=e.full_final, alpha=e.alpha, seed=seed),
        "r_full": RLearner(final=e.full_final, alpha=e.alpha, seed=seed),
    }


def analyse_outcome(cfg, exp, outcome, pdf, nu_pdf, mods_pdf, spec, covariates, keep_learners: bool = False,
                    learners: Optional[Sequence[str]] = None, labels=None):
    """GATE, effects and calibration frames for one (experiment, outcome).

    Every estimate about the selected modifiers — GATEs, joint interactions, the learners' final stages, the
    calibration and the heterogeneity coverage — uses the estimation units only (``sample`` estimation, or both
    with ``honesty.mode=none``); the ``effects`` rows of the other units carry the CATE the final stages predict
    for them. Modifier encodings (numeric fill, split kinds, categorical levels) read pre-treatment columns only
    and use every unit. ``learners``: a subset of the stage's learners to fit (default all; the validation study
    fits the one the policy stage reads); the coverage rows need both ``dr_selected`` and ``dr_full`` and are
    left out (no ``coverage_line`` metric) when the subset lacks one. ``labels``: neuron labels for the coverage
    line."""
    e = cfg.effects
    y_all = pdf[outcome].astype(float).to_numpy()
    keep = np.isfinite(y_all)
    sub = pdf[keep].reset_index(drop=True)
    est = _estimation_rows(sub)
    if est.sum() < 10:
        raise ValueError(f"{exp}/{outcome}: only {int(est.sum())} estimation units with an outcome; the effects "
                         f"stage needs at least 10 (honesty.selection_share={cfg.honesty.selection_share})")
    on = estimated_on(cfg.honesty)
    nuisances = nuisance_arrays(nu_pdf, sub, outcome)
    y, t, folds = y_all[keep], sub["treatment"].astype(int).to_numpy(), sub["fold"].astype(int).to_numpy()
    cluster = cluster_ids(cfg, sub)
    cl_est = None if cluster is None else cluster[est]
    mods, values, kinds = modifier_frame(sub, mods_pdf, covariates, cfg)

    gates = gates_table(y[est], t[est], {k: v[est] for k, v in values.items()}, kinds, cluster=cl_est,
                        alpha=e.alpha, joint=bool(mods), joint_encoding=e.modifier_encoding)
    by_feature = {m.feature: m for m in mods}
    gates.insert(0, "outcome", outcome)
    gates.insert(0, "experiment_id", exp)
    base = gates["feature"].str.replace(r"\[.*\]$", "", regex=True)
    gates.insert(4, "label", [by_feature[f].label if f in by_feature else None for f in base])
    gates.insert(5, "source", [by_feature[f].source if f in by_feature else None for f in base])
    gates["estimated_on"] = on

    Z, z_names = encode_modifiers(values, kinds, e.modifier_encoding) if mods else (np.zeros((len(sub), 0)), [])
    X = feature_matrix(sub, spec)
    scores = aipw_scores(t, y, nuisances["mu0"], nuisances["mu1"], nuisances["e"])
    if "nested" in nuisances:
        nested0, nested1 = _nested_scores(t, y, nuisances)
        nest_lists = [[r.tolist() if ok else None for r, ok in zip(arr, est)] for arr in (nested0, nested1)]
    else:
        nest_lists = [[None] * len(sub)] * 2
    sample = sub["sample"].to_numpy() if "sample" in sub.columns else np.full(len(sub), "both", dtype=object)
    nu_est = subset_nuisances(nuisances, est)
    effects, calib, curves, metrics, fitted, oof_est, phis, finals = [], [], [], {}, {}, {}, {}, []
    for name, learner in _learners(cfg, cfg.seed).items():
        if learners is not None and name not in learners:
            continue
        Zl = Z if name.endswith("_selected") else X
        learner.fit(X[est], t[est], y[est], folds[est], Z=Zl[est], cluster=cl_est, nuisances=nu_est)
        cate = learner.effect(Zl)
        lo, hi = learner.effect_interval(Zl)
        if name.endswith("_selected"):  # the fitted linear final stage, kept (table cate_final_stages)
            finals.append(LinearFinalStage.from_learner(exp, outcome, name, learner, z_names, e.modifier_encoding, on))
        oof = np.empty(len(sub))
        oof[est] = learner.oof_cate_
        for k in np.unique(folds[~est]):  # other units: the final stage fitted without their fold
            rows = ~est & (folds == k)
            oof[rows] = learner.effect_without(Zl[rows], int(k))
        effects.append(pd.DataFrame({
            "experiment_id": exp, "unit_id": sub["unit_id"].to_numpy(), "outcome": outcome, "learner": name,
            "cate": cate, "ci_low": lo, "ci_high": hi, "cate_oof": oof, "fold": folds,
            "mu0": nuisances["mu0"], "mu1": nuisances["mu1"], "propensity": nuisances["e"],
            "dr_score0": scores[:, 0], "dr_score1": scores[:, 1], "sample": sample,
            "dr_score0_nested": nest_lists[0], "dr_score1_nested": nest_lists[1]}))
        phi = learner.scores_[:, 1] - learner.scores_[:, 0]
        oof_est[name], phis[name] = learner.oof_cate_, phi
        cal = calibration_table(phi, learner.oof_cate_, cluster=cl_est, n_groups=e.n_quantile_groups,
                                n_bootstrap=e.n_bootstrap, alpha=e.alpha, seed=cfg.seed)
        table = cal["table"].assign(q=np.nan)
        c = cal["curves"]
        curve_rows = pd.concat([
            pd.DataFrame({"metric": "toc_curve", "group": "", "q": c.q, "estimate": c.toc, "se": c.toc_se}),
            pd.DataFrame({"metric": "qini_curve", "group": "", "q": c.q, "estimate": c.qini, "se": c.qini_se}),
        ], ignore_index=True)
        z = float(stats.norm.ppf(1 - e.alpha / 2))
        curve_rows = curve_rows.assign(ci_low=curve_rows.estimate - z * curve_rows.se,
                                       ci_high=curve_rows.estimate + z * curve_rows.se, p_value=np.nan,
                                       null_hypothesis="", n=int(est.sum()))
        both = pd.concat([table, curve_rows], ignore_index=True).assign(experiment_id=exp, outcome=outcome,
                                                                      learner=name, estimated_on=on)
        calib.append(both)
        curves.append(c.assign(learner=name, outcome=outcome))
        tb = cal["table"].set_index(["metric", "group"])
        for key, (metric, group) in {"blp_ate": ("blp", "ate"), "blp_differential": ("blp", "differential_prediction"),
                                     "autoc": ("rate", "autoc"), "qini": ("rate", "qini")}.items():
            metrics[f"{outcome}.{name}.{key}"] = float(tb.loc[(metric, group), "estimate"])
        if keep_learners:
            fitted[name] = learner
    metrics[f"{outcome}.n_estimation"] = float(est.sum())
    if "dr_selected" in oof_est and "dr_full" in oof_est:
        # heterogeneity coverage (effects/coverage.py): dr_selected against dr_full on the same held-out scores,
        # on the estimation units like every other number about the selected modifiers
        sub_est = sub[est]
        res, cov_rows, cov_metrics, line = outcome_coverage(
            phis["dr_selected"], oof_est["dr_selected"], oof_est["dr_full"], folds[est], cl_est,
            sub_est["indices"].tolist(), sub_est["values"].tolist(),
            [m.neuron for m in mods if m.source == "neuron"], labels, alpha=e.alpha, n_bootstrap=e.n_bootstrap,
            seed=cfg.seed, warn_below=e.coverage_warn_below, n_residual=e.coverage_residual_top,
            min_active=cfg.identify.min_active)
        calib.append(cov_rows.assign(q=np.nan, experiment_id=exp, outcome=outcome, learner="dr_selected",
                                     estimated_on=on))
        metrics.update({f"{outcome}.{k}": v for k, v in cov_metrics.items()})
        metrics[f"{outcome}.coverage_line"] = line
    out = (gates, pd.concat(effects, ignore_index=True), pd.concat(calib, ignore_index=True), curves, metrics,
           final_stage_frame(finals))
    if not keep_learners:
        return out
    return out + ({"learners": fitted, "mods": mods, "values": values, "kinds": kinds, "Z": Z, "X": X,
                   "estimation": est, "units": sub},)


def _nested_scores(t, y, nuisances):
    """AIPW scores Γ(0), Γ(1) per unit and left-out fold (n, K): column c from the nuisances fitted without the
    unit's fold and fold ``fold_ids[c]`` — the rewards fold c's held-out policy tree trains on."""
    nest = nuisances["nested"]
    t2, y2 = np.asarray(t, float)[:, None], np.asarray(y, float)[:, None]
    g1 = nest["mu1"] + t2 * (y2 - nest["mu1"]) / nest["e"]
    g0 = nest["mu0"] + (1 - t2) * (y2 - nest["mu0"]) / (1 - nest["e"])
    return g0, g1


def experiment_effects(cfg, exp: str, pdf: pd.DataFrame, mods_all: pd.DataFrame, nu_pdf: pd.DataFrame,
                       spec: FeatureSpec, covariates: Sequence[str], outcomes: Sequence[str],
                       keep_learners: bool = False, learners: Optional[Sequence[str]] = None,
                       labels=None) -> Dict[str, object]:
    """The effects stage's statistical body for one experiment, on pandas: ``gates``, ``effects``, ``calibration``
    and ``final_stages`` (the ``cate_final_stages`` rows) frames, the TOC/Qini ``curves``, the MLflow ``metrics`` and the heterogeneity-coverage line per outcome
    (``coverage``; absent for an outcome when ``learners`` lacks dr_selected or dr_full) (and, with
    ``keep_learners``, the fitted learners and modifier designs per outcome under ``fitted``). ``pdf``:
    :func:`load_experiment`'s (or :func:`experiment_frame`'s) frame; ``nu_pdf``: the cross-fit
    (:func:`cross_fit_spark` / :func:`cross_fit_local`); ``labels``: neuron labels for the coverage line."""
    gates_all, eff_all, cal_all, curves_all, metrics, fitted, coverage, finals = [], [], [], [], {}, {}, {}, []
    for outcome in outcomes:
        mods_pdf = mods_all[mods_all["outcome"] == outcome] if "outcome" in mods_all else mods_all
        res = analyse_outcome(cfg, exp, outcome, pdf, nu_pdf, mods_pdf, spec, covariates, keep_learners, learners,
                              labels)
        gates_all.append(res[0])
        eff_all.append(res[1])
        cal_all.append(res[2])
        curves_all += res[3]
        line = res[4].pop(f"{outcome}.coverage_line", None)
        if line is not None:
            coverage[outcome] = line
        metrics.update(res[4])
        finals.append(res[5])
        if keep_learners:
            fitted[outcome] = res[6]
    return {"gates": pd.concat(gates_all, ignore_index=True), "effects": pd.concat(eff_all, ignore_index=True),
            "calibration": pd.concat(cal_all, ignore_index=True), "final_stages": pd.concat(finals, ignore_index=True),
            "curves": curves_all, "metrics": metrics,
            "coverage": coverage, "fitted": fitted}


def nuisance_spec(cfg, pdf: pd.DataFrame, mods_all: pd.DataFrame, covariates: Sequence[str]) -> FeatureSpec:
    """The nuisance features of one experiment: covariates, the selected neurons and the most active ones."""
    selected_neurons = sorted({int(i) for i in resolve_neuron_ids(mods_all)})
    extra = top_neurons(pdf["indices"].tolist(), cfg.effects.nuisance_neurons)
    return build_feature_spec(pdf, covariates, selected_neurons + [i for i in extra if i not in selected_neurons])


def effects_in_memory(cfg, units: pd.DataFrame, neurons: pd.DataFrame, modifiers: pd.DataFrame,
                      keep_learners: bool = False, learners: Optional[Sequence[str]] = None
                      ) -> Dict[str, Dict[str, object]]:
    """The effects stage without Spark: per experiment, :func:`experiment_effects` on the in-memory join with
    nuisances from :func:`cross_fit_local` (the Spark job's per-task function, looped)."""
    outcomes = outcome_columns(cfg, units.columns)
    covariates = covariate_columns(cfg, units.columns)
    out = {}
    for exp in sorted(units["experiment_id"].unique()):
        pdf = experiment_frame(cfg, units, neurons, exp)
        mods_all = modifiers[modifiers["experiment_id"] == exp]
        spec = nuisance_spec(cfg, pdf, mods_all, covariates)
        cols = ["unit_id", "treatment", "fold", "sample"] + outcomes + covariates + ["indices", "values"]
        nu_pdf = cross_fit_local(pdf[cols], spec, outcomes, nuisance_params(cfg), cfg.seed)
        out[exp] = experiment_effects(cfg, exp, pdf, mods_all, nu_pdf, spec, covariates, outcomes, keep_learners,
                                      learners)
    return out


def _plot_curves(curves: List[pd.DataFrame], path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for c in curves:
        lbl = f"{c.outcome.iloc[0]}/{c.learner.iloc[0]}"
        axes[0].plot(c.q, c.toc, label=lbl)
        axes[0].fill_between(c.q, c.toc - 1.96 * c.toc_se, c.toc + 1.96 * c.toc_se, alpha=0.15)
        axes[1].plot(c.q, c.qini, label=lbl)
    axes[0].axhline(0, color="k", lw=0.5)
    axes[0].set(title="TOC (out-of-fold, estimation units; 95% pointwise band)", xlabel="share treated q", ylabel="TOC(q)")
    axes[1].set(title="Qini curve q·TOC(q)", xlabel="share treated q", ylabel="gain")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(spark, cfg) -> dict:
    """Run the effects stage directly (tests, notebooks): :func:`main` under a stage context."""
    from tokens2policy.context import run_job

    return run_job(spark, cfg, "effects", main)


def main(ctx) -> dict:
    """GATEs, CATE learners and calibration per experiment; each experiment's rows replaced in each table."""
    import tempfile
    from pathlib import Path

    from tokens2policy.progress import spark_progress

    spark, cfg = ctx.spark, ctx.config
    units = ctx.read("units")
    neurons = ctx.read("neurons")
    modifiers = ctx.read("modifiers")
    outcomes = list(ctx.units.outcomes)
    covariates = list(ctx.units.covariates)
    params = nuisance_params(cfg)
    summary: Dict[str, object] = {"experiments": [], "outcomes": outcomes}
    with ctx.clock.timed("total"):
        exps = sorted(r[0] for r in units.select("experiment_id").distinct().collect())
        mods_every = modifiers.toPandas()
        labels = neuron_label_map(spark, cfg)
        for exp in exps:
            clock = ctx.new_clock(str(exp))
            # the unit texts are not read here (effects use outcomes, covariates, folds and codes): not collected
            joined, pdf = load_experiment(spark, cfg, units.drop("text"), neurons, exp)
            clock.lap("load")
            mods_all = mods_every[mods_every["experiment_id"] == exp]
            spec = nuisance_spec(cfg, pdf, mods_all, covariates)
            clock.lap("features")
            folds = sorted(int(k) for k in pdf["fold"].unique())
            cols = ["unit_id", "treatment", "fold", "sample"] + outcomes + covariates + ["indices", "values"]
            clock.reset()
            n_fits = len(nuisance_tasks(folds))
            # the frame is on the driver already: its fits run there too (sequentially) unless it is big
            choice = choose(cfg.execution, "effects", len(pdf), len(cols) - 2, int(pdf["indices"].map(len).sum()))
            choice.record(ctx)
            if choice.mode == "memory":
                nu_pdf = cross_fit_local(pdf[cols], spec, outcomes, params, cfg.seed)
            else:
                with spark_progress(spark, f"effects {exp}: nuisance cross-fit",
                                    note=f"{len(folds)} folds, {n_fits} nested fits"):
                    nu_pdf = cross_fit_spark(spark, joined.select(*cols), spec, outcomes, params, cfg.seed, folds)
            wall = clock.lap("nuisances")
            n_tasks = int(nu_pdf["partition_id"].nunique()) if choice.mode == "spark" else 0
            ctx.log_metrics({f"{exp}.nuisance_wall_seconds": wall, f"{exp}.nuisance_tasks": n_tasks,
                             f"{exp}.nuisance_task_seconds_max":
                                 float(nu_pdf["fit_seconds"].max()) if choice.mode == "spark" else wall})
            res = experiment_effects(cfg, exp, pdf, mods_all, nu_pdf, spec, covariates, outcomes, labels=labels)
            for outcome, line in res["coverage"].items():
                summary.setdefault("coverage", {}).setdefault(exp, {})[outcome] = line
                print(f"[effects] {exp} {outcome}: {line}", flush=True)
            ctx.log_metrics({f"{exp}.{k}": v for k, v in res["metrics"].items()})
            clock.lap("analysis")
            gates, eff, cal, curves_all = res["gates"], res["effects"], res["calibration"], res["curves"]
            ctx.write_experiment_tables(
                [(name, ctx.frame(name, frame)) for name, frame in (
                    ("gates", gates), ("effects", eff), ("calibration", cal),
                    ("cate_final_stages", res["final_stages"]))], [exp])
            with tempfile.TemporaryDirectory() as tmp:
                gates.to_csv(Path(tmp) / f"gates_{exp}.csv", index=False)
                cal[cal.q.isna()].to_csv(Path(tmp) / f"calibration_{exp}.csv", index=False)
                _plot_curves(curves_all, Path(tmp) / f"toc_qini_{exp}.png")
                ctx.log_artifacts(tmp, artifact_path="effects")
            clock.lap("write")
            summary["experiments"].append({"experiment_id": exp, "n_units": int(len(pdf)), "folds": len(folds),
                                           "n_estimation": int(_estimation_rows(pdf).sum()),
                                           "estimated_on": estimated_on(cfg.honesty), "nuisance_tasks": n_tasks,
                                           "execution": choice.as_dict(),
                                           "gate_rows": int(len(gates)),
                                           "effects_rows": int(len(eff)), "seconds": clock.laps})
    return summary


def neuron_label_map(spark, cfg) -> Dict[str, str]:
    """``neuron_<i>`` -> label from ``neuron_labels`` (empty when represent has not written it)."""
    from tokens2policy.lakehouse import read_table, table_exists

    if not table_exists(spark, cfg, "neuron_labels"):
        return {}
    return {f"neuron_{int(r[0])}": str(r[1]) for r in
            read_table(spark, cfg, "neuron_labels").select("neuron", "label").collect() if r[1]}


def resolve_neuron_ids(mods_pdf: pd.DataFrame) -> List[int]:
    from .design import modifier_source, neuron_id

    if mods_pdf.empty:
        return []
    sources = mods_pdf["source"] if "source" in mods_pdf else [None] * len(mods_pdf)
    return [neuron_id(f) for f, k, s in zip(mods_pdf["feature"], mods_pdf["kind"], sources)
            if modifier_source(k, s) == "neuron"]
