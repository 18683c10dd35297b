"""The run summary says which units each estimate comes from (issue 13: selection-aware tables)."""
from tokens2policy.report.summary import sample_note, summary_lines


def _facts(on):
    gate = {"group": "active - inactive", "estimate": 1.0, "ci_low": 0.5, "ci_high": 1.5, "n": 480,
            "estimated_on": on}
    value = {"policy": "tree", "comparison": "value", "estimate": 0.3, "ci_low": 0.2, "ci_high": 0.4,
             "treated_share": 0.6, "n": 480, "estimated_on": on}
    card = {"label": "sport", "feature": "12", "t": 5.0, "p_value": 1e-6, "gates": [gate]}
    return {"experiments": {"e": {"outcomes": {"y": {"modifiers": [card], "policy_value": [value]}}}}}


def test_summary_names_the_estimation_units_or_flags_the_single_sample_path():
    split = "\n".join(summary_lines(_facts("estimation")))
    assert "(GATEs estimated on 480 estimation units, none of which selected the modifiers)" in split
    assert "policy value (doubly robust, 95% CI; estimated on 480 estimation units" in split
    single = "\n".join(summary_lines(_facts("all")))
    assert single.count("NOT selection-aware (honesty.mode=none)") == 2
    assert sample_note([{"n": 3}]) == ""  # tables written before the split: nothing claimed
