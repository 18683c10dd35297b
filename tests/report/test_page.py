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
    assert "estimated on" not in plain and "Heterogeneity coverage" not in plain
    t["gates"] = t["gates"].assign(estimated_on="held-out units (n = 200)")
    t["policy_value"] = t["policy_value"].assign(sample="fold ≠ selection")
    cov = pd.DataFrame({"experiment_id": EXP, "outcome": "engagement", "learner": "dr", "metric": "coverage",
                        "group": "selected vs all features", "q": np.nan, "estimate": 0.62, "se": 0.1,
                        "ci_low": 0.42, "ci_high": 0.82, "p_value": np.nan, "null_hypothesis": "", "n": 400}, index=[0])
    t["calibration"] = pd.concat([t["calibration"], cov], ignore_index=True)
    page, text = _build(tmp_path / "b", t)
    assert "GATEs: estimated on held-out units (n = 200)" in text
    assert "policy values: estimated on fold ≠ selection" in text
    assert "Heterogeneity coverage (selected vs all features): 0.620 [0.420, 0.820] dr" in text
    # near the top: before the forest plot
    assert page.html.index("Heterogeneity coverage") < page.html.index('alt="GATE forest plot"')


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
