"""Policy stage job: threshold, budget and exact-tree rules on the effects stage's DR scores; cross-fitted values.

Reads ``effects`` (CATE, out-of-fold CATE and the cross-fitted AIPW scores of ``policy.learner``), ``units``,
``neurons`` and ``modifiers``; writes ``policy_rules``, ``policy_value`` and ``assignments``. With
``policy.register_model`` it also freezes the recommended rule into the serving chain (:mod:`.serving`) and
registers it (:mod:`.pyfunc`): the CATE is the effects stage's fitted final stage read from ``cate_final_stages``
(never refitted here), the representation the represent model that wrote the ``neurons`` version read.

**Selection-aware** (``honesty.mode=split``, :mod:`tokens2policy.honesty`): rules are learned and values estimated
on the estimation units only — the units that did not select the modifiers the rules are built on. The deployable
rules are applied to every unit (the ``assignments`` rows of the selection units say ``sample = selection``).

**Cross-fitted evaluation** (Athey & Wager 2021): the value of each rule is the AIPW mean over the estimation units
of assignments learned without the unit's fold — the tree is refit on the other folds' rewards, using the effects
stage's *nested* AIPW scores for fold k (nuisances fitted without fold k as well), the threshold rule reads the
out-of-fold CATE (final stage fitted without fold k, on nested pseudo-outcomes), and the budget rule is learned on
fold k's out-of-fold CATEs (the fold treated as a batch, ties at the cutoff by the units' tie draws). So no outcome
of fold k enters the policy that fold k's units are valued with; the AIPW scores that value it are cross-fitted.
Values are compared (paired) with treat-all, treat-none and random at the same budget; a learned rule's rows
estimate the rule-learning procedure's expected value, with Imai & Li's (2023) cross-fitting variance
(:func:`cross_fitted_values`, :func:`.value.cross_fitted_mean`). The rules reported and the
``treat`` column come from the same procedures fitted on all estimation units (what one would deploy);
``heldout_treat`` is the assignment the value used (null for selection units, which enter no value).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import pandas as pd

from tokens2policy.execution import in_memory_only
from tokens2policy.honesty import estimated_on, estimates

from ..effects.final_stage import LinearFinalStage, find_final_stage
from ..effects.gates import encode_modifiers
from ..effects.job import cluster_ids, covariate_columns, load_experiment, modifier_frame
from ..effects.ols import mean_with_se
from .rules import TieDrawCache, budget_assign, budget_cutoff, budget_fired, budget_rule_text, threshold_policy
from .tree import PolicyTree
from .value import compare_policies

def tree_design(values: Dict[str, np.ndarray], kinds: Dict[str, str], mods) -> tuple:
    """Tree features: raw activations for neurons (split at 0 = inactive/active), raw numeric covariates, one
    indicator per non-reference level for categorical ones; human-readable names with the neuron labels."""
    X, names = encode_modifiers(values, kinds, "value") if values else (np.zeros((0, 0)), [])
    by_name = {m.feature: m for m in mods}
    display, tree_kinds = [], []
    for nm in names:
        base, _, level = nm.partition("[")
        m = by_name.get(base)
        label = f" [{m.label}]" if m is not None and m.label and m.label != base else ""
        if level:
            display.append(f"{base} = {level.rstrip(']').replace('level=', '')}")
            tree_kinds.append("indicator")
        else:
            display.append(f"{base}{label}")
            tree_kinds.append(kinds.get(base, "continuous"))
    return X, display, tree_kinds


def estimation_mask(sub: pd.DataFrame) -> np.ndarray:
    """Rows the policy may learn and evaluate on (role estimation, or both under ``honesty.mode=none``).

    A frame without the ``sample`` column is refused: treating all its rows as estimation units would label
    numbers "estimated on the estimation units" that the selection units' outcomes fed."""
    if "sample" not in sub.columns:
        raise ValueError("no 'sample' column: the units' selection/estimation roles are unknown (effects table "
                         "written before selection-aware inference: rerun the effects stage)")
    return estimates(sub["sample"].to_numpy())


