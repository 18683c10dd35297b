"""Small synthetic versions of every table the report reads, written to a tmp lakehouse as real Delta tables."""
from __future__ import annotations


import numpy as np
import pandas as pd
import pytest

EXP = "exp_a"
OTHER = "exp_b"


def make_units(n=400, seed=3, experiment_id=EXP):
    rng = np.random.default_rng(seed)
    t = (np.arange(n) % 2).astype(int)
    age = rng.normal(40, 10, n)
    score = rng.normal(0, 1, n) + 0.3 * t  # a deliberate imbalance: SMD ≈ 0.3
    y = 1.0 + 0.5 * t + rng.normal(0, 1, n)
    return pd.DataFrame({
        "experiment_id": experiment_id, "unit_id": [f"u{i}" for i in range(n)], "treatment": t,
        "engagement": y, "text": ["some text"] * n, "tenure_days": age, "prior_sessions": score,
        "community": rng.integers(0, 20, n), "fold": np.arange(n) % 5,
    })


def calibration_table(q, learners=("dr",)):
    """As the effects stage writes it: scalar rows (q null) and curve rows (metric toc_curve/qini_curve per q);
    learner k's TOC is (0.8 - 0.1k)(1 - q)."""
    frames = []
    for k, learner in enumerate(learners):
        toc = (0.8 - 0.1 * k) * (1 - q)
        scalar = pd.DataFrame({"metric": ["blp", "blp", "rate", "rate"],
                               "group": ["ate", "differential_prediction", "autoc", "qini"],
                               "q": np.nan, "estimate": [1.01, 0.93, 0.42, 0.21], "se": [0.05, 0.1, 0.08, 0.04]})
        curve = pd.concat([pd.DataFrame({"metric": "toc_curve", "group": "", "q": q, "estimate": toc, "se": 0.05}),
                           pd.DataFrame({"metric": "qini_curve", "group": "", "q": q, "estimate": q * toc,
                                         "se": q * 0.05})])
        both = pd.concat([scalar, curve], ignore_index=True)
        frames.append(both.assign(experiment_id=EXP, outcome="engagement", learner=learner,
                                  ci_low=both.estimate - 1.96 * both.se, ci_high=both.estimate + 1.96 * both.se,
                                  p_value=0.01, null_hypothesis="", n=400))
    return pd.concat(frames, ignore_index=True)


