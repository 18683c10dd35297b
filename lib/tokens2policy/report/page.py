"""The run report as one self-contained HTML page (figures inlined as data URIs and also saved as PNGs).

Sections per experiment: experiment summary and covariate balance; NEXIS selection trace; one card per direct
effect modifier (label, top examples, GATE with CI); GATE forest plot; TOC/Qini curves; policy rules and value vs
baselines; marginal-screening comparison. A section whose table (or column) does not exist says so instead of
failing, so a report can be made after any prefix of the pipeline.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

from tokens2policy.config import Config
from tokens2policy.report import plots
from tokens2policy.report.load import ReportData, feature_key, pick, trailing_int

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;color:#222;background:#f6f7f9}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:1.6em;margin:0 0 4px} h2{border-bottom:2px solid #1f4e79;padding-bottom:4px;margin-top:36px}
h3{margin:18px 0 6px}
table{border-collapse:collapse;margin:8px 0;font-size:13px;background:#fff}
th,td{border:1px solid #d0d4da;padding:3px 8px;text-align:right} th{background:#e9edf3}
td.l,th.l{text-align:left}
.card{background:#fff;border:1px solid #d0d4da;border-left:5px solid #1f4e79;border-radius:4px;padding:10px 16px;
margin:12px 0}
.card.neg{border-left-color:#aa3333}
.missing{background:#fff4e5;border:1px solid #f0b36b;padding:6px 10px;border-radius:4px;font-size:13px;margin:6px 0}
.meta{color:#666;font-size:13px} .ex{font-size:13px;color:#333;margin:4px 0 4px 12px;border-left:3px solid #ccc;
padding-left:8px} img{max-width:100%;background:#fff;border:1px solid #d0d4da}
.num{font-variant-numeric:tabular-nums}
"""


def esc(x: Any) -> str:
    return html.escape("" if x is None else str(x))


def fmt(x: Any, digits: int = 3) -> str:
    """Numbers to short text: 4 significant digits, p-values in scientific notation when small."""
    if x is None:
        return "—"
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else "no"
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    if math.isnan(v):
        return "—"
    if v != 0 and abs(v) < 10 ** -digits:
        return f"{v:.2e}"
    return f"{v:.{digits}f}"


def ci(lo: Any, hi: Any) -> str:
    return f"[{fmt(lo)}, {fmt(hi)}]"


def ci_list(df: pd.DataFrame) -> List[str]:
    """The ``[ci_low, ci_high]`` text of every row ("—" when the table has no CI columns)."""
    if "ci_low" not in df.columns or "ci_high" not in df.columns:
        return ["—"] * len(df)
    return [ci(a, b) for a, b in zip(df["ci_low"], df["ci_high"])]


def missing_note(text: str) -> str:
    return f'<div class="missing">Missing: {esc(text)}</div>'


