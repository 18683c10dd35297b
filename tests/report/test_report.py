"""The report stage on synthetic stage tables in a real Delta lakehouse, logged to a real MLflow store."""
from __future__ import annotations

import html
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from .conftest import EXP, OTHER, make_units, write_tables

Z975 = 1.959963984540054


def _text(page: str) -> str:
    """Visible text of the page (tags stripped, entities decoded)."""
    no_img = re.sub(r'src="data:image/png;base64,[^"]*"', "", page)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", no_img)).split())


@pytest.fixture(scope="module")
def page(full_report):
    cfg, tables, summary = full_report
    index = Path(summary["report_path"])
    raw = index.read_text()
    facts = json.loads((index.parent / "facts.json").read_text())
    return {"cfg": cfg, "tables": tables, "summary": summary, "index": index, "raw": raw, "text": _text(raw),
            "facts": facts}


def test_page_has_every_section_for_both_experiments(page):
    text = page["text"]
    for heading in ("The answer", "Experiment summary", "Covariate balance", "NEXIS selection trace",
                    "Direct effect modifiers", "TOC and Qini curves", "Targeting policy", "Marginal screening vs NEXIS"):
        assert heading in text, heading
    assert f"Experiment {EXP}: details" in text and f"Experiment {OTHER}: details" in text
    assert 'alt="GATE forest plot"' in page["raw"]
    assert page["summary"]["missing"] == []
    assert page["index"].name == "index.html"
    assert page["index"].parent.parent == page["cfg"].data_path / "reports"


def test_experiment_summary_numbers(page):
    """Difference in means with its Neyman CI and covariate SMDs, recomputed here with pandas."""
    u = page["tables"]["units"]
    u = u[u.experiment_id == EXP]
    y1, y0 = u.engagement[u.treatment == 1], u.engagement[u.treatment == 0]
    ate = y1.mean() - y0.mean()
    se = np.sqrt(y1.var(ddof=1) / len(y1) + y0.var(ddof=1) / len(y0))
    ef = page["facts"]["experiments"][EXP]
    assert ef["ate"]["engagement"]["estimate"] == pytest.approx(ate, rel=1e-9)
    assert ef["ate"]["engagement"]["se"] == pytest.approx(se, rel=1e-9)
    assert f"{ate:.3f}" in page["text"] and f"[{ate - Z975 * se:.3f}, {ate + Z975 * se:.3f}]" in page["text"]
    assert ef["n_units"] == 400 and ef["n_treated"] == 200
    assert page["facts"]["experiments"][OTHER]["n_units"] == 100
    x1, x0 = u.prior_sessions[u.treatment == 1], u.prior_sessions[u.treatment == 0]
    smd = (x1.mean() - x0.mean()) / np.sqrt((x1.var(ddof=1) + x0.var(ddof=1)) / 2)
    assert ef["balance"]["prior_sessions"] == pytest.approx(smd, rel=1e-9) and f"{smd:.3f}" in page["text"]
    assert set(ef["balance"]) == {"tenure_days", "prior_sessions"}  # the configured covariates only
    assert ef["quarantined"] == 3 and "missing_outcome" in page["text"]
    # calibration scalars are listed, curve points are drawn (not listed)
    assert "differential_prediction" in page["text"] and "toc_curve" not in page["text"]


def test_modifier_cards(page):
    text, raw = page["text"], page["raw"]
    cards = page["facts"]["experiments"][EXP]["outcomes"]["engagement"]["modifiers"]
    # label from modifiers when present, else from neuron_labels (feature "7" ↔ neuron 7)
    assert [c["label"] for c in cards] == ["sport coverage", "politics and elections"]
    assert "[NAME] scored twice" in text and "League table update" in text
    assert "a fourth example not shown" not in text  # report.n_examples=3 distinct texts
    assert "<script>alert(1)</script>" not in raw and "&lt;script&gt;alert(1)&lt;/script&gt;" in raw
    assert "match, goal, league" in text
    assert [len(c["gates"]) for c in cards] == [3, 3]
    assert "1.550" in text and "[1.119, 1.981]" in text and "[-2.029, -0.971]" in text
    assert "stop_gate1" in text and "1 skipped candidates" in text