def _nested_rewards(sub: pd.DataFrame, rows: np.ndarray, fold_pos: int, cost: float) -> np.ndarray:
    """Rewards [Γ(0), Γ(1) − cost] of ``rows`` from the nested AIPW scores without fold position ``fold_pos``
    (the plain scores when the effects table has no nested scores)."""
    if "dr_score0_nested" not in sub.columns or sub.loc[rows, "dr_score0_nested"].isna().any():
        g = sub.loc[rows, ["dr_score0", "dr_score1"]].to_numpy(dtype=float)
    else:
        g = np.column_stack([np.array([v[fold_pos] for v in sub.loc[rows, c]], dtype=float)
                             for c in ("dr_score0_nested", "dr_score1_nested")])
    return g - np.array([0.0, cost])


def learn_policies(cfg, sub: pd.DataFrame, X: np.ndarray, names: List[str], kinds: List[str], ties=None):
    """Deployable assignments (every unit) and cross-fitted assignments (estimation units; -1 elsewhere) of the
    three rules, the fitted deployable tree, the deployable budget rule ``(cutoff, tie_share)`` and the
    cross-fitted rules per fold (``{"tree": {k: PolicyTree}, "budget": {k: (cutoff, tie_share)}}``; the
    threshold rule's per-fold CATE is the effects learner's final stage without fold k).

    Everything is learned on the estimation units (:func:`estimation_mask`). ``ties``: a
    :class:`~.rules.TieDrawCache` of ``sub``'s units (made here when None)."""
    p = cfg.policy
    est = estimation_mask(sub)
    folds = sub["fold"].astype(int).to_numpy()
    unit_ids = sub["unit_id"].to_numpy()
    rewards = sub[["dr_score0", "dr_score1"]].to_numpy() - np.array([0.0, p.cost])

    def make_tree(n_train):
        min_leaf = max(p.min_leaf_size, int(np.ceil(p.min_leaf_share * n_train)))
        return PolicyTree(depth=p.tree_depth, min_leaf_size=min_leaf, max_candidates=p.max_candidates)

    tree = make_tree(int(est.sum())).fit(X[est], rewards[est], feature_names=names, feature_kinds=kinds)
    cate, oof = sub["cate"].to_numpy(), sub["cate_oof"].to_numpy()
    cutoff, tie_share = budget_cutoff(cate[est], p.budget)
    held = {name: np.full(len(sub), -1, dtype=int) for name in ("tree", "threshold", "budget")}
    fold_rules: Dict[str, Dict[int, object]] = {"tree": {}, "budget": {}}
    fold_ids = np.unique(folds[est])
    ties = TieDrawCache(unit_ids, cfg.seed) if ties is None else ties
    for pos, k in enumerate(fold_ids):
        test = est & (folds == k)
        train = est & (folds != k)
        fold_tree = make_tree(int(train.sum())).fit(X[train], _nested_rewards(sub, train, pos, p.cost), names, kinds)
        held["tree"][test] = fold_tree.predict(X[test])
        held["threshold"][test] = threshold_policy(oof[test], p.cost)
        c_k, s_k = budget_cutoff(oof[test], p.budget)
        held["budget"][test] = budget_assign(oof[test], c_k, s_k, unit_ids[test], cfg.seed, draws=ties.on(test))
        fold_rules["tree"][int(k)], fold_rules["budget"][int(k)] = fold_tree, (c_k, s_k)
    return {
        "tree": (tree.predict(X), held["tree"]),
        "threshold": (threshold_policy(cate, p.cost), held["threshold"]),
        "budget": (budget_assign(cate, cutoff, tie_share, unit_ids, cfg.seed, draws=ties.on()), held["budget"]),
    }, tree, (cutoff, tie_share), fold_rules


def cross_fitted_values(cfg, sub: pd.DataFrame, assignments, cluster=None) -> pd.DataFrame:
    """The ``policy_value`` rows (without the key columns): the cross-fitted assignments of the learned rules
    (``assignments[name][1]``, from :func:`learn_policies`) valued with the AIPW scores on the estimation units,
    with the baselines, and the cross-fitting variance over the units' folds (:func:`.value.cross_fitted_mean`):
    the estimand of a learned rule's row is the learning procedure's expected value (Imai & Li 2023), not the
    deployable rule's. ``cluster``: ids of every row of ``sub`` (CR1S), or None."""
    p = cfg.policy
    est = estimation_mask(sub)
    scores = sub[["dr_score0", "dr_score1"]].to_numpy(dtype=float)[est]
    held = {name: a[1][est] for name, a in assignments.items()}
    return compare_policies(scores, held, cost=p.cost, cluster=None if cluster is None else cluster[est],
                            alpha=p.alpha, folds=sub["fold"].astype(int).to_numpy()[est])


