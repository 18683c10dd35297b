"""Effects stage job: GATEs, cross-fitted CATE learners (nuisances one Spark task per fold), held-out calibration.

Reads ``units``, ``neurons``, ``modifiers``; writes ``gates``, ``effects``, ``calibration`` (one experiment's rows
replaced at a time). Nuisance cross-fitting is distributed: the unit rows (with their sparse activations) are
replicated once per fold, hash-partitioned on a per-fold key chosen so each fold lands in its own partition, and
``groupBy(key).applyInPandas`` runs :func:`fit_task` — K parallel tasks, each training on the other folds
and predicting its own. ``fit_task`` is also what :func:`cross_fit_local` loops over, so both paths give the same
numbers (same rows in the same unit_id order, seeds derived from ``(seed, fold)``).
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from tokens2policy.fold_tasks import fold_partition_keys, run_fold_tasks  # noqa: F401 (re-exported)

from .calibration import calibration_table
from .design import (
    FeatureSpec, build_feature_spec, feature_matrix, modifier_values, resolve_modifiers,
)
from .gates import encode_modifiers, gates_table, infer_split_kind
from .learners import DRLearner, NuisanceParams, RLearner, fit_fold_nuisances

def nuisance_params(cfg) -> NuisanceParams:
    e = cfg.effects
    prop = "model" if e.propensity_model else e.propensity
    return NuisanceParams(model=e.nuisance, propensity=prop, clip=e.propensity_clip)


def fit_task(pdf: pd.DataFrame, fold: int, spec: FeatureSpec, outcomes: Sequence[str], params: NuisanceParams,
             seed: int) -> pd.DataFrame:
    """One fold's nuisances for every outcome: train on rows with ``fold != fold``, predict rows with ``fold == fold``.
    Rows are put in unit_id order first so the result does not depend on how Spark delivered them."""
    pdf = pdf.sort_values("unit_id", kind="stable").reset_index(drop=True)
    X = feature_matrix(pdf, spec)
    t = pdf["treatment"].to_numpy()
    train = (pdf["fold"] != fold).to_numpy()
    pred = ~train
    out = []
    for outcome in outcomes:
        y = pdf[outcome].astype(float).to_numpy()
        ok = train & np.isfinite(y)
        res = fit_fold_nuisances((X[ok], t[ok], y[ok]), X[pred], fold, params, seed)
        out.append(pd.DataFrame({"unit_id": pdf["unit_id"].to_numpy()[pred], "outcome": outcome,
                                 "mu0": res["mu0"], "mu1": res["mu1"], "e": res["e"]}))
    return pd.concat(out, ignore_index=True)


def cross_fit_local(pdf: pd.DataFrame, spec: FeatureSpec, outcomes, params, seed) -> pd.DataFrame:
    """Sequential reference of :func:`cross_fit_spark` on one in-memory frame."""
    return pd.concat([fit_task(pdf, int(k), spec, outcomes, params, seed) for k in sorted(pdf["fold"].unique())],
                     ignore_index=True)


def cross_fit_spark(spark, joined, spec: FeatureSpec, outcomes, params, seed, folds: Sequence[int]) -> pd.DataFrame:
    """Nuisances with one Spark task per fold (:func:`tokens2policy.fold_tasks.run_fold_tasks`): every row reaches
    each fold's task, which trains on the other folds and predicts its own (:func:`fit_task`). The result carries
    ``partition_id`` and ``fit_seconds`` per row so the caller can check and log the task layout."""
    outcomes = list(outcomes)
    unit_type = joined.schema["unit_id"].dataType.simpleString()
    schema = f"unit_id {unit_type}, outcome string, mu0 double, mu1 double, e double"

    def task(pdf: pd.DataFrame, k: int) -> pd.DataFrame:
        return fit_task(pdf, k, spec, outcomes, params, seed)

    return run_fold_tasks(spark, joined, folds, task, schema).toPandas()


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
    """Driver frame (unit_id order) of one experiment's units joined with their activations, plus the Spark join."""
    from pyspark.sql import functions as F

    from tokens2policy.lakehouse import experiment_filter

    u = units.filter(experiment_filter(exp))
    nrn = neurons.filter(experiment_filter(exp)).select("unit_id", "indices", "values")
    joined = u.join(nrn, "unit_id", "left").withColumn(
        "indices", F.coalesce("indices", F.array().cast("array<int>"))).withColumn(
        "values", F.coalesce("values", F.array().cast("array<float>")))
    pdf = joined.toPandas().sort_values("unit_id", kind="stable").reset_index(drop=True)
    return joined, pdf


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