def test_the_answer_comes_first(page):
    """The page opens with the answer: the modifiers' labels with their GATE contrasts, the forest plot, the
    recommended policy with its gains over the baselines and the comparison with the known truth; details after."""
    raw, text = page["raw"], page["text"]
    answer = raw[raw.index('<section class="answer" id="answer-exp_a"'):]
    answer = answer[:answer.index("</section>")]
    a_text = _text(answer)
    assert raw.index('<section class="answer"') < raw.index('<section class="details"')
    assert text.index("The answer — experiment exp_a") < text.index("Experiment summary")
    assert "NEXIS selected 2 direct effect modifiers of the effect on engagement" in a_text
    assert ("In short: 2 direct effect modifiers (1 raises the effect, 1 lowers it); the recommended policy learned "
            "treats 77.5% of units and gains +0.125 [0.066, 0.183] over treating everyone; against the demo's truth "
            "it found 2 of 2 true modifiers.") in a_text
    # in the order of selection, each with its contrast and CI from `gates`
    i, j = a_text.index("sport coverage"), a_text.index("politics and elections")
    assert i < j
    assert "1 sport coverage 12 larger where active vs inactive +1.550 [1.119, 1.981] 1.50e-09" in a_text
    assert "2 politics and elections 7 smaller where active vs inactive −1.500 [-2.029, -0.971]" in a_text
    assert answer.count('src="data:image/png;base64,') == 1 and 'alt="GATE forest plot"' in answer
    # the recommended policy (the only learned one in this table), its rules, value and gains with CIs
    assert "learned" in a_text and "treats 77.5% of units" in a_text
    assert "IF neuron 7 inactive THEN treat" in a_text
    assert "Value 1.612 [1.514, 1.710]" in a_text
    assert "treating everyone: +0.125 [0.066, 0.183]" in a_text
    assert "treating the same share at random: +0.234 [0.156, 0.313]" in a_text
    rec = page["facts"]["experiments"][EXP]["outcomes"]["engagement"]["recommended_policy"]
    assert rec["policy"] == "learned" and [g["baseline"] for g in rec["gains"]] == ["treat_all", "random_same_budget"]


def test_selection_against_the_known_truth(page):
    """Neuron–topic alignment recomputed here with pandas from the fixture's neurons and demo_truth."""
    t = page["tables"]
    codes = t["neurons"].explode(["indices", "values"]).dropna(subset=["indices"])
    codes = codes[codes["values"].astype(float) > 0].merge(t["demo_truth"][["unit_id", "topic"]], on="unit_id")
    share = {n: codes[codes.indices == n].topic.value_counts(normalize=True) for n in (12, 7)}
    assert share[12].idxmax() == "sport" and share[7].idxmax() == "politics"
    sizes = t["demo_truth"].topic.value_counts()
    recall12 = (codes[(codes.indices == 12)].topic == "sport").sum() / sizes["sport"]
    truth = page["facts"]["experiments"][EXP]["outcomes"]["engagement"]["truth"]
    assert truth == {"n_true": 2, "n_found": 2, "n_other": 0, "found": ["topic=sport", "topic=politics"]}
    a_text = _text(page["raw"][page["raw"].index('<section class="answer" id="answer-exp_a"'):
                               page["raw"].index('<section class="details"')])
    assert "Found 2 of 2 true modifiers" in a_text
    assert "topic=sport (effect +1.50): found by 1 selected neuron which ones sport coverage feature 12: " \
           f"{100 * share[12]['sport']:.0f}% of its active units are sport; it covers {100 * recall12:.0f}% of them" \
           in a_text
    # the other experiment has no truth rows: no comparison there
    assert "truth" not in page["facts"]["experiments"][OTHER].get("outcomes", {}).get("engagement", {})