def rule_rows(cfg, exp, outcome, sub, tree: PolicyTree, X, budget_fit, cluster, ties=None) -> pd.DataFrame:
    """``policy_rules`` rows: the tree's leaves (n and leaf effect on the estimation units) and the two CATE
    rules, with the number of estimation units each treats (``ties``: a :class:`~.rules.TieDrawCache` of
    ``sub``'s units, or None)."""
    p = cfg.policy
    est = estimation_mask(sub)
    phi = (sub["dr_score1"] - sub["dr_score0"]).to_numpy()
    leaf_of = tree.apply(X)
    rows = []
    for leaf in tree.leaves():
        inside = (leaf_of == leaf["leaf_id"]) & est
        est_, se = (np.nan, np.nan)
        if inside.sum() >= 2:
            est_, se, *_ = mean_with_se(phi[inside], cluster=None if cluster is None else cluster[inside])
        rows.append(dict(policy="tree", leaf_id=leaf["leaf_id"], rule=leaf["rule"], conditions=leaf["conditions"],
                         treat=leaf["action"], action_name=leaf["action_name"], n=leaf["n"], leaf_effect=est_,
                         leaf_effect_se=se))
    cutoff, tie_share = budget_fit
    rows.append(dict(policy="threshold", leaf_id=0, rule=f"IF cate > {p.cost:.4g} THEN treat ELSE control",
                     conditions=f"cate > {p.cost:.4g}", treat=1, action_name="treat",
                     n=int((sub["cate"][est] > p.cost).sum()), leaf_effect=np.nan, leaf_effect_se=np.nan))
    treated = budget_assign(sub["cate"].to_numpy()[est], cutoff, tie_share, sub["unit_id"].to_numpy()[est], cfg.seed,
                            draws=None if ties is None else ties.on(est))
    rows.append(dict(policy="budget", leaf_id=0, rule=budget_rule_text(cutoff, tie_share, p.budget),
                     conditions=f"cate > {cutoff:.4g}, ties at {cutoff:.4g} with probability {tie_share:.4g}",
                     treat=1, action_name="treat", n=int(treated.sum()), leaf_effect=np.nan, leaf_effect_se=np.nan))
    return pd.DataFrame(rows).assign(experiment_id=exp, outcome=outcome, learner=p.learner, cost=p.cost,
                                     estimated_on=estimated_on(cfg.honesty))


def assignment_frame(cfg, exp, outcome, sub, assignments, tree, X, budget_fit) -> pd.DataFrame:
    """``assignments`` rows: every unit, every rule; ``rule`` is the rule text that fired for the unit."""
    p = cfg.policy
    cutoff, tie_share = budget_fit
    leaf_rules = {leaf["leaf_id"]: leaf["rule"] for leaf in tree.leaves()}
    leaf_of = tree.apply(X)
    sample = sub["sample"].to_numpy() if "sample" in sub.columns else np.full(len(sub), "both", dtype=object)
    out = []
    for name, (deploy, heldout) in assignments.items():
        if name == "tree":
            fired = [leaf_rules[i] for i in leaf_of]
            leaf = leaf_of
        elif name == "threshold":
            fired = np.where(deploy == 1, f"cate > {p.cost:.4g}", f"cate <= {p.cost:.4g}")
            leaf = np.full(len(sub), -1)
        else:
            fired = budget_fired(sub["cate"].to_numpy(), deploy, cutoff, tie_share, p.budget)
            leaf = np.full(len(sub), -1)
        held = pd.array(np.where(heldout < 0, 0, heldout), dtype="Int64")
        held[heldout < 0] = pd.NA
        out.append(pd.DataFrame({
            "experiment_id": exp, "unit_id": sub["unit_id"].to_numpy(), "outcome": outcome, "policy": name,
            "recommended": name == p.recommended, "treat": deploy.astype(int), "heldout_treat": held,
            "cate": sub["cate"].to_numpy(), "rule": fired, "leaf_id": leaf.astype(int), "sample": sample}))
    return pd.concat(out, ignore_index=True)


