"""The end-of-run summary printed by ``t2p run all``: what each stage did, the selected direct effect modifiers with
their labels and GATEs (with CIs), the policy value against its baselines, and where the report is.

It prints the headline numbers (``facts``) of the report this run wrote; when the report stage did not run now
(skipped, failed, not selected) the same numbers are computed from the lakehouse. Missing tables are named, so it
works after any prefix of the pipeline.
"""
from __future__ import annotations

import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from tokens2policy.config import Config
from tokens2policy.report.page import ci, fmt, is_contrast, signed

log = logging.getLogger(__name__)


def _stage_line(r: Dict[str, Any]) -> str:
    if r.get("skipped"):
        return f"{r['stage']}: skipped (up to date)"
    secs = r.get("seconds")
    return f"{r['stage']}: ran" + (f" in {secs:.1f}s" if isinstance(secs, (int, float)) else "")


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def sample_note(records: Sequence[Dict[str, Any]]) -> str:
    """Which units a table's estimates come from (its ``estimated_on`` and ``n`` columns; docs/effects.md §0)."""
    on = {r.get("estimated_on") for r in records if isinstance(r.get("estimated_on"), str)}
    ns = [r.get("n") for r in records if _finite(r.get("n"))]
    n = f"{int(max(ns)):,} " if ns else ""
    if on == {"estimation"}:
        return f"estimated on {n}estimation units, none of which selected the modifiers"
    if on == {"all"}:
        return (f"estimated on all {n}units, the same that selected the modifiers: NOT selection-aware "
                "(honesty.mode=none)")
    return ""