def table_html(df: pd.DataFrame, columns: Optional[Sequence[str]] = None, max_rows: int = 200) -> str:
    if df is None or df.empty:
        return '<p class="meta">(no rows)</p>'
    cols = [c for c in (columns or df.columns) if c in df.columns]
    head = "".join(f'<th class="l">{esc(c)}</th>' for c in cols)
    rows = []
    for _, r in df.head(max_rows).iterrows():
        cells = []
        for c in cols:
            v = r[c]
            if isinstance(v, (float, int, np.floating, np.integer)) and not isinstance(v, (bool, np.bool_)):
                cells.append(f'<td class="num">{esc(fmt(v))}</td>')
            else:
                cells.append(f'<td class="l">{esc(_text(v))}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    more = f'<p class="meta">{len(df) - max_rows:,} more rows in the table</p>' if len(df) > max_rows else ""
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>{more}"


def _text(v: Any) -> str:
    if isinstance(v, np.ndarray):
        v = v.tolist()
    if isinstance(v, (list, tuple)):
        return ", ".join(_text(x) for x in v)
    if isinstance(v, dict):
        return json.dumps(v, default=str)
    if isinstance(v, float) and math.isnan(v):
        return ""
    return "" if v is None else str(v)


def as_list(v: Any) -> List[Any]:
    """An array column as stored (list, numpy array, JSON string, or separator-joined string) as a list."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return []
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (list, tuple)):
        return list(v)
    if isinstance(v, str):
        s = v.strip()
        if s.startswith("["):
            try:
                out = json.loads(s)
                return out if isinstance(out, list) else [out]
            except ValueError:
                pass
        return [p.strip() for p in re.split(r"\s*\|\s*|\n", s) if p.strip()] if ("|" in s or "\n" in s) else [s]
    return [v]


def example_text(v: Any) -> str:
    if isinstance(v, dict):
        for k in ("text", "doc", "example", "snippet"):
            if k in v:
                return str(v[k])
        return json.dumps(v, default=str)
    if hasattr(v, "asDict"):
        return example_text(v.asDict())
    return str(v)


class Page:
    """Collects sections, figures and the headline numbers (``facts``) of one report."""

    def __init__(self, config: Config, out_dir: Path):
        self.config = config
        self.out = out_dir
        self.parts: List[str] = []
        self.figures: List[Path] = []
        self.facts: Dict[str, Any] = {"experiments": {}}

    def add(self, html_text: str) -> None:
        self.parts.append(html_text)

    def figure(self, path: Optional[Path], alt: str) -> str:
        if path is None:
            return missing_note(f"{alt}: nothing to plot")
        self.figures.append(path)
        data = base64.b64encode(path.read_bytes()).decode()
        return f'<p><img alt="{esc(alt)}" src="data:image/png;base64,{data}"><br><span class="meta">{esc(path.name)}' \
               f"</span></p>"

    def render(self, title: str, header: str) -> str:
        return (
            "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>" + esc(title) + "</title>"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><style>" + CSS + "</style>"
            "</head><body><main>" + header + "".join(self.parts) + "</main></body></html>"
        )


# ---------------------------------------------------------------------------------------------- helpers
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text))[:60] or "x"


def _outcomes(data: ReportData) -> List[Optional[str]]:
    """Outcomes present in the modifiers/gates tables (``[None]`` when none of them has an outcome column)."""
    found: List[str] = []
    for name in ("modifiers", "gates", "policy_value", "marginal_screen", "selection_trace"):
        df = data.get(name)
        if df is not None and "outcome" in df.columns:
            found += [o for o in df["outcome"].dropna().astype(str).unique() if o not in found]
    return sorted(found) or [None]


def _for_outcome(df: Optional[pd.DataFrame], outcome: Optional[str]) -> Optional[pd.DataFrame]:
    if df is None or outcome is None or "outcome" not in df.columns:
        return df
    return df[df["outcome"].astype(str) == outcome]


def neuron_lookup(labels: Optional[pd.DataFrame]) -> Dict[str, Dict[str, Any]]:
    """neuron id (as a string key) → its row in ``neuron_labels``."""
    if labels is None or labels.empty:
        return {}
    col = pick(labels, "neuron")
    if col is None:
        return {}
    return {feature_key(r[col]): r.to_dict() for _, r in labels.iterrows()}


def neuron_row(lookup: Dict[str, Dict[str, Any]], feature: Any) -> Optional[Dict[str, Any]]:
    key = feature_key(feature)
    if key in lookup:
        return lookup[key]
    alt = trailing_int(key)
    return lookup.get(alt) if alt is not None else None


def modifier_label(row: Dict[str, Any], neuron: Optional[Dict[str, Any]]) -> str:
    for source in (row, neuron or {}):
        lab = source.get("label")
        if lab is not None and not (isinstance(lab, float) and math.isnan(lab)) and str(lab).strip():
            return str(lab)
    return f"feature {feature_key(row.get('feature'))}"


def pvalue_col(df: Optional[pd.DataFrame]) -> Optional[str]:
    return pick(df, "p_value")


def tstat_col(df: Optional[pd.DataFrame]) -> Optional[str]:
    return pick(df, "t")


# ---------------------------------------------------------------------------------------------- sections
def section_summary(page: Page, data: ReportData) -> None:
    facts = page.facts["experiments"][data.experiment_id or ""]
    out = ["<h2>Experiment summary</h2>"]
    u = data.units
    if u is None:
        out.append(missing_note("table 'units' (ingest has not run): no experiment summary or balance table"))
    else:
        facts.update(n_units=u.n_units, n_treated=u.n_treated)
        out.append(
            "<table>"
            f"<tr><th class='l'>units</th><td class='num'>{fmt(u.n_units)}</td></tr>"
            f"<tr><th class='l'>treated</th><td class='num'>{fmt(u.n_treated)} ({fmt(100 * u.treated_share, 1)}%)"
            "</td></tr>"
            + (f"<tr><th class='l'>clusters</th><td class='num'>{fmt(u.n_clusters)}</td></tr>" if u.n_clusters else "")
            + (f"<tr><th class='l'>cross-fitting folds</th><td class='num'>{fmt(u.n_folds)}</td></tr>"
               if u.n_folds else "")
            + "</table>"
        )
        if u.outcomes:
            out.append("<h3>Average effect per outcome (difference in means, Neyman SE)</h3>")
            rows = []
            for s in u.outcomes:
                d = s.difference()
                facts.setdefault("ate", {})[s.column] = d
                rows.append({"outcome": s.column, "mean control": s.mean.get(0), "mean treated": s.mean.get(1),
                             "ATE": d["estimate"], "SE": d["se"], "95% CI": ci(d["ci_low"], d["ci_high"])})
            out.append(table_html(pd.DataFrame(rows)))
        else:
            out.append(missing_note("no numeric outcome column in 'units' (source.outcome_cols)"))
        out.append("<h3>Covariate balance</h3>")
        if u.covariates:
            rows = [{"covariate": s.column, "mean control": s.mean.get(0), "mean treated": s.mean.get(1),
                     "SD control": math.sqrt(s.var.get(0, float("nan"))),
                     "SD treated": math.sqrt(s.var.get(1, float("nan"))), "SMD": s.smd(),
                     "|SMD| > " + fmt(page.config.ingest.smd_warn, 2): abs(s.smd()) > page.config.ingest.smd_warn}
                    for s in u.covariates]
            facts["balance"] = {r["covariate"]: r["SMD"] for r in rows}
            out.append(table_html(pd.DataFrame(rows)))
            out.append('<p class="meta">SMD: standardized mean difference (treated − control) / pooled SD; under '
                       "randomization |SMD| is small; values above the threshold flag a chance imbalance or a "
                       "broken assignment.</p>")
        else:
            out.append(missing_note("no numeric covariate columns in 'units'"))
    q = data.get("quarantine")
    if q is not None:
        rc = pick(q, "reason")
        n_q = len(q)
        facts["quarantined"] = n_q
        out.append(f"<h3>Quarantine</h3><p>{fmt(n_q)} rows quarantined at ingest.</p>")
        if rc and n_q:
            out.append(table_html(q.groupby(rc).size().rename("rows").reset_index()))
    page.add("".join(out))


def section_trace(page: Page, data: ReportData, outcome: Optional[str]) -> None:
    out = ["<h3>NEXIS selection trace</h3>"]
    tr = _for_outcome(data.get("selection_trace"), outcome)
    if tr is None:
        out.append(missing_note("table 'selection_trace' (identify has not run)"))
    else:
        order = [c for c in ("phase", "round", "step", "action", "feature", "label", "kind", "t", "p_value",
                             "threshold", "n_candidates", "n_tested", "n_eligible", "gate2_ref", "reason")
                 if c in tr.columns]
        order += [c for c in tr.columns if c not in order and c not in ("experiment_id", "outcome", "collinear", "seq")]
        sort = ["seq"] if "seq" in tr.columns else [c for c in ("round",) if c in tr.columns]
        if sort:
            tr = tr.sort_values(sort, kind="stable")
        shown = tr[tr["action"].astype(str) != "skip"] if "action" in tr.columns else tr
        n_skip = len(tr) - len(shown)
        out.append(
            '<p class="meta">Each forward step tests every candidate given the selected set S (Gate 1: Bonferroni '
            "over the candidates tested; Gate 2: the best |t| must stay above ρ × the smallest |t| at entry); "
            "the backward pass drops members that no longer modify the effect given the others.</p>")
        if n_skip:
            out.append(f'<p class="meta">{fmt(n_skip)} skipped candidates (too few active units, constant, '
                       "collinear) are not listed.</p>")
        out.append(table_html(shown, order, max_rows=page.config.report.max_trace_rows))
    page.add("".join(out))


def section_modifiers(page: Page, data: ReportData, outcome: Optional[str], facts: Dict[str, Any]) -> List[dict]:
    out = ["<h3>Direct effect modifiers</h3>"]
    mods = _for_outcome(data.get("modifiers"), outcome)
    gates = _for_outcome(data.get("gates"), outcome)
    lookup = neuron_lookup(data.get("neuron_labels"))
    cards: List[dict] = []
    if mods is None:
        out.append(missing_note("table 'modifiers' (identify has not run)"))
        page.add("".join(out))
        return cards
    if data.get("neuron_labels") is None:
        out.append(missing_note("table 'neuron_labels' (represent has not run): no top examples"))
    if gates is None:
        out.append(missing_note("table 'gates' (effects has not run): no GATEs"))
    if mods.empty:
        out.append("<p>NEXIS selected no direct effect modifier: no feature modifies the effect given the others at "
                   "the configured error level.</p>")
    pcol, tcol = pvalue_col(mods), tstat_col(mods)
    sort = [c for c in ("round_added",) if c in mods.columns]
    for _, r in (mods.sort_values(sort) if sort else mods).iterrows():
        row = r.to_dict()
        is_covariate = str(row.get("kind")) == "W" or str(row.get("source")) == "covariate"
        neuron = None if is_covariate else neuron_row(lookup, row.get("feature"))
        label = modifier_label(row, neuron)
        if is_covariate and label.startswith("feature "):
            label = f"covariate {feature_key(row.get('feature'))}"
        t = row.get(tcol) if tcol else None
        direction = row.get("direction") or (("+" if t > 0 else "−") if t is not None and np.isfinite(t) else "")
        neg = str(direction).startswith(("-", "−", "neg", "dec"))
        card = {"feature": feature_key(row.get("feature")), "label": label, "p_value": row.get(pcol) if pcol else None,
                "t": t, "direction": direction, "gates": []}
        body = [f'<div class="card{" neg" if neg else ""}"><h3>{esc(label)}</h3>'
                f'<p class="meta">feature {esc(card["feature"])}'
                + (f" · kind {esc(row['kind'])}" if "kind" in row else "")
                + f" · direction {esc(direction)} · t = {esc(fmt(t))} · p = {esc(fmt(card['p_value']))}"
                + (f" · added in round {esc(fmt(row['round_added']))}" if "round_added" in row else "") + "</p>"]
        if neuron is not None:
            terms = as_list(neuron.get("top_terms"))
            if terms:
                body.append(f"<p><b>Top terms:</b> {esc(', '.join(map(str, terms[:15])))}</p>")
            docs = as_list(next((neuron[k] for k in ("top_docs", "top_examples", "examples") if k in neuron), None))
            if docs:
                body.append("<p><b>Top examples</b> (redacted upstream):</p>")
                for d in docs[: page.config.report.n_examples]:
                    text = example_text(d)
                    cut = page.config.report.example_chars
                    body.append(f'<div class="ex">{esc(text[:cut] + ("…" if len(text) > cut else ""))}</div>')
        if gates is not None and "feature" in gates.columns:
            g = gates[gates["feature"].map(feature_key) == card["feature"]]
            if g.empty and trailing_int(card["feature"]):
                g = gates[gates["feature"].map(lambda x: trailing_int(feature_key(x))) == trailing_int(card["feature"])]
            if g.empty:
                body.append(missing_note(f"no GATE rows for feature {card['feature']}"))
            else:
                card["gates"] = g.to_dict("records")
                body.append("<p><b>Group average treatment effects</b></p>")
                body.append(table_html(g.assign(**{"95% CI": ci_list(g)}),
                                       ["group", "split", "n", "n_treated", "estimate", "se", "95% CI", "p_value"]))
        body.append("</div>")
        out.append("".join(body))
        cards.append(card)
    facts["modifiers"] = cards
    page.add("".join(out))
    return cards


def section_forest(page: Page, data: ReportData, outcome: Optional[str], cards: List[dict], tag: str) -> None:
    out = ["<h3>GATE forest plot</h3>"]
    gates = _for_outcome(data.get("gates"), outcome)
    if gates is None:
        out.append(missing_note("table 'gates' (effects has not run)"))
    elif not {"estimate", "ci_low", "ci_high"} <= set(gates.columns):
        out.append(missing_note("table 'gates' lacks estimate/ci_low/ci_high"))
    else:
        labels_by_feature = {c["feature"]: c["label"] for c in cards}
        g = gates.head(page.config.report.max_forest_rows)
        names = [f"{labels_by_feature.get(feature_key(f), f)} · {grp}" for f, grp in
                 zip(g.get("feature", [""] * len(g)), g.get("group", [""] * len(g)))]
        path = plots.forest_plot(names, g["estimate"], g["ci_low"], g["ci_high"],
                                 page.out / f"gates_forest_{tag}.png",
                                 f"GATEs with 95% CIs{' — ' + outcome if outcome else ''}")
        out.append(page.figure(path, "GATE forest plot"))
        if len(gates) > len(g):
            out.append(f'<p class="meta">first {len(g)} of {len(gates)} GATE rows shown.</p>')
    page.add("".join(out))


CURVE_METRICS = ("toc", "qini", "toc_curve", "qini_curve")


def _curves(data: ReportData, outcome: Optional[str]) -> Optional[pd.DataFrame]:
    """TOC/Qini curve points (columns q, toc, qini, *_se, and ``learner`` when there are several): the curve rows
    of ``calibration`` (metric toc[_curve]/qini[_curve] with a numeric ``q``, or a numeric ``group`` when there is
    no ``q`` column)."""
    cal = _for_outcome(data.get("calibration"), outcome)
    if cal is None or "metric" not in cal.columns or "estimate" not in cal.columns:
        return None
    keys = [c for c in ("learner",) if c in cal.columns]
    qcol = "q" if "q" in cal.columns else "group"
    frames = []
    for metric in ("toc", "qini"):
        rows = cal[cal["metric"].astype(str).str.lower().isin([metric, f"{metric}_curve"])]
        qs = pd.to_numeric(rows[qcol], errors="coerce") if qcol in rows.columns else pd.Series(dtype=float)
        rows = rows[qs.notna().to_numpy()]
        if rows.empty:
            continue
        part = rows[keys].copy()
        part["q"] = pd.to_numeric(rows[qcol], errors="coerce").to_numpy(float)
        part[metric] = rows["estimate"].to_numpy(float)
        if "se" in rows.columns:
            part[f"{metric}_se"] = rows["se"].to_numpy(float)
        frames.append(part.set_index(keys + ["q"]))
    if not frames:
        return None
    return pd.concat(frames, axis=1).reset_index()


def section_calibration(page: Page, data: ReportData, outcome: Optional[str], tag: str) -> None:
    out = ["<h3>Calibration: TOC and Qini curves</h3>"]
    cal = _for_outcome(data.get("calibration"), outcome)
    curves = _curves(data, outcome)
    if curves is None:
        out.append(missing_note("TOC/Qini curve points (calibration rows with metric toc_curve/qini_curve per q)"))
    else:
        group = "learner" if "learner" in curves.columns and curves["learner"].nunique() > 1 else None
        out.append(page.figure(plots.curves_plot(curves, page.out / f"toc_qini_{tag}.png",
                                                 f"Rank-weighted ATE curves{' — ' + outcome if outcome else ''}",
                                                 group_col=group),
                               "TOC and Qini curves"))
    if cal is None:
        out.append(missing_note("table 'calibration' (effects has not run)"))
    elif "metric" in cal.columns:
        # curve points (toc/qini per q) are drawn above; the table keeps the scalar rows (BLP, GATES, AUTOC, ...)
        is_curve = cal["metric"].astype(str).str.lower().isin(CURVE_METRICS)
        if "q" in cal.columns:
            is_curve &= cal["q"].notna()
        elif "group" in cal.columns:
            is_curve &= pd.to_numeric(cal["group"], errors="coerce").notna()
        scalar = cal[~is_curve]
        out.append(table_html(scalar.assign(**{"95% CI": ci_list(scalar)}),
                              ["learner", "metric", "group", "estimate", "se", "95% CI", "p_value", "null",
                               "null_hypothesis", "n"]))
    page.add("".join(out))


def section_policy(page: Page, data: ReportData, outcome: Optional[str], facts: Dict[str, Any], tag: str) -> None:
    out = ["<h3>Targeting policy</h3>"]
    rules = _for_outcome(data.get("policy_rules"), outcome)
    value = _for_outcome(data.get("policy_value"), outcome)
    if rules is None:
        out.append(missing_note("table 'policy_rules' (policy has not run)"))
    else:
        out.append("<p><b>Rules</b></p>" + table_html(rules, [c for c in rules.columns
                                                              if c not in ("experiment_id", "outcome")]))
    if value is None:
        out.append(missing_note("table 'policy_value' (policy has not run)"))
    elif {"policy", "estimate"} <= set(value.columns):
        v = value.copy()
        v["95% CI"] = ci_list(v)
        facts["policy_value"] = v.drop(columns=["95% CI"]).to_dict("records")
        out.append("<p><b>Doubly-robust value vs baselines</b> (held-out AIPW; a comparison row is the paired "
                   "difference learned policy − baseline)</p>")
        out.append(table_html(v, ["learner", "policy", "comparison", "treated_share", "estimate", "se", "95% CI",
                                  "p_value", "n", "cost"]))
        levels = v[v["comparison"].isna() | (v["comparison"].astype(str).isin(["", "value", "none", "None"]))] \
            if "comparison" in v.columns else v
        if not levels.empty:
            names = [f"{p} ({l})" if isinstance(l, str) and l else str(p) for p, l in
                     zip(levels["policy"], levels["learner"] if "learner" in levels else [None] * len(levels))]
            out.append(page.figure(plots.value_plot(names, levels["estimate"],
                                                    levels["ci_low"] if "ci_low" in levels else np.full(len(levels), np.nan),
                                                    levels["ci_high"] if "ci_high" in levels else np.full(len(levels), np.nan),
                                                    page.out / f"policy_value_{tag}.png",
                                                    f"Policy value{' — ' + outcome if outcome else ''}"),
                                   "policy value vs baselines"))
    else:
        out.append(missing_note("table 'policy_value' lacks policy/estimate columns"))
    a = data.get("assignments")
    if a is not None:
        out.append("<p><b>Assignments</b> (units per action)</p>" + table_html(_for_outcome(a, outcome)))
    page.add("".join(out))


def marginal_comparison(data: ReportData, outcome: Optional[str], alpha: float) -> Optional[Dict[str, Any]]:
    """How many features marginal (one-at-a-time, S = ∅) testing flags, against NEXIS's selection.

    A feature flagged marginally but not selected modifies the effect only through its correlation with the
    selected direct modifiers (a *proxy*) — or NEXIS lacked power for it; the trace tells which.
    """
    ms = _for_outcome(data.get("marginal_screen"), outcome)
    if ms is None or "feature" not in ms.columns:
        return None
    mods = _for_outcome(data.get("modifiers"), outcome)
    selected = set(mods["feature"].map(feature_key)) if mods is not None and "feature" in mods.columns else set()

    def flagged(p_cols, flag_cols):
        pc = pick(ms, *p_cols)
        if pc is not None:
            return ms[pd.to_numeric(ms[pc], errors="coerce").fillna(1.0) <= alpha]
        fc = pick(ms, *flag_cols)
        if fc is not None:
            return ms[ms[fc].fillna(False).astype(bool)]
        return None

    res: Dict[str, Any] = {"n_features": int(len(ms)), "n_selected": len(selected), "alpha": alpha}
    for name, p_cols, flag_cols in (("raw", ("p_value",), ("reject_raw",)),
                                    ("bonferroni", ("p_bonferroni",), ("reject_bonferroni",)),
                                    ("bh", ("q_bh",), ("reject_bh",))):
        f = flagged(p_cols, flag_cols)
        if f is None:
            res[name] = None
            continue
        keys = set(f["feature"].map(feature_key))
        res[name] = {"flagged": len(keys), "proxies": len(keys - selected),
                     "selected_flagged": len(keys & selected),
                     "proxy_features": sorted(keys - selected, key=lambda k: (len(k), k))[:50]}
    return res


def section_marginal(page: Page, data: ReportData, outcome: Optional[str], facts: Dict[str, Any]) -> None:
    out = ["<h3>Marginal screening vs NEXIS</h3>"]
    alpha = page.config.report.alpha
    res = marginal_comparison(data, outcome, alpha)
    if res is None:
        out.append(missing_note("table 'marginal_screen' (identify has not run)"))
        page.add("".join(out))
        return
    facts["marginal"] = res
    rows = []
    for name, title in (("raw", "unadjusted p ≤ α"), ("bonferroni", "Bonferroni"), ("bh", "Benjamini–Hochberg")):
        r = res.get(name)
        if r is not None:
            rows.append({"marginal test": title, "flagged": r["flagged"], "also selected by NEXIS":
                         r["selected_flagged"], "proxies (flagged, not selected)": r["proxies"]})
    out.append(f"<p>Of {fmt(res['n_features'])} features, NEXIS selected <b>{fmt(res['n_selected'])}</b> direct "
               f"modifiers. Testing each feature alone (α = {fmt(alpha, 2)}) would have flagged:</p>")
    out.append(table_html(pd.DataFrame(rows)) if rows else missing_note("p-value columns in 'marginal_screen'"))
    b = res.get("bonferroni") or res.get("raw")
    if b and b["proxy_features"]:
        out.append(f'<p class="meta">Proxies under {"Bonferroni" if res.get("bonferroni") else "raw"} screening: '
                   f"{esc(', '.join(b['proxy_features'][:30]))}</p>")
    out.append('<p class="meta">A proxy modifies the effect only through its correlation with a direct modifier; '
               "marginal screening cannot tell the two apart, the conditional tests of NEXIS can.</p>")
    page.add("".join(out))


def build_page(config: Config, datasets: List[ReportData], out_dir: Path, run_info: Dict[str, Any]) -> Page:
    page = Page(config, out_dir)
    all_missing = sorted({m for d in datasets for m in d.missing})
    page.facts["missing"] = all_missing
    for data in datasets:
        exp = data.experiment_id or ""
        facts = page.facts["experiments"].setdefault(exp, {})
        page.add(f"<h1 style='margin-top:30px'>Experiment {esc(exp or '(all rows)')}</h1>")
        section_summary(page, data)
        for outcome in _outcomes(data):
            ofacts = facts.setdefault("outcomes", {}).setdefault(outcome or "", {})
            tag = _slug(f"{exp}_{outcome or 'all'}")
            page.add(f"<h2>Outcome: {esc(outcome)}</h2>" if outcome else "<h2>Effect modifiers</h2>")
            section_trace(page, data, outcome)
            cards = section_modifiers(page, data, outcome, ofacts)
            section_forest(page, data, outcome, cards, tag)
            section_calibration(page, data, outcome, tag)
            section_policy(page, data, outcome, ofacts, tag)
            section_marginal(page, data, outcome, ofacts)
    versions = run_info.get("versions", {})
    inputs = ", ".join(f"{k}@v{v}" for k, v in versions.items() if v is not None) or "none"
    header = (
        "<h1>tokens2policy run report</h1>"
        f"<p class='meta'>generated {esc(run_info.get('generated', _dt.datetime.now().isoformat(timespec='seconds')))}"
        f" · data_dir {esc(config.data_path)} · MLflow run {esc(run_info.get('mlflow_run_id', '—'))}</p>"
        f"<p class='meta'>input tables (Delta versions): {esc(inputs)}</p>"
        + ("<div class='missing'><b>Not in this report</b> (stages not run yet, or columns not produced):<ul>"
           + "".join(f"<li>{esc(m)}</li>" for m in all_missing) + "</ul></div>" if all_missing else "")
    )
    page.html = page.render("tokens2policy report", header)  # type: ignore[attr-defined]
    return page
