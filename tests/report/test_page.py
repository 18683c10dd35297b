"""The page built from in-memory tables (no Spark): the answer's slots for later stages' columns, and the parts
that must say what is missing instead of inventing a number."""
from __future__ import annotations

import html
import re

import numpy as np
import pandas as pd
import pytest

from .conftest import EXP, synthetic_tables


def _build(tmp_path, tables, *overrides):
    from tokens2policy.config import load_config
    from tokens2policy.report.load import Lakehouse
    from tokens2policy.report.page import build_page

    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = load_config(None, [f"data_dir={tmp_path / 'data'}", "report.n_examples=3", *overrides])
    lake = Lakehouse(tables, {k: 0 for k in tables}, [], {})
    page = build_page(cfg, [lake.for_experiment(EXP)], tmp_path, {"versions": {}})
    answer = page.html[page.html.index('<section class="answer"'):page.html.index('<section class="details"')]
    return page, " ".join(html.unescape(re.sub(r"<[^>]+>", " ", answer)).split())


def _tables():
    t = synthetic_tables()
    del t["units"], t["neurons"], t["demo_truth"]
    return t


def test_slots_render_the_columns_other_stages_add(tmp_path):
    """Selection-aware labels (an `estimated_on` column) and heterogeneity coverage (a `coverage` metric row in
    calibration) appear in the answer as the tables state them; without them, nothing is said."""
    t = _tables()
    _, plain = _build(tmp_path / "a", t)
    assert "estimated on" not in plain and "heterogeneity coverage" not in plain
    t["gates"] = t["gates"].assign(estimated_on="held-out units (n = 200)")
    t["policy_value"] = t["policy_value"].assign(sample="fold ≠ selection")
    from tokens2policy.effects.coverage import CoverageResult, coverage_frame

    residual = pd.DataFrame({"feature": ["neuron_3"], "estimate": [0.4], "se": [0.1], "p_bonferroni": [0.001],
                             "t": [4.0], "n_tested": [10]})
    low = CoverageResult(share=0.25, share_ci=(0.1, 0.4), explained={k: (0.1, 0.02, 0.06, 0.14) for k in
                                                                     ("selected", "full", "joint")},
                         beyond=(0.5, 0.1, 0.3, 0.7, 1e-4), heterogeneity=(30.0, 2, 1e-6), n=400, alpha=0.05,
                         warn_below=0.5, n_bootstrap=200, residual=residual)
    cov = coverage_frame(low).assign(experiment_id=EXP, outcome="engagement", learner="dr", q=np.nan)
    t["calibration"] = pd.concat([t["calibration"], cov], ignore_index=True)
    page, text = _build(tmp_path / "b", t)
    assert "GATEs: estimated on held-out units (n = 200)" in text
    assert "policy values: estimated on fold ≠ selection" in text
    t["calibration"] = t["calibration"].assign(estimated_on="estimation")
    t["policy_value"] = t["policy_value"].drop(columns="sample").assign(estimated_on="all")
    _, text = _build(tmp_path / "c", t)
    assert "calibration: estimated on the estimation units, none of which selected the modifiers" in text
    assert "policy values: estimated on all units, the same that selected the modifiers: NOT selection-aware" in text
    # the effects stage's own line, a warning naming the strongest unselected feature with its label
    assert ("WARNING: heterogeneity coverage: the selected modifiers explain 25% (95% CI 10–40%) of the "
            "heterogeneity detectable on held-out folds") in text
    assert "neuron_3 'weather'" in text
    assert page.facts["experiments"][EXP]["outcomes"]["engagement"]["coverage"]["warning"] is True
    # near the top: before the forest plot
    assert page.html.index("heterogeneity coverage") < page.html.index('alt="GATE forest plot"')


def test_answer_without_later_stages_says_what_is_missing(tmp_path):
    t = _tables()
    for name in ("gates", "policy_value", "policy_rules", "assignments", "calibration"):
        del t[name]
    page, text = _build(tmp_path, t)
    assert "NEXIS selected 2 direct effect modifiers" in text
    assert text.count("no GATE yet") == 2
    assert "Missing: table 'policy_value' (policy has not run)" in text
    assert "the comparison with the demo's truth needs tables 'neurons' and 'demo_truth'" in text
    assert page.figures == []  # no GATEs: no forest plot, and no made-up one


def test_no_modifier_selected(tmp_path):
    t = _tables()
    t["modifiers"] = t["modifiers"].head(0)
    _, text = _build(tmp_path, t)
    assert "NEXIS selected no direct effect modifier of the effect on engagement" in text


def test_recommended_policy_is_the_one_the_policy_stage_flagged(tmp_path):
    """With several learned policies, `assignments.recommended` decides, then policy.recommended."""
    t = _tables()
    v = t["policy_value"]
    tree = v.assign(policy=v.policy.replace({"learned": "tree"}))
    budget = v[v.policy == "learned"].assign(policy="budget", estimate=v.estimate[v.policy == "learned"] + 1)
    t["policy_value"] = pd.concat([tree, budget], ignore_index=True)
    t["assignments"] = pd.DataFrame({"experiment_id": EXP, "outcome": "engagement", "policy": ["tree", "budget"],
                                     "recommended": [False, True], "treat": 1, "count": [400, 400]})
    page, text = _build(tmp_path / "a", t)
    rec = page.facts["experiments"][EXP]["outcomes"]["engagement"]["recommended_policy"]
    assert rec["policy"] == "budget" and rec["why"] == "the policy stage's recommended policy"
    assert rec["value"]["estimate"] == pytest.approx(2.6123)
    del t["assignments"]
    page, _ = _build(tmp_path / "b", t, "policy.recommended=tree")
    rec = page.facts["experiments"][EXP]["outcomes"]["engagement"]["recommended_policy"]
    assert rec["policy"] == "tree" and rec["why"] == "policy.recommended"


def test_templates_ship_with_the_package():
    """setup.py declares the templates as package data, so a wheel carries them."""
    from pathlib import Path

    import tokens2policy.report as report

    setup = (Path(__file__).resolve().parents[2] / "setup.py").read_text()
    assert '"tokens2policy.report": ["templates/*"]' in setup
    names = {p.name for p in (Path(report.__file__).parent / "templates").iterdir()}
    assert {"report.html.j2", "answer.html.j2", "details.html.j2", "macros.html.j2", "report.css"} <= names


def test_the_answers_picture_is_one_contrast_per_modifier():
    """Largest contrast first; without contrast rows every GATE row of the selected modifiers is drawn."""
    from tokens2policy.report.page import forest_rows

    gates = synthetic_tables()["gates"]
    cards = [{"feature": "12", "label": "sport coverage"}, {"feature": "7", "label": "politics"}]
    rows, xlabel, contrasts = forest_rows(gates, cards)
    assert contrasts and rows["name"].tolist() == ["sport coverage", "politics"]
    assert rows["estimate"].tolist() == [1.55, -1.5] and rows["ci_low"].tolist() == [1.119, -2.029]
    assert xlabel == "effect difference, active − inactive (95% CI)"
    rows, xlabel, contrasts = forest_rows(gates[gates.group != "active - inactive"], cards[::-1])
    assert not contrasts and rows["name"].tolist() == ["politics · active", "politics · inactive",
                                                       "sport coverage · active", "sport coverage · inactive"]
