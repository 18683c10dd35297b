"""The reduced study reproduces the paper's qualitative shape and NEXIS controls the FWER under the null."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sstats

from tokens2policy.config import ConfigError, load_config
from tokens2policy.validate.study import (
    build_tasks, mean_interval, resolve_methods, run_in_memory, selection_metrics, summarize_coverage,
    summarize_selection, wilson_interval,
)


def _cfg(*overrides):
    return load_config(None, ["data_dir=/tmp/unused", *[f"validate.{o}" for o in overrides]])


def test_selection_metrics_by_hand():
    assert selection_metrics([3, 7], [3, 7]) == dict(n_selected=2, n_true_selected=2, iou=1.0, precision=1.0,
                                                     recall=1.0, any_selected=1.0, any_false=0.0,
                                                     iou_aligned=1.0, precision_aligned=1.0, recall_aligned=1.0)
    m = selection_metrics([3, 4, 5], [3, 7])
    assert (m["iou"], m["precision"], m["recall"]) == (1 / 4, 1 / 3, 1 / 2)
    # without groups the aligned metrics are the plain ones (each true feature its own group)
    assert (m["iou_aligned"], m["precision_aligned"], m["recall_aligned"]) == (1 / 4, 1 / 3, 1 / 2)
    empty = selection_metrics([], [3, 7])
    assert empty["iou"] == 0.0 and np.isnan(empty["precision"]) and empty["recall"] == 0.0
    assert empty["iou_aligned"] == 0.0 and np.isnan(empty["precision_aligned"])
    null = selection_metrics([1], [])
    assert np.isnan(null["iou"]) and null["any_selected"] == 1.0 and null["any_false"] == 1.0
    # any_false: a selection outside the truth (stand-ins of a true feature are not errors)
    assert selection_metrics([3, 5], [3, 7])["any_false"] == 1.0
    assert np.isnan(null["iou_aligned"]) and null["precision_aligned"] == 0.0
    # groups of interchangeable features: truth 3 ~ {3, 4}, truth 7 ~ {7, 9}. S = {4, 5, 9, 12}: both groups hit
    # (by stand-ins), two false positives; 3 and 7 themselves were not selected
    g = selection_metrics([4, 5, 9, 12], [3, 7], aligned=[[3, 4], [7, 9]])
    assert (g["iou"], g["recall"]) == (0.0, 0.0)
    assert (g["iou_aligned"], g["precision_aligned"], g["recall_aligned"]) == (2 / 4, 2 / 4, 1.0)
    # two members of one group count once, and are not errors
    g = selection_metrics([3, 4], [3, 7], aligned=[[3, 4], [7, 9]])
    assert (g["iou_aligned"], g["precision_aligned"], g["recall_aligned"]) == (1 / 2, 1.0, 1 / 2)


def test_intervals_match_textbook_values():
    lo, hi = wilson_interval(5, 20)  # Brown, Cai & DasGupta (2001): 5/20 -> (0.112, 0.469)
    assert (round(lo, 3), round(hi, 3)) == (0.112, 0.469)
    assert wilson_interval(0, 50)[0] == 0.0 and wilson_interval(50, 50)[1] == 1.0
    v = np.array([1.0, 2.0, 4.0, np.nan])
    m, lo, hi, k = mean_interval(v)
    half = sstats.norm.ppf(0.975) * np.std([1, 2, 4], ddof=1) / np.sqrt(3)
    assert k == 3 and m == pytest.approx(7 / 3) and (hi - lo) == pytest.approx(2 * half)


def test_summaries_by_hand():
    rows = pd.DataFrame({
        "design": "null", "outcome": "gaussian", "n": 100, "m": 5, "effect": 0.0, "kind": "selection",
        "method": ["a"] * 4 + ["b"] * 4, "family": "nexis", "iou": np.nan, "precision": np.nan, "recall": np.nan,
        "n_selected": [0, 1, 0, 0, 2, 3, 0, 1], "any_selected": [0, 1, 0, 0, 1, 1, 0, 1.0],
    })
    s = summarize_selection(rows).set_index("method")
    assert s.loc["a", "any_selected"] == 0.25 and s.loc["b", "any_selected"] == 0.75
    assert (s.loc["a", "any_selected_lo"], s.loc["a", "any_selected_hi"]) == wilson_interval(1, 4)
    cov = pd.DataFrame({"design": "linear", "outcome": "gaussian", "n": 100, "m": 5, "effect": 0.5,
                        "kind": "coverage", "estimand": "x", "covered": [1.0, 0.0, 1.0, 1.0],
                        "estimate": [1.0, 2.0, 3.0, 4.0], "true_value": 2.0, "ci_low": 0.0, "ci_high": 1.0})
    c = summarize_coverage(cov).iloc[0]
    assert c["coverage"] == 0.75 and c["mean_bias"] == 0.5 and c["mean_width"] == 1.0


def test_config_and_methods_are_validated():
    with pytest.raises(ConfigError, match="cells"):
        _cfg("cells=[cubic:gaussian]")
    with pytest.raises(ValueError, match="unknown validation method"):
        resolve_methods(["nexis_magic"])
    tasks = build_tasks(_cfg("n_values=[100,200]", "effects=[0.3]", "repetitions=3", "null_repetitions=4",
                             "calibration=[]").validate_)
    assert len(tasks) == 2 * 3 + 4 and [t["task_id"] for t in tasks] == list(range(10))
    assert sum(t["coverage"] for t in tasks) == 4  # the sweep has no n = coverage_n, the null has coverage


def test_reduced_study_has_the_paper_shape():
    """NEXIS recovers the aligned coordinates at the largest n; marginal screening keeps flagging proxies."""
    methods = "methods=[nexis_linear,nexis_hc2,marginal_raw,marginal_bonferroni,marginal_bh]"
    cfg = _cfg("cells=[linear:gaussian]", "n_values=[300,2000]", "effects=[0.5]", "repetitions=8",
               "null_outcomes=[]", "coverage=false", "calibration=[]", methods)
    df = run_in_memory(build_tasks(cfg.validate_, 1))
    s = summarize_selection(df).set_index(["n", "method"])
    for meth in ("nexis_linear", "nexis_hc2"):
        assert s.loc[(2000, meth), "iou"] >= 0.9
        assert s.loc[(2000, meth), "iou"] >= s.loc[(300, meth), "iou"]
    for meth in ("marginal_raw", "marginal_bonferroni", "marginal_bh"):
        assert s.loc[(2000, meth), "iou"] <= 0.5
        assert s.loc[(2000, meth), "iou_hi"] < s.loc[(2000, "nexis_hc2"), "iou_lo"]
        assert s.loc[(2000, meth), "recall"] == 1.0  # it finds the truth, and many proxies with it
        assert s.loc[(2000, meth), "n_selected"] > 10
    truth = df["truth"].map(json.loads)
    assert (truth.map(len) == 2).all()


def test_null_fwer_is_controlled_within_monte_carlo_tolerance():
    """FWER of NEXIS (and of Bonferroni/BH screening) at alpha = 0.05 over R null repetitions must not exceed alpha
    by more than its Monte-Carlo tolerance (one-sided binomial bound at the 0.1 % level: a method whose true FWER
    is 0.10 fails it with probability ~0.9), and must not be trivially zero. Raw screening must fail the same bound,
    so the check has power."""
    R, alpha = 500, 0.05
    cfg = _cfg("cells=[linear:gaussian]", "n_values=[300]", "repetitions=1", f"null_repetitions={R}",
               "null_n=400", "m=30", "coverage=false", "calibration=[]",
               "methods=[nexis_linear,nexis_hc2,marginal_raw,marginal_bonferroni,marginal_bh]")
    tasks = [t for t in build_tasks(cfg.validate_, 0) if t["design"]["kind"] == "null"]
    assert len(tasks) == R
    s = summarize_selection(run_in_memory(tasks)).set_index("method")
    upper = alpha + sstats.norm.ppf(0.999) * np.sqrt(alpha * (1 - alpha) / R)
    for meth in ("nexis_linear", "nexis_hc2", "marginal_bonferroni", "marginal_bh"):
        fwer = s.loc[meth, "any_selected"]
        assert alpha / 5 <= fwer <= upper, (meth, fwer, upper)
    assert s.loc["marginal_raw", "any_selected"] > upper
    # the first forward step of NEXIS is Bonferroni screening: the same family-wise error events
    assert s.loc["nexis_hc2", "any_selected"] == s.loc["marginal_bonferroni", "any_selected"]


@pytest.mark.slow
def test_ci_coverage_is_nominal():
    """95 % CIs of the GATEs, the projection and the policy value cover their true values ~95 % of the time."""
    cfg = _cfg("cells=[linear:gaussian]", "n_values=[1000]", "coverage_n=1000", "repetitions=120",
               "null_outcomes=[]", "methods=[nexis_linear]", "n_truth=20000", "calibration=[]")
    cov = summarize_coverage(run_in_memory(build_tasks(cfg.validate_, 3)))
    for _, r in cov.iterrows():
        assert r["coverage_lo"] <= 0.95 + 1e-9 and r["coverage_hi"] >= 0.90, r.to_dict()