def synthetic_tables():
    units = pd.concat([make_units(), make_units(n=100, seed=9, experiment_id=OTHER)], ignore_index=True)
    modifiers = pd.DataFrame({
        "experiment_id": EXP, "outcome": "engagement", "feature": ["12", "7"], "kind": "Z",
        "label": ["sport coverage", ""], "p_value": [1.5e-9, 2.0e-4], "t": [6.1, -3.9],
        "direction": ["+", "-"], "round_added": [1, 2],
    })
    trace = pd.DataFrame({  # as identify writes it: the decision's other fields in a JSON `detail` column
        "experiment_id": EXP, "outcome": "engagement", "seq": range(5),
        "phase": ["forward", "forward", "forward", "forward", "backward"], "round": [1, 1, 1, 1, 2],
        "step": ["forward", "forward", "forward", "forward", "backward"],
        "action": ["skip", "add", "add", "stop_gate1", "keep"], "feature": ["3", "12", "7", "40", "7"],
        "t": [np.nan, 6.1, -3.9, 2.1, -3.8], "p_value": [np.nan, 1.5e-9, 2.0e-4, 0.03, 2.2e-4],
        "threshold": [np.nan, 0.001, 0.001, 0.001, 0.05],
        "detail": ['{"reason": "rare"}', '{"n_candidates": 11, "runner_up": 40}', '{}',
                   '{"best_feature": 40, "gate": "gate1"}', '{"added_in": ["joint", 1]}'],
    })
    marginal = pd.DataFrame({
        "experiment_id": EXP, "outcome": "engagement", "feature": [str(i) for i in range(10)] + ["12"],
        "t": np.linspace(0, 5, 11),
        "p_value": [0.9, 0.5, 0.04, 0.01, 0.2, 0.3, 1e-6, 1e-5, 0.6, 0.7, 1e-10],
        "p_bonferroni": [1, 1, 0.44, 0.11, 1, 1, 1.1e-5, 1.1e-4, 1, 1, 1.1e-9],
        "q_bh": [0.9, 0.7, 0.09, 0.03, 0.3, 0.4, 5e-6, 3e-5, 0.7, 0.8, 1e-9],
    })
    # raw p<=.05: {2,3,6,7,12} (5; 4 proxies as 7 is selected); Bonferroni: {6,7,12} (3; 1 proxy: 6);
    # BH: {3,6,7,12} (4; 2 proxies)
    def docs(*snippets):
        return [{"unit_id": f"d{i}", "activation": float(10 - i), "snippet": t} for i, t in enumerate(snippets)]

    labels = pd.DataFrame({  # as represent writes it: top_docs is array<struct<unit_id, activation, snippet>>
        "neuron": [12, 7, 3], "label": ["sport (neuron)", "politics and elections", "weather"],
        "top_terms": [["match", "goal", "league"], ["vote", "minister"], ["rain"]],
        # several top units read the same article: the page lists each text once, with its count
        "top_docs": [docs("Arsenal won the <script>alert(1)</script> match", "[NAME] scored twice",
                          "[NAME]  scored twice", "League table update", "a fourth example not shown"),
                     docs("The minister said [REDACTED]"), docs("rain")],
    })
    gates = pd.DataFrame({
        "experiment_id": EXP, "outcome": "engagement",
        "feature": ["12", "12", "12", "7", "7", "7"], "split": "sparse",
        "group": ["active", "inactive", "active - inactive"] * 2,
        "n": [120, 280, 400, 90, 310, 400], "n_treated": [60, 140, 200, 45, 155, 200],
        "estimate": [1.75, 0.2, 1.55, -0.8, 0.7, -1.5], "se": [0.2, 0.1, 0.22, 0.25, 0.1, 0.27],
        "ci_low": [1.358, 0.004, 1.119, -1.29, 0.504, -2.029], "ci_high": [2.142, 0.396, 1.981, -0.31, 0.896, -0.971],
        "p_value": [1e-15, 0.04, 1e-12, 0.001, 1e-11, 3e-8], "se_type": "hc1",
    })
    q = np.linspace(0.1, 1.0, 10)
    calibration = calibration_table(q, learners=("dr", "t_learner"))
    rules = pd.DataFrame({
        "experiment_id": EXP, "outcome": "engagement", "leaf_id": [0, 1],
        "rule": ["IF neuron 7 active THEN control", "IF neuron 7 inactive THEN treat"],
        "action_name": ["control", "treat"], "n": [90, 310],
    })
    value = pd.DataFrame({
        "experiment_id": EXP, "outcome": "engagement",
        "policy": ["learned", "treat_all", "treat_none", "random_same_budget", "learned", "learned"],
        "comparison": ["value", "value", "value", "value", "minus treat_all", "minus random_same_budget"],
        "treated_share": [0.775, 1.0, 0.0, 0.775, 0.775, 0.775],
        "estimate": [1.6123, 1.4877, 1.0, 1.3779, 0.1246, 0.2344], "se": [0.05, 0.05, 0.05, 0.05, 0.03, 0.04],
        "ci_low": [1.514, 1.39, 0.902, 1.28, 0.066, 0.156], "ci_high": [1.71, 1.586, 1.098, 1.476, 0.183, 0.313],
        "p_value": [0.0, 0.0, 0.0, 0.0, 3e-5, 5e-9], "n": 400,
    })
    assignments = pd.DataFrame({"experiment_id": EXP, "outcome": "engagement",
                                "unit_id": [f"u{i}" for i in range(400)],
                                "action_name": ["treat"] * 310 + ["control"] * 90})
    quarantine = pd.DataFrame({"experiment_id": EXP, "unit_id": ["x1", "x2", "x3"],
                               "reason": ["missing_outcome", "missing_outcome", "duplicate_key"],
                               "message": ["outcome is null", "outcome is null", "duplicate"]})
    truth, neurons, drivers = demo_truth_tables(units[units.experiment_id == EXP])
    return {"units": units, "modifiers": modifiers, "selection_trace": trace, "marginal_screen": marginal,
            "neuron_labels": labels, "gates": gates, "calibration": calibration,
            "policy_rules": rules, "policy_value": value, "assignments": assignments, "quarantine": quarantine,
            "demo_truth": truth, "neurons": neurons, "demo_drivers": drivers}