def test_trace_is_readable_and_collapsible(page):
    raw, text = page["raw"], page["text"]
    trace = raw[raw.index("NEXIS selection trace"):raw.index("Calibration: TOC and Qini curves")]
    assert "<details" in trace and "<summary>" in trace
    assert "5 decisions — skipped: 1; added: 2; stopped by Gate 1: 1; kept: 1." in " ".join(_text(trace).split())
    # the JSON detail column as key/value pairs, never as raw JSON
    assert '{"' not in html.unescape(trace) and "<dt>runner_up</dt><dd>40</dd>" in trace
    assert "<dt>added_in</dt><dd>joint, 1</dd>" in trace
    assert "sport coverage" in _text(trace)  # labels next to the feature ids


def test_top_examples_are_distinct_texts(page):
    raw = page["raw"]
    card = raw[raw.index("<h3>sport coverage</h3>"):]
    card = card[:card.index("</div>\n<div class=\"card")]
    assert card.count("scored twice") == 1 and "(read by 2 of the top units)" in card
    assert card.count('<div class="ex">') == 3


def test_marginal_screening_counts(page):
    """raw p ≤ .05: {2,3,6,7,12}; Bonferroni: {6,7,12}; BH: {3,6,7,12}; NEXIS selected {7,12}."""
    ms = page["facts"]["experiments"][EXP]["outcomes"]["engagement"]["marginal"]
    assert ms["n_selected"] == 2 and ms["n_features"] == 11
    assert ms["raw"] == {"flagged": 5, "proxies": 3, "selected_flagged": 2, "proxy_features": ["2", "3", "6"]}
    assert (ms["bonferroni"]["flagged"], ms["bonferroni"]["proxies"], ms["bonferroni"]["proxy_features"]) == (3, 1, ["6"])
    assert (ms["bh"]["flagged"], ms["bh"]["proxies"]) == (4, 2)


