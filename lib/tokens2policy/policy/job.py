"""Policy stage job: threshold, budget and exact-tree rules on the effects stage's DR scores; held-out AIPW values.

Reads ``effects`` (CATE, out-of-fold CATE and the cross-fitted AIPW scores of ``policy.learner``), ``units``,
``neurons`` and ``modifiers``; writes ``policy_rules``, ``policy_value`` and ``assignments``.

Honest evaluation (Athey & Wager 2021): every policy is *learned without the fold it is evaluated on* — the tree is
refit K times on the other folds' scores, the threshold and budget rules use the out-of-fold CATE — and its value
is the AIPW mean on those held-out assignments, compared (paired) with treat-all, treat-none and random at the
same budget. The rules reported and the ``treat`` column of ``assignments`` come from the same procedure fitted on
all units (what one would deploy); ``heldout_treat`` is the assignment the value estimate used.
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np
import pandas as pd

from ..effects.gates import encode_modifiers
from ..effects.job import cluster_ids, load_experiment, modifier_frame
from ..effects.ols import mean_with_se
from .rules import budget_policy, threshold_policy
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


def learn_policies(cfg, sub: pd.DataFrame, X: np.ndarray, names: List[str], kinds: List[str]):
    """Deployable and held-out assignments of the three rules, the fitted full-data tree and the budget cutoff."""
    p = cfg.policy
    folds = sub["fold"].astype(int).to_numpy()
    scores = sub[["dr_score0", "dr_score1"]].to_numpy()
    rewards = scores - np.array([0.0, p.cost])

    def make_tree(n_train):
        min_leaf = max(p.min_leaf_size, int(np.ceil(p.min_leaf_share * n_train)))
        return PolicyTree(depth=p.tree_depth, min_leaf_size=min_leaf, max_candidates=p.max_candidates)

    tree = make_tree(len(sub)).fit(X, rewards, feature_names=names, feature_kinds=kinds)
    heldout_tree = np.empty(len(sub), dtype=int)
    for k in np.unique(folds):
        test = folds == k
        heldout_tree[test] = make_tree(int((~test).sum())).fit(X[~test], rewards[~test], names, kinds).predict(X[test])
    cate, oof = sub["cate"].to_numpy(), sub["cate_oof"].to_numpy()
    deploy_budget = budget_policy(cate, p.budget)
    cutoff = float(cate[deploy_budget == 1].min()) if deploy_budget.any() else float("inf")
    return {
        "tree": (tree.predict(X), heldout_tree),
        "threshold": (threshold_policy(cate, p.cost), threshold_policy(oof, p.cost)),
        "budget": (deploy_budget, budget_policy(oof, p.budget)),
    }, tree, cutoff


def rule_rows(cfg, exp, outcome, sub, tree: PolicyTree, X, cutoff, cluster) -> pd.DataFrame:
    p = cfg.policy
    phi = (sub["dr_score1"] - sub["dr_score0"]).to_numpy()
    leaf_of = tree.apply(X)
    rows = []
    for leaf in tree.leaves():
        inside = leaf_of == leaf["leaf_id"]
        est, se = (np.nan, np.nan)
        if inside.sum() >= 2:
            est, se, *_ = mean_with_se(phi[inside], cluster=None if cluster is None else cluster[inside])
        rows.append(dict(policy="tree", leaf_id=leaf["leaf_id"], rule=leaf["rule"], conditions=leaf["conditions"],
                         treat=leaf["action"], action_name=leaf["action_name"], n=leaf["n"], leaf_effect=est,
                         leaf_effect_se=se))
    n = len(sub)
    rows.append(dict(policy="threshold", leaf_id=0, rule=f"IF cate > {p.cost:.4g} THEN treat ELSE control",
                     conditions=f"cate > {p.cost:.4g}", treat=1, action_name="treat",
                     n=int((sub["cate"] > p.cost).sum()), leaf_effect=np.nan, leaf_effect_se=np.nan))
    rows.append(dict(policy="budget", leaf_id=0,
                     rule=f"IF cate >= {cutoff:.4g} (top {p.budget:.0%} of {n}) THEN treat ELSE control",
                     conditions=f"cate >= {cutoff:.4g}", treat=1, action_name="treat",
                     n=int(np.ceil(p.budget * n - 1e-12)), leaf_effect=np.nan, leaf_effect_se=np.nan))
    return pd.DataFrame(rows).assign(experiment_id=exp, outcome=outcome, learner=p.learner, cost=p.cost)


def assignment_frame(cfg, exp, outcome, sub, assignments, tree, X, cutoff) -> pd.DataFrame:
    p = cfg.policy
    leaf_rules = {leaf["leaf_id"]: leaf["rule"] for leaf in tree.leaves()}
    leaf_of = tree.apply(X)
    out = []
    for name, (deploy, heldout) in assignments.items():
        if name == "tree":
            fired = [leaf_rules[i] for i in leaf_of]
            leaf = leaf_of
        elif name == "threshold":
            fired = np.where(deploy == 1, f"cate > {p.cost:.4g}", f"cate <= {p.cost:.4g}")
            leaf = np.full(len(sub), -1)
        else:
            fired = np.where(deploy == 1, f"cate >= {cutoff:.4g} (top {p.budget:.0%})", f"cate below top {p.budget:.0%}")
            leaf = np.full(len(sub), -1)
        out.append(pd.DataFrame({
            "experiment_id": exp, "unit_id": sub["unit_id"].to_numpy(), "outcome": outcome, "policy": name,
            "recommended": name == p.recommended, "treat": deploy.astype(int), "heldout_treat": heldout.astype(int),
            "cate": sub["cate"].to_numpy(), "rule": fired, "leaf_id": leaf.astype(int)}))
    return pd.concat(out, ignore_index=True)


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
        mods_every = modifiers.toPandas()
        eff_every = effects.filter(effects.learner == p.learner).toPandas()
        if eff_every.empty:
            raise ValueError(f"the effects table has no rows for learner '{p.learner}' (policy.learner); "
                             f"run the effects stage first or pick another learner")
        for exp in sorted(eff_every["experiment_id"].unique()):
            clock = ctx.new_clock(str(exp))
            _, pdf = load_experiment(spark, cfg, units, neurons, exp)
            mods_all = mods_every[mods_every["experiment_id"] == exp]
            rules_all, values_all, assign_all, metrics, model_uris = [], [], [], {}, {}
            for outcome in sorted(eff_every.loc[eff_every.experiment_id == exp, "outcome"].unique()):
                eff = eff_every[(eff_every.experiment_id == exp) & (eff_every.outcome == outcome)]
                sub = pdf.drop(columns=["fold"]).merge(eff.drop(columns=["experiment_id", "outcome"]), on="unit_id")
                sub = sub.sort_values("unit_id", kind="stable").reset_index(drop=True)
                cluster = cluster_ids(cfg, sub)
                mods_pdf = mods_all[mods_all["outcome"] == outcome]
                mods, values, kinds = modifier_frame(sub, mods_pdf, covariates, cfg)
                X, names, tkinds = tree_design(values, kinds, mods)
                if X.shape[1] == 0:
                    X, names, tkinds = np.zeros((len(sub), 0)), [], []
                assignments, tree, cutoff = learn_policies(cfg, sub, X, names, tkinds)
                scores = sub[["dr_score0", "dr_score1"]].to_numpy()
                held = {name: a[1] for name, a in assignments.items()}
                value = compare_policies(scores, held, cost=p.cost, cluster=cluster, alpha=p.alpha)
                value = value.assign(experiment_id=exp, outcome=outcome, learner=p.learner, cost=p.cost)
                values_all.append(value)
                rules_all.append(rule_rows(cfg, exp, outcome, sub, tree, X, cutoff, cluster))
                assign_all.append(assignment_frame(cfg, exp, outcome, sub, assignments, tree, X, cutoff))
                if p.register_model:
                    from .pyfunc import log_stage_policy_model

                    uri = log_stage_policy_model(cfg, exp, outcome, sub, mods, values, kinds, tree, cutoff, cluster)
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
            for name, frame in (("policy_rules", rules), ("policy_value", values), ("assignments", assigns)):
                ctx.write_experiments(name, ctx.frame(name, frame), [exp])
            ctx.log_metrics(metrics)
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / f"rules_{exp}.txt").write_text("\n".join(rules["outcome"] + ": " + rules["rule"]) + "\n")
                values.to_csv(Path(tmp) / f"policy_value_{exp}.csv", index=False)
                ctx.log_artifacts(tmp, artifact_path="policy")
            clock.lap("write")
            summary["experiments"].append({"experiment_id": exp, "n_units": int(len(pdf)),
                                           "tree_leaves": int((rules.policy == "tree").sum()), "seconds": clock.laps,
                                           "policy_model_uris": model_uris})
    return summary