def facts_for_run(spark, config: Config, results: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """The facts of this run's report (its ``facts.json``), else facts computed now from the lakehouse."""
    for r in results:
        path = r.get("report_path") if r.get("stage") == "report" else None
        if path and (Path(path).parent / "facts.json").exists():
            return json.loads((Path(path).parent / "facts.json").read_text(encoding="utf-8"))
    from tokens2policy.report.job import build_facts, latest_report

    with tempfile.TemporaryDirectory() as tmp:
        page, lakehouse = build_facts(spark, config, Path(tmp))
    facts = {**page.facts, "versions": lakehouse.versions}
    latest = latest_report(config)
    facts["report_path"] = f"{latest} (latest; the report stage did not run now)" if latest else None
    return facts


def summary_lines(facts: Dict[str, Any], results: Sequence[Dict[str, Any]] = ()) -> List[str]:
    """The summary as text lines, from a report's facts."""
    lines = ["", "=" * 78, "tokens2policy — run summary", "=" * 78]
    if results:
        lines.append("stages: " + "; ".join(_stage_line(r) for r in results))
    for exp, ef in facts.get("experiments", {}).items():
        head = f"experiment {exp}" if exp else "experiment (all rows)"
        if ef.get("n_units"):
            head += f": {ef['n_units']:,} units, {fmt(100 * ef.get('n_treated', 0) / ef['n_units'], 1)}% treated"
        lines.append(head)
        for outcome, d in (ef.get("ate") or {}).items():
            lines.append(f"  {outcome}: average effect {fmt(d['estimate'])} 95% CI {ci(d['ci_low'], d['ci_high'])}"
                         " (difference in means)")
        for outcome, of in (ef.get("outcomes") or {}).items():
            pre = f"  [{outcome}] " if outcome else "  "
            cards = of.get("modifiers")
            if cards is None:
                lines.append(pre + "direct effect modifiers: (table 'modifiers' missing — identify has not run)")
            else:
                lines.append(pre + f"direct effect modifiers selected by NEXIS: {len(cards)}")
                note = sample_note([g for c in cards for g in (c.get("gates") or [])])
                if note:
                    lines.append(pre + f"  (GATEs {note})")
                for i, c in enumerate(cards, 1):
                    stat = " ".join(s for s in (f"t={fmt(c['t'], 2)}" if _finite(c.get("t")) else "",
                                                f"p={fmt(c['p_value'])}" if _finite(c.get("p_value")) else "") if s)
                    lines.append(f"{pre}  {i}. {c['label']} (feature {c['feature']}) {stat}".rstrip())
                    gates = sorted(c.get("gates") or [], key=lambda g: 0 if is_contrast(g.get("group")) else 1)
                    for g in gates[:3]:
                        lines.append(f"{pre}       GATE {g.get('group', '')}: {fmt(g.get('estimate'))} "
                                     f"95% CI {ci(g.get('ci_low'), g.get('ci_high'))}")
            if (of.get("coverage") or {}).get("line"):
                lines.append(pre + of["coverage"]["line"])
            values = of.get("policy_value")
            if values is None:
                lines.append(pre + "policy value: (table 'policy_value' missing — policy has not run)")
            else:
                note = sample_note(values)
                lines.append(pre + "policy value (doubly robust, 95% CI" + (f"; {note}" if note else "")
                             + "; learned rules cross-fitted: the expected value of the rule-learning procedure):")
                for v in values:
                    comp = v.get("comparison")
                    comp = comp[6:] if isinstance(comp, str) and comp.startswith("minus ") else comp
                    name = str(v.get("policy")) + (f" − {comp}" if isinstance(comp, str) and comp
                                                   and comp not in ("value", "none", "None") else "")
                    if isinstance(v.get("learner"), str) and v["learner"]:
                        name += f" [{v['learner']}]"
                    share = v.get("treated_share")
                    extra = f" (treats {fmt(100 * share, 1)}%)" if _finite(share) else ""
                    lines.append(f"{pre}  {name}: {fmt(v.get('estimate'))} {ci(v.get('ci_low'), v.get('ci_high'))}"
                                 f"{extra}")
            rec = of.get("recommended_policy")
            if rec:
                share = rec.get("treated_share")
                gains = "; ".join(f"{g['words']} {signed(g.get('estimate'))} {ci(g.get('ci_low'), g.get('ci_high'))}"
                                  for g in rec.get("gains") or [])
                lines.append(pre + f"recommended policy: {rec['policy']}"
                             + (f" (treats {fmt(100 * share, 1)}%)" if _finite(share) else "")
                             + (f"; gain over {gains}" if gains else ""))
            truth = of.get("truth")
            if truth:
                lines.append(pre + f"known truth (demo): found {truth['n_found']} of {truth['n_true']} true modifiers"
                             + (f" ({', '.join(truth['found'])})" if truth.get("found") else "")
                             + f"; {truth['n_other']} selected feature(s) aligned with none")
            ms = of.get("marginal")
            if ms is not None:
                b = ms.get("bonferroni") or ms.get("raw")
                if b is not None:
                    lines.append(pre + f"marginal screening would flag {b['flagged']} features "
                                 f"({b['proxies']} not selected by NEXIS: proxies)")
    if facts.get("missing"):
        lines.append("missing: " + "; ".join(facts["missing"]))
    report = facts.get("report_path")
    lines.append(f"report: {report}" if report else "report: none yet (run `t2p run report`)")
    lines.append("=" * 78)
    return lines


def print_summary(spark, config: Config, results: Sequence[Dict[str, Any]] = (),
                  echo: Optional[Callable[[str], None]] = None) -> List[str]:
    """Print the end-of-run summary (and return its lines). Never fails the run: a summary error is one line."""
    echo = echo or (lambda s: print(s, flush=True))  # the summary is the run's output: stdout, whatever the log level
    try:
        lines = summary_lines(facts_for_run(spark, config, results), results)
    except Exception as exc:  # the pipeline succeeded; a broken summary must not turn that into a failure
        log.warning("could not build the run summary: %s: %s", type(exc).__name__, exc)
        log.debug("run summary failure", exc_info=True)
        return []
    for line in lines:
        echo(line)
    return lines