def test_policy_and_figures(page):
    text, raw, summary = page["text"], page["raw"], page["summary"]
    assert "IF neuron 7 inactive THEN treat" in text
    assert "1.612" in text and "random_same_budget" in text and "[0.156, 0.313]" in text
    assert set(summary["figures"]) == {"gates_forest_exp_a_engagement.png", "toc_qini_exp_a_engagement.png",
                                       "policy_value_exp_a_engagement.png"}
    for name in summary["figures"]:
        assert (page["index"].parent / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # self-contained: figures inlined, nothing fetched from elsewhere
    assert raw.count('src="data:image/png;base64,') == 3
    assert 'src="http' not in raw and "<link" not in raw and "<script" not in raw


def test_logged_to_mlflow(page):
    import mlflow

    from tokens2policy.tracking import configure_mlflow

    configure_mlflow(page["cfg"])
    client = mlflow.MlflowClient()
    run_id = page["summary"]["mlflow_run_id"]
    files = {f.path for f in client.list_artifacts(run_id, "report")}
    assert {"report/index.html", "report/facts.json", "report/gates_forest_exp_a_engagement.png"} <= files
    from tokens2policy.report.screenshot import find_chromium

    if find_chromium() is not None:  # the browser's view of the page goes with it
        assert "report/screenshot.png" in files and page["summary"]["screenshot"]
    run = client.get_run(run_id)
    assert run.data.tags["t2p.stage"] == "report" and run.data.params["input_version.gates"] == "0"
    assert run.data.params["input_version.selection_trace"] == "0"


def test_summary_prints_the_reports_numbers(spark, full_report, capsys):
    from tokens2policy.report.summary import print_summary

    cfg, _, summary = full_report
    print_summary(spark, cfg, [{"stage": "report", "skipped": False, "seconds": 2.0, **summary}])
    out = capsys.readouterr().out
    assert "report: ran in 2.0s" in out
    assert f"experiment {EXP}: 400 units, 50.0% treated" in out
    assert "direct effect modifiers selected by NEXIS: 2" in out
    assert "1. sport coverage (feature 12) t=6.10 p=1.50e-09" in out
    assert "2. politics and elections (feature 7) t=-3.90" in out
    lines = out.splitlines()
    i = next(k for k, l in enumerate(lines) if "1. sport coverage" in l)
    assert "GATE active - inactive: 1.550 95% CI [1.119, 1.981]" in lines[i + 1]  # the contrast first
    assert "learned − treat_all: 0.125 [0.066, 0.183]" in out
    assert "learned: 1.612 [1.514, 1.710] (treats 77.5%)" in out
    assert "marginal screening would flag 3 features (1 not selected by NEXIS: proxies)" in out
    assert ("recommended policy: learned (treats 77.5%); gain over treating everyone +0.125 [0.066, 0.183]; "
            "treating the same share at random +0.234 [0.156, 0.313]") in out
    assert "known truth (demo): found 2 of 2 true modifiers (topic=sport, topic=politics); 0 selected feature(s) " \
           "aligned with none" in out
    assert f"report: {summary['report_path']}" in out


def test_curves_from_calibration_rows():
    """TOC/Qini points per learner come from the curve rows of `calibration` (scalar rows have no q)."""
    from tokens2policy.report.load import ReportData
    from tokens2policy.report.page import _curves

    from .conftest import calibration_table

    q = np.linspace(0.1, 1.0, 10)
    cal = calibration_table(q, learners=("dr", "t_learner"))
    curves = _curves(ReportData(EXP, tables={"calibration": cal}), "engagement")
    assert len(curves) == 20 and set(curves["learner"]) == {"dr", "t_learner"}
    for k, learner in enumerate(("dr", "t_learner")):
        c = curves[curves.learner == learner].sort_values("q")
        np.testing.assert_allclose(c["q"], q)
        np.testing.assert_allclose(c["toc"], (0.8 - 0.1 * k) * (1 - q))
        np.testing.assert_allclose(c["qini"], q * (0.8 - 0.1 * k) * (1 - q))
        np.testing.assert_allclose(c["toc_se"], 0.05)
    # without curve rows there is nothing to draw
    assert _curves(ReportData(EXP, tables={"calibration": cal[cal.q.isna()]}), "engagement") is None


def test_missing_tables_one_experiment(spark, make_cfg, capsys):
    """After ingest only: the page and the summary say what is missing instead of failing; one experiment."""
    from tokens2policy.report.job import run
    from tokens2policy.report.summary import print_summary

    cfg = make_cfg("report.log_to_mlflow=false", f"report.experiment_id={OTHER}", "report.screenshot=false")
    write_tables(spark, cfg, {"units": pd.concat([make_units(n=60), make_units(n=40, experiment_id=OTHER)])})
    res = run(spark, cfg)
    text = _text(Path(res["report_path"]).read_text())
    for table in ("modifiers", "gates", "policy_value", "selection_trace", "marginal_screen", "neuron_labels"):
        assert f"table '{table}' does not exist" in text
    assert "Covariate balance" in text and f"Experiment {OTHER}" in text and f"Experiment {EXP}" not in text
    assert res["experiments"] == [OTHER]

    lines = print_summary(spark, cfg, [{"stage": "ingest", "skipped": True},
                                       {"stage": "report", "skipped": False, "seconds": 1.5, **res}])
    out = capsys.readouterr().out
    assert "ingest: skipped (up to date)" in out
    assert f"experiment {OTHER}: 40 units" in out
    assert "identify has not run" in out and "policy has not run" in out
    assert lines[-2] == f"report: {res['report_path']}"

    # without this run's report the summary computes the same numbers from the lakehouse
    capsys.readouterr()
    print_summary(spark, cfg, [])
    again = capsys.readouterr().out
    assert f"experiment {OTHER}: 40 units" in again and "(latest; the report stage did not run now)" in again
