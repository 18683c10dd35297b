"""Heterogeneity coverage on the pipeline's own path (validate/coverage_path.py), against its truth.

CI size: a few repetitions, with bounds fixed in advance from binomial tails (false-failure probability ≤ 0.5 %), so
the tests can fail but do not fail by chance; the 200-repetition study in docs/validation.md makes the precise
statement.
"""
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from tokens2policy.validate.coverage_path import COLUMNS, CoverageDesign, run_repetition, summarize


def test_only_a_topical_driver_the_selection_covers_all_of_it():
    # tau = 0.2 + 1{x0 > 0}: NEXIS selects x0 on the selection half; the selected-set learner then carries all
    # the heterogeneity the full learner finds, so the truth is ~1 and the stage's estimate is high
    rows = run_repetition(CoverageDesign(n=2000, topical=1.0, distributed=0.0), rep=0, seed=3, modes=("split",))
    assert list(rows.columns) == COLUMNS
    r = rows.iloc[0]
    assert "0" in r.selected.split(",")
    assert r.true_value > 0.9
    assert r.estimate > 0.7 and r.ci_low <= r.true_value <= r.ci_high
    assert r.tau_share_selected > 0.95      # tau is a function of the selected indicator


def test_ci_size_coverage_of_the_truth_on_the_split_path():
    reps = 8
    rows = pd.concat([run_repetition(CoverageDesign(n=2000), rep=r, seed=11, modes=("split",)) for r in range(reps)],
                     ignore_index=True)
    # the distributed driver is spread over 10 weak features: the selection explains part of the heterogeneity
    assert rows.true_value.between(0.05, 0.98).mean() >= 0.5
    ok = rows.covered.notna()
    lower = int(stats.binom.ppf(0.005, int(ok.sum()), 0.95))
    assert rows.loc[ok, "covered"].sum() >= lower, rows[["estimate", "ci_low", "ci_high", "true_value"]]
    s = summarize(rows.assign(design="coverage"))
    assert s["reps"].iloc[0] == reps and np.isfinite(s["mean_bias"].iloc[0])