def outcome_policies(cfg, exp: str, outcome: str, pdf: pd.DataFrame, eff: pd.DataFrame, mods_pdf: pd.DataFrame,
                     covariates) -> Dict[str, object]:
    """The policy stage's statistical body for one (experiment, outcome), on pandas.

    ``pdf``: the experiment's units joined with their activations (``effects.job.load_experiment`` /
    ``experiment_frame``); ``eff``: the ``effects`` rows of ``policy.learner`` for this outcome. Returns the
    ``rules``, ``value`` and ``assignments`` frames and the fitted pieces (``sub``, ``mods``, ``values``,
    ``kinds``, ``tree``, ``budget_fit``, ``X``, ``cluster``, held-out ``assignments``)."""
    p = cfg.policy
    if "sample" not in eff.columns:
        raise ValueError(f"{exp}/{outcome}: the effects table has no 'sample' column (written before selection-aware "
                         "inference): rerun the effects stage (`t2p run effects --force effects`)")
    drop = [c for c in ("fold", "sample") if c in pdf.columns and c in eff.columns]
    sub = pdf.drop(columns=drop).merge(eff.drop(columns=["experiment_id", "outcome"], errors="ignore"),
                                       on="unit_id")
    sub = sub.sort_values("unit_id", kind="stable").reset_index(drop=True)
    cluster = cluster_ids(cfg, sub)
    mods, values, kinds = modifier_frame(sub, mods_pdf, covariates, cfg)
    X, names, tkinds = tree_design(values, kinds, mods)
    if X.shape[1] == 0:
        X, names, tkinds = np.zeros((len(sub), 0)), [], []
    est = estimation_mask(sub)
    if est.sum() < 10:
        raise ValueError(f"{exp}/{outcome}: only {int(est.sum())} estimation units in the effects table")
    ties = TieDrawCache(sub["unit_id"].to_numpy(), cfg.seed)  # each unit's tie draw hashed once
    assignments, tree, budget_fit, fold_rules = learn_policies(cfg, sub, X, names, tkinds, ties)
    value = cross_fitted_values(cfg, sub, assignments, cluster)
    value = value.assign(experiment_id=exp, outcome=outcome, learner=p.learner, cost=p.cost,
                         estimated_on=estimated_on(cfg.honesty))
    return {"rules": rule_rows(cfg, exp, outcome, sub, tree, X, budget_fit, cluster, ties), "value": value,
            "assignments": assignment_frame(cfg, exp, outcome, sub, assignments, tree, X, budget_fit),
            "sub": sub, "mods": mods, "values": values, "kinds": kinds, "tree": tree, "budget_fit": budget_fit,
            "X": X, "cluster": cluster, "learned": assignments, "fold_rules": fold_rules}


def policy_in_memory(cfg, units: pd.DataFrame, neurons: pd.DataFrame, modifiers: pd.DataFrame,
                     effects: pd.DataFrame) -> Dict[str, Dict[str, Dict[str, object]]]:
    """The policy stage without Spark: :func:`outcome_policies` per experiment and outcome on the in-memory join
    (``effects.job.experiment_frame``) and the ``effects`` rows of ``policy.learner``."""
    from ..effects.job import experiment_frame

    covariates = covariate_columns(cfg, units.columns)
    eff_every = effects[effects["learner"] == cfg.policy.learner]
    out: Dict[str, Dict[str, Dict[str, object]]] = {}
    for exp in sorted(eff_every["experiment_id"].unique()):
        pdf = experiment_frame(cfg, units, neurons, exp)
        mods_all = modifiers[modifiers["experiment_id"] == exp]
        out[exp] = {}
        for outcome in sorted(eff_every.loc[eff_every.experiment_id == exp, "outcome"].unique()):
            eff = eff_every[(eff_every.experiment_id == exp) & (eff_every.outcome == outcome)]
            out[exp][outcome] = outcome_policies(cfg, exp, outcome, pdf, eff, mods_all[mods_all["outcome"] == outcome],
                                                 covariates)
    return out


def run(spark, cfg) -> dict:
    """Run the policy stage directly (tests, notebooks): :func:`main` under a stage context."""
    from tokens2policy.context import run_job

    return run_job(spark, cfg, "policy", main)


