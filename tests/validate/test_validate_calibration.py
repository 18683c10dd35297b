"""The calibration designs of issue 13 as the validation study runs them: a study split into chunks of repetitions
is the same study, and the CI-sized study holds the FWER bound on every design and test option that should."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tokens2policy.config import ConfigError, load_config
from tokens2policy.validate.study import build_tasks, combine_chunks, run_in_memory, summarize_selection


def _cfg(*overrides):
    return load_config(None, ["data_dir=/tmp/unused", "validate.cells=[]", "validate.null_outcomes=[]",
                              *[f"validate.{o}" for o in overrides]])


def _draw_rows(df: pd.DataFrame) -> pd.DataFrame:
    keep = [c for c in df.columns if c not in ("task_id", "seconds")]
    return df[keep].sort_values(["design", "rep", "method"]).reset_index(drop=True)


def test_a_chunk_of_repetitions_gives_the_same_rows_as_the_whole_run():
    methods = "calibration_methods=[nexis_linear,nexis_hc2,nexis_gcm]"
    whole = build_tasks(_cfg("calibration=[sparse,covariates]", "calibration_repetitions=4", methods).validate_)
    chunk = build_tasks(_cfg("calibration=[sparse,covariates]", "calibration_repetitions=2",
                             "calibration_first_repetition=2", methods).validate_)
    assert [t["rep"] for t in chunk] == [2, 3, 2, 3]
    a = _draw_rows(run_in_memory(whole))
    b = _draw_rows(run_in_memory(chunk))
    pd.testing.assert_frame_equal(a[a["rep"] >= 2].reset_index(drop=True), b)
    # two chunks, summarised together, are the whole study (and an overlapping draw counts once)
    first = _draw_rows(run_in_memory(build_tasks(_cfg("calibration=[sparse,covariates]", "calibration_repetitions=3",
                                                      methods).validate_)))
    pd.testing.assert_frame_equal(summarize_selection(combine_chunks([first, b])), summarize_selection(a))
    with pytest.raises(ConfigError, match="calibration_first_repetition"):
        _cfg("calibration_first_repetition=-1")


def test_combining_chunks_refuses_runs_that_disagree_on_a_draw():
    rows = pd.DataFrame({"design": "cal-dense", "outcome": "gaussian", "n": 100, "m": 5, "effect": 0.0,
                         "rep": [0, 1, 1], "kind": "selection", "method": "nexis_hc2", "estimand": "",
                         "selected": ["[]", "[3]", "[3]"], "any_false": [0.0, 1.0, 1.0]})
    combined = combine_chunks([rows.iloc[:2], rows.iloc[2:]])
    assert combined["rep"].tolist() == [0, 1]   # the repeated draw once, not twice
    bad = rows.iloc[2:].assign(selected="[]", any_false=0.0)
    with pytest.raises(ValueError, match="disagree on the same draw"):
        combine_chunks([rows.iloc[:2], bad])
    with pytest.raises(ValueError, match="at least one"):
        combine_chunks([])