def analyse_outcome(cfg, exp, outcome, pdf, nu_pdf, mods_pdf, spec, covariates):
    """GATE, effects and calibration frames for one (experiment, outcome)."""
    e = cfg.effects
    y_all = pdf[outcome].astype(float).to_numpy()
    keep = np.isfinite(y_all)
    sub = pdf[keep].reset_index(drop=True)
    nu = nu_pdf[nu_pdf["outcome"] == outcome].set_index("unit_id").loc[sub["unit_id"]]
    nuisances = {"mu0": nu["mu0"].to_numpy(), "mu1": nu["mu1"].to_numpy(), "e": nu["e"].to_numpy()}
    y, t, folds = y_all[keep], sub["treatment"].astype(int).to_numpy(), sub["fold"].astype(int).to_numpy()
    cluster = cluster_ids(cfg, sub)
    mods, values, kinds = modifier_frame(sub, mods_pdf, covariates, cfg)

    gates = gates_table(y, t, values, kinds, cluster=cluster, alpha=e.alpha, joint=bool(mods),
                        joint_encoding=e.modifier_encoding)
    by_feature = {m.feature: m for m in mods}
    gates.insert(0, "outcome", outcome)
    gates.insert(0, "experiment_id", exp)
    base = gates["feature"].str.replace(r"\[.*\]$", "", regex=True)
    gates.insert(4, "label", [by_feature[f].label if f in by_feature else None for f in base])
    gates.insert(5, "source", [by_feature[f].source if f in by_feature else None for f in base])

    Z, _ = encode_modifiers(values, kinds, e.modifier_encoding) if mods else (np.zeros((len(sub), 0)), [])
    X = feature_matrix(sub, spec)
    effects, calib, curves, metrics = [], [], [], {}
    for name, learner in _learners(cfg, cfg.seed).items():
        Zl = Z if name.endswith("_selected") else X
        learner.fit(X, t, y, folds, Z=Zl, cluster=cluster, nuisances=nuisances)
        cate = learner.effect(Zl)
        lo, hi = learner.effect_interval(Zl)
        effects.append(pd.DataFrame({
            "experiment_id": exp, "unit_id": sub["unit_id"].to_numpy(), "outcome": outcome, "learner": name,
            "cate": cate, "ci_low": lo, "ci_high": hi, "cate_oof": learner.oof_cate_, "fold": folds,
            "mu0": nuisances["mu0"], "mu1": nuisances["mu1"], "propensity": nuisances["e"],
            "dr_score0": learner.scores_[:, 0], "dr_score1": learner.scores_[:, 1]}))
        phi = learner.scores_[:, 1] - learner.scores_[:, 0]
        cal = calibration_table(phi, learner.oof_cate_, cluster=cluster, n_groups=e.n_quantile_groups,
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
                                       null_hypothesis="", n=len(sub))
        both = pd.concat([table, curve_rows], ignore_index=True).assign(experiment_id=exp, outcome=outcome,
                                                                      learner=name)
        calib.append(both)
        curves.append(c.assign(learner=name, outcome=outcome))
        tb = cal["table"].set_index(["metric", "group"])
        for key, (metric, group) in {"blp_ate": ("blp", "ate"), "blp_differential": ("blp", "differential_prediction"),
                                     "autoc": ("rate", "autoc"), "qini": ("rate", "qini")}.items():
            metrics[f"{outcome}.{name}.{key}"] = float(tb.loc[(metric, group), "estimate"])
    return gates, pd.concat(effects, ignore_index=True), pd.concat(calib, ignore_index=True), curves, metrics


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
    axes[0].set(title="TOC (held-out, 95% pointwise band)", xlabel="share treated q", ylabel="TOC(q)")
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
        for exp in exps:
            clock = ctx.new_clock(str(exp))
            joined, pdf = load_experiment(spark, cfg, units, neurons, exp)
            clock.lap("load")
            mods_all = mods_every[mods_every["experiment_id"] == exp]
            selected_neurons = sorted({int(i) for i in resolve_neuron_ids(mods_all)})
            extra = top_neurons(pdf["indices"].tolist(), cfg.effects.nuisance_neurons)
            spec = build_feature_spec(pdf, covariates, selected_neurons + [i for i in extra if i not in selected_neurons])
            clock.lap("features")
            folds = sorted(int(k) for k in pdf["fold"].unique())
            cols = ["unit_id", "treatment", "fold"] + outcomes + covariates + ["indices", "values"]
            clock.reset()
            with spark_progress(spark, f"effects {exp}: nuisance cross-fit", note=f"{len(folds)} folds"):
                nu_pdf = cross_fit_spark(spark, joined.select(*cols), spec, outcomes, params, cfg.seed, folds)
            wall = clock.lap("nuisances")
            n_tasks = int(nu_pdf["partition_id"].nunique())
            ctx.log_metrics({f"{exp}.nuisance_wall_seconds": wall, f"{exp}.nuisance_tasks": n_tasks,
                                f"{exp}.nuisance_task_seconds_max": float(nu_pdf["fit_seconds"].max())})
            gates_all, eff_all, cal_all, curves_all = [], [], [], []
            for outcome in outcomes:
                mods_pdf = mods_all[mods_all["outcome"] == outcome] if "outcome" in mods_all else mods_all
                g, eff, cal, curves, metrics = analyse_outcome(cfg, exp, outcome, pdf, nu_pdf, mods_pdf, spec,
                                                               covariates)
                gates_all.append(g)
                eff_all.append(eff)
                cal_all.append(cal)
                curves_all += curves
                ctx.log_metrics({f"{exp}.{k}": v for k, v in metrics.items()})
            clock.lap("analysis")
            gates = pd.concat(gates_all, ignore_index=True)
            eff = pd.concat(eff_all, ignore_index=True)
            cal = pd.concat(cal_all, ignore_index=True)
            for name, frame in (("gates", gates), ("effects", eff), ("calibration", cal)):
                ctx.write_experiments(name, ctx.frame(name, frame), [exp])
            with tempfile.TemporaryDirectory() as tmp:
                gates.to_csv(Path(tmp) / f"gates_{exp}.csv", index=False)
                cal[cal.q.isna()].to_csv(Path(tmp) / f"calibration_{exp}.csv", index=False)
                _plot_curves(curves_all, Path(tmp) / f"toc_qini_{exp}.png")
                ctx.log_artifacts(tmp, artifact_path="effects")
            clock.lap("write")
            summary["experiments"].append({"experiment_id": exp, "n_units": int(len(pdf)), "folds": len(folds),
                                           "nuisance_tasks": n_tasks, "gate_rows": int(len(gates)),
                                           "effects_rows": int(len(eff)), "seconds": clock.laps})
    return summary


def resolve_neuron_ids(mods_pdf: pd.DataFrame) -> List[int]:
    from .design import modifier_source, neuron_id

    if mods_pdf.empty:
        return []
    sources = mods_pdf["source"] if "source" in mods_pdf else [None] * len(mods_pdf)
    return [neuron_id(f) for f, k, s in zip(mods_pdf["feature"], mods_pdf["kind"], sources)
            if modifier_source(k, s) == "neuron"]