def main(ctx) -> dict:
    """Rules, held-out values and assignments per experiment; each experiment's rows replaced in each table."""
    import tempfile
    from pathlib import Path

    spark, cfg = ctx.spark, ctx.config
    p = cfg.policy
    units = ctx.read("units")
    neurons = ctx.read("neurons")
    modifiers = ctx.read("modifiers")
    effects = ctx.read("effects")
    covariates = list(ctx.units.covariates)
    summary: Dict[str, object] = {"experiments": []}
    with ctx.clock.timed("total"):
        from ..represent.job import represent_model_uri

        # the represent model version that wrote the neurons read here (pinned, never "latest")
        represent_uri = represent_model_uri(spark, cfg, ctx.version("neurons")) if p.register_model else None
        mods_every = modifiers.toPandas()
        eff_every = effects.filter(effects.learner == p.learner).toPandas()
        if eff_every.empty:
            raise ValueError(f"the effects table has no rows for learner '{p.learner}' (policy.learner); "
                             f"run the effects stage first or pick another learner")
        finals = served_final_stages(ctx, eff_every)
        for exp in sorted(eff_every["experiment_id"].unique()):
            clock = ctx.new_clock(str(exp))
            _, pdf = load_experiment(spark, cfg, units, neurons, exp)
            choice = in_memory_only("policy", len(pdf), len(pdf.columns) - 2, int(pdf["indices"].map(len).sum()),
                                    "exact trees and rules on the collected units and effects")
            choice.record(ctx)
            mods_all = mods_every[mods_every["experiment_id"] == exp]
            rules_all, values_all, assign_all, metrics, model_uris = [], [], [], {}, {}
            for outcome in sorted(eff_every.loc[eff_every.experiment_id == exp, "outcome"].unique()):
                eff = eff_every[(eff_every.experiment_id == exp) & (eff_every.outcome == outcome)]
                res = outcome_policies(cfg, exp, outcome, pdf, eff, mods_all[mods_all["outcome"] == outcome],
                                       covariates)
                value = res["value"]
                values_all.append(value)
                rules_all.append(res["rules"])
                assign_all.append(res["assignments"])
                if finals is not None:
                    uri = log_stage_policy_model(cfg, exp, outcome, res["sub"], res["mods"], res["values"],
                                                 res["kinds"], res["tree"], res["budget_fit"],
                                                 find_final_stage(finals, exp, outcome, p.learner),
                                                 representation_uri=represent_uri)
                    if uri:
                        model_uris[outcome] = uri
                v = value.set_index(["policy", "comparison"])
                for (pol, comp), row in v.iterrows():
                    key = f"{exp}.{outcome}.{pol}.{'value' if comp == 'value' else comp.replace('minus ', 'gain_vs_')}"
                    metrics[key] = float(row.estimate)
            clock.lap("policies")
            rules = pd.concat(rules_all, ignore_index=True)
            values = pd.concat(values_all, ignore_index=True)
            assigns = pd.concat(assign_all, ignore_index=True)
            ctx.write_experiment_tables(
                [(name, ctx.frame(name, frame)) for name, frame in (
                    ("policy_rules", rules), ("policy_value", values), ("assignments", assigns))], [exp])
            ctx.log_metrics(metrics)
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / f"rules_{exp}.txt").write_text("\n".join(rules["outcome"] + ": " + rules["rule"]) + "\n")
                values.to_csv(Path(tmp) / f"policy_value_{exp}.csv", index=False)
                ctx.log_artifacts(tmp, artifact_path="policy")
            clock.lap("write")
            summary["experiments"].append({"experiment_id": exp, "n_units": int(len(pdf)),
                                           "estimated_on": estimated_on(cfg.honesty),
                                           "tree_leaves": int((rules.policy == "tree").sum()), "seconds": clock.laps,
                                           "execution": choice.as_dict(),
                                           "policy_model_uris": model_uris})
    return summary


# --------------------------------------------------------------------------------------------------------------
# the served model: the recommended rule frozen into the serving chain (policy/serving.py), logged (policy/pyfunc.py)
# --------------------------------------------------------------------------------------------------------------
def served_final_stages(ctx, eff: pd.DataFrame):
    """The ``cate_final_stages`` rows of ``policy.learner`` (pinned version) when the stage serves a model
    (``policy.register_model`` and a ``*_selected`` learner: only a linear final stage can be served as
    ``[1, Z]β``), else None. Fails in one line when a served (experiment, outcome) has no stored final stage."""
    p = ctx.config.policy
    if not (p.register_model and p.learner.endswith("_selected")):
        return None
    if ctx.exists("cate_final_stages"):
        table = ctx.read("cate_final_stages")
        finals = table.filter(table.learner == p.learner).toPandas()
    else:
        finals = pd.DataFrame(columns=["experiment_id", "outcome", "learner"])
    for exp, outcome in eff[["experiment_id", "outcome"]].drop_duplicates().itertuples(index=False):
        find_final_stage(finals, exp, outcome, p.learner)  # before any rule is learned: one line naming it
    return finals