TOPICS = ("business", "entertainment", "politics", "sport", "tech")


def demo_truth_tables(units):
    """A known truth in the demo's format: topic i % 5; true modifiers sport (+1.5) and politics (-1.0).
    Neuron 12 fires on 9 in 10 sport units and on 1 in 4 business units, neuron 7 on every politics unit and on
    1 in 3 tech units, neuron 3 on every 7th unit; neuron 12 also has stored zeros (not active) on tech units."""
    ids = units.unit_id.tolist()
    topic = [TOPICS[i % 5] for i in range(len(ids))]
    indices, values = [], []
    for i, t in enumerate(topic):
        idx, val = [], []
        if i % 7 == 0:
            idx, val = idx + [3], val + [0.4]
        if (t == "politics") or (t == "tech" and i % 3 == 0):
            idx, val = idx + [7], val + [1.2]
        if (t == "sport" and i % 10 != 8) or (t == "business" and i % 4 == 0):
            idx, val = idx + [12], val + [0.9]
        elif t == "tech":
            idx, val = idx + [12], val + [0.0]
        indices.append(idx)
        values.append(val)
    truth = pd.DataFrame({"experiment_id": EXP, "unit_id": ids, "article_id": "a0", "topic": topic,
                          "treatment": units.treatment.to_numpy(), "true_cate": 0.5, "mu0": 1.0})
    neurons = pd.DataFrame({"experiment_id": EXP, "unit_id": ids, "indices": indices, "values": values,
                            "pooled_tokens": 0})
    drivers = pd.DataFrame({"experiment_id": EXP, "role": ["base_effect", "effect_modifier", "effect_modifier"],
                            "term": ["treatment", "topic=sport", "topic=politics"],
                            "coefficient": [0.5, 1.5, -1.0], "config_hash": "x"})
    return truth, neurons, drivers


def write_tables(spark, cfg, tables):
    from tokens2policy.lakehouse import write_table

    from concurrent.futures import ThreadPoolExecutor

    # independent tables: overlap the Delta commits (Spark runs jobs from several threads concurrently)
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda kv: write_table(spark.createDataFrame(kv[1]), cfg, kv[0], mode="overwrite"),
                      tables.items()))


@pytest.fixture(scope="package", autouse=True)
def small_delta_snapshots(spark):
    """Delta rebuilds a table's snapshot with 50 partitions by default, which dominates the time of these tiny
    tables on 2 cores; 2 partitions is plenty here (restored afterwards: the session is shared)."""
    key = "spark.databricks.delta.snapshotPartitions"
    before = spark.conf.get(key, None)
    spark.conf.set(key, "2")
    yield
    if before is None:
        spark.conf.unset(key)
    else:
        spark.conf.set(key, before)


@pytest.fixture(scope="package")
def full_lakehouse(spark, tmp_path_factory):
    """All report tables for two experiments, written once for tests/report."""
    from tokens2policy.config import load_config

    cfg = load_config(None, [f"data_dir={tmp_path_factory.mktemp('report') / 'data'}", "report.n_examples=3"])
    tables = synthetic_tables()
    write_tables(spark, cfg, tables)
    return cfg, tables


@pytest.fixture(scope="package")
def full_report(spark, full_lakehouse):
    """The report stage run once on the full synthetic lakehouse."""
    from tokens2policy.report.job import run

    cfg, tables = full_lakehouse
    return cfg, tables, run(spark, cfg)