def stage_policy_spec(cfg, exp: str, outcome: str, sub: pd.DataFrame, mods, values, kinds, tree: PolicyTree,
                      budget_fit, final_stage: LinearFinalStage, embed_spec):
    """The serving chain's :class:`~tokens2policy.policy.serving.PolicySpec` of one (experiment, outcome): the
    modifier encodings frozen on the stage's units (``sub``, ``mods/values/kinds`` of ``outcome_policies``), the
    effects stage's stored ``final_stage`` (coefficients, covariance, critical value — its terms must be the
    design of these modifiers) and the rule ``policy.recommended`` (``budget_fit``: the budget rule's (cutoff, tie
    share) from :func:`learn_policies`)."""
    from .serving import PolicySpec, budget_rule, threshold_rule

    p = cfg.policy
    rule = {"tree": tree, "threshold": threshold_rule(p.cost),
            "budget": budget_rule(budget_fit[0], budget_fit[1], p.budget, cfg.seed)}[p.recommended]
    return PolicySpec.from_fitted(
        embed_spec, mods, values, kinds, rule, coef=final_stage.coef, cov=final_stage.cov,
        critical_value=final_stage.critical_value, terms=final_stage.terms, cate_encoding=final_stage.encoding,
        frame=sub, metadata={"experiment_id": exp, "outcome": outcome, "learner": final_stage.learner,
                             "policy": p.recommended, "n_units": int(len(sub)), "n_estimation": final_stage.n,
                             "estimated_on": final_stage.estimated_on, "se_type": final_stage.se_type,
                             "alpha": final_stage.alpha})


def log_stage_policy_model(cfg, exp: str, outcome: str, sub: pd.DataFrame, mods, values, kinds, tree: PolicyTree,
                           budget_fit, final_stage: LinearFinalStage, representation_dir: Optional[str] = None,
                           representation_uri: Optional[str] = None) -> Optional[str]:
    """Freeze one (experiment, outcome)'s deployable rule (:func:`stage_policy_spec`) and log and register it in
    the active run; returns the model URI, or None when no registered representation exists (with a warning).

    ``representation_dir``: the saved SAE; else ``representation_uri``: the represent model that wrote the
    ``neurons`` version the policy stage read (``represent.job.represent_model_uri``), never a floating "latest".
    The text model is the one ``embed`` resolves; the served model refuses files whose hash is not the one the
    spec records (:func:`~tokens2policy.policy.serving.load_scorer`). Registered as ``tracking.policy_model_name``
    for (exp, outcome), with the ``tracking.model_alias`` alias."""
    import os
    import warnings

    import mlflow

    from ..embed.models import resolve_model
    from ..tracking import model_name, package_requirement, tracking_uri
    from .pyfunc import log_policy_model

    if representation_dir is None:
        if representation_uri is None:  # neurons written without the represent stage's model record
            warnings.warn(f"policy model not logged for {exp}/{outcome}: the neurons table does not record the "
                          "represent model that wrote it (run the represent stage)")
            return None
        try:
            local = mlflow.artifacts.download_artifacts(representation_uri)
        except Exception as exc:
            warnings.warn(f"policy model not logged for {exp}/{outcome}: cannot load the representation "
                          f"{representation_uri} that wrote the neurons ({type(exc).__name__}: {exc})")
            return None
        representation_dir = os.path.join(local, "artifacts", "representation")
    embed_spec = resolve_model(cfg.embed, tracking_uri=tracking_uri(cfg), registry_uri=cfg.tracking.registry_uri)
    spec = stage_policy_spec(cfg, exp, outcome, sub, mods, values, kinds, tree, budget_fit, final_stage, embed_spec)
    name = "policy_" + "".join(ch if ch.isalnum() else "_" for ch in f"{exp}_{outcome}")
    requirement, artifacts = package_requirement(cfg)
    return log_policy_model(spec, representation_dir, embed_spec.source, name=name,
                            registered_model_name=model_name(cfg, "policy", exp, outcome)
                            if cfg.policy.register_model else None, package_requirement=requirement,
                            extra_artifacts=artifacts, alias=cfg.tracking.model_alias)
