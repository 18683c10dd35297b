"""The run report: one self-contained HTML page (figures inlined as data URIs and also saved as PNGs).

The page answers first. Its top section, per experiment and outcome, says in words and one picture which direct
effect modifiers NEXIS found (their labels), their GATEs (the forest plot), the recommended targeting policy with its
gain over the baselines (doubly robust, with CIs) and — for the bundled demo — how the selection compares with the
known truth (``demo_drivers`` / ``demo_truth``). The details follow: experiment summary and covariate balance, one
card per modifier (top terms, top examples deduplicated by text, GATE table), the NEXIS selection trace (collapsible),
TOC/Qini curves, policy rules and values, marginal-screening comparison. A part whose table (or column) does not
exist says so instead of failing, so a report can be made after any prefix of the pipeline.

Two slots of the answer are filled by later stages' columns, and stay empty (nothing invented) until they exist:

* **which units an estimate comes from** (selection-aware estimation): a ``estimated_on`` or ``sample`` column in
  ``gates``, ``policy_value`` or ``calibration`` is shown verbatim next to the numbers it qualifies
  (:func:`estimated_on_notes`);
* **heterogeneity coverage** (how much of the detectable heterogeneity the selected modifiers explain): the
  ``coverage`` rows of ``calibration`` (written by the effects stage, ``effects/coverage.py``) are shown as one line
  near the top, as a warning with the strongest unselected features when the share is low (:func:`coverage_summary`).

This module turns tables into plain dicts (the *context*); the HTML is in the Jinja2 templates under
``report/templates/`` (autoescaped: a label or an example text cannot inject markup).
"""
from __future__ import annotations

import base64
import datetime as _dt
import json
import math
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

from tokens2policy.config import Config
from tokens2policy.effects.coverage import coverage_facts
from tokens2policy.report import plots
from tokens2policy.report.load import ReportData, TruthCounts, feature_key, pick, trailing_int

BASELINES = ("treat_all", "treat_none", "random_same_budget")
BASELINE_WORDS = {"treat_all": "treating everyone", "treat_none": "treating no one",
                  "random_same_budget": "treating the same share at random"}


# ---------------------------------------------------------------------------------------------- numbers as text
def fmt(x: Any, digits: int = 3) -> str:
    """Numbers to short text: fixed decimals, scientific notation when small; "—" for missing."""
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


def signed(x: Any, digits: int = 3) -> str:
    """``fmt`` with an explicit sign: +0.125, −1.500."""
    text = fmt(x, digits)
    if text == "—" or text.startswith("-"):
        return text.replace("-", "−", 1)
    return "+" + text


def ci(lo: Any, hi: Any) -> str:
    return f"[{fmt(lo)}, {fmt(hi)}]"


def ci_list(df: pd.DataFrame) -> List[str]:
    """The ``[ci_low, ci_high]`` text of every row ("—" when the table has no CI columns)."""
    if "ci_low" not in df.columns or "ci_high" not in df.columns:
        return ["—"] * len(df)
    return [ci(a, b) for a, b in zip(df["ci_low"], df["ci_high"])]


def finite(x: Any) -> bool:
    try:
        return x is not None and not isinstance(x, (bool, np.bool_)) and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------- cells and tables
def _text(v: Any) -> str:
    if isinstance(v, np.ndarray):
        v = v.tolist()
    if isinstance(v, (list, tuple)):
        return ", ".join(_text(x) for x in v)
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_text(x)}" for k, x in v.items())
    if isinstance(v, float) and math.isnan(v):
        return ""
    return "" if v is None else str(v)


def _is_number(v: Any) -> bool:
    return isinstance(v, (float, int, np.floating, np.integer)) and not isinstance(v, (bool, np.bool_))


def json_pairs(v: Any) -> Optional[List[List[str]]]:
    """A JSON object cell (``{"reason": "rare"}``) as [[key, value], ...] to show as a key/value list; None when
    ``v`` is not a JSON object. An empty object gives []."""
    if isinstance(v, dict):
        obj = v
    elif isinstance(v, str) and v.strip().startswith("{"):
        try:
            obj = json.loads(v)
        except ValueError:
            return None
        if not isinstance(obj, dict):
            return None
    else:
        return None
    return [[str(k), fmt(x) if _is_number(x) else _text(x)] for k, x in obj.items() if x not in (None, "", [], {})]


def cell(v: Any) -> Dict[str, Any]:
    if isinstance(v, (bool, np.bool_)):
        return {"text": fmt(v), "num": False}
    pairs = json_pairs(v)
    if pairs is not None:
        return {"kv": pairs}
    if _is_number(v):
        return {"text": fmt(v), "num": True}
    return {"text": _text(v), "num": False}


def _is_count(column: Any) -> bool:
    """Columns of counts (shown without decimals even when a null made pandas store them as floats)."""
    name = str(column)
    return name in ("n", "round", "round_added", "leaf_id", "seq", "rows") or name.startswith("n_")


def _as_count(v: Any) -> Any:
    return int(v) if isinstance(v, (float, np.floating)) and math.isfinite(v) and float(v).is_integer() else v


def table(df: Optional[pd.DataFrame], columns: Optional[Sequence[str]] = None, max_rows: int = 200) -> Dict[str, Any]:
    """A table context for the ``table`` macro: the given columns that exist (all when None), at most max_rows."""
    if df is None or df.empty:
        return {"columns": [], "rows": [], "more": 0}
    cols = [c for c in (columns or df.columns) if c in df.columns]
    counts = {c for c in cols if _is_count(c)}
    rows = [[cell(_as_count(r[c]) if c in counts else r[c]) for c in cols]
            for _, r in df[cols].head(max_rows).iterrows()]
    return {"columns": cols, "rows": rows, "more": max(0, len(df) - max_rows)}


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


def distinct_examples(docs: Sequence[Any], n: int, chars: int) -> List[Dict[str, Any]]:
    """The first ``n`` distinct example texts (compared with whitespace collapsed and case folded), each with how
    many of the listed top units had that text: several units often read the same article."""
    seen: Dict[str, Dict[str, Any]] = {}
    for d in docs:
        text = example_text(d)
        key = " ".join(text.split()).casefold()
        if not key:
            continue
        if key in seen:
            seen[key]["n_units"] += 1
        else:
            seen[key] = {"text": text[:chars] + ("…" if len(text) > chars else ""), "n_units": 1}
    return list(seen.values())[:n]


# ---------------------------------------------------------------------------------------------- page
class Page:
    """Collects the figures and the headline numbers (``facts``) of one report while its context is built."""

    def __init__(self, config: Config, out_dir: Path):
        self.config = config
        self.out = out_dir
        self.figures: List[Path] = []
        self.facts: Dict[str, Any] = {"experiments": {}}
        self.html = ""

    def figure(self, path: Optional[Path], alt: str) -> Optional[Dict[str, str]]:
        """A figure context (inlined PNG) or None when there was nothing to draw."""
        if path is None:
            return None
        self.figures.append(path)
        return {"alt": alt, "name": path.name, "data": base64.b64encode(path.read_bytes()).decode()}


def template_env():
    """The Jinja2 environment of the report templates (package data), autoescaping HTML."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("tokens2policy.report", "templates"),
                             autoescape=jinja2.select_autoescape(["html", "j2"], default=True),
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(fmt=fmt, signed=signed, pct=lambda x, d=1: fmt(100 * float(x), d) + "%" if finite(x) else "—")
    return env


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


def neuron_id(feature: Any) -> Optional[int]:
    key = feature_key(feature)
    digits = key if key.isdigit() else trailing_int(key)
    return None if digits is None else int(digits)


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


def contrast_sides(group: Any) -> Optional[List[str]]:
    """A GATE contrast's two groups: "active - inactive" → ["active", "inactive"] (None when not "a - b")."""
    parts = re.split(r"\s+[-−]\s+", str(group), maxsplit=1)
    return parts if len(parts) == 2 else None


def is_contrast(group: Any) -> bool:
    return any(s in str(group) for s in (" - ", " − ", "diff"))


def gates_of(gates: Optional[pd.DataFrame], feature: str) -> Optional[pd.DataFrame]:
    """The GATE rows of one feature (matching ``12`` with ``neuron_12``); None without a gates table."""
    if gates is None or "feature" not in gates.columns:
        return None
    g = gates[gates["feature"].map(feature_key) == feature]
    if g.empty and trailing_int(feature):
        g = gates[gates["feature"].map(lambda x: trailing_int(feature_key(x))) == trailing_int(feature)]
    return g


def _record(row: pd.Series, keys: Sequence[str]) -> Dict[str, Any]:
    """The given fields of a row as plain Python values (None for a column the table does not have)."""
    out = {}
    for k in keys:
        v = row[k] if k in row.index else None
        out[k] = v.item() if hasattr(v, "item") else v
    return out


GATE_FIELDS = ("feature", "group", "split", "n", "n_treated", "estimate", "se", "ci_low", "ci_high", "p_value")


# ---------------------------------------------------------------------------------------------- details
def experiment_summary(page: Page, data: ReportData, facts: Dict[str, Any]) -> Dict[str, Any]:
    ctx: Dict[str, Any] = {"units": None, "missing": [], "ate": None, "balance": None, "quarantine": None}
    u = data.units
    if u is None:
        ctx["missing"].append("table 'units' (ingest has not run): no experiment summary or balance table")
    else:
        facts.update(n_units=u.n_units, n_treated=u.n_treated)
        ctx["units"] = {"n_units": u.n_units, "n_treated": u.n_treated, "treated_share": u.treated_share,
                        "n_clusters": u.n_clusters, "n_folds": u.n_folds}
        if u.outcomes:
            rows = []
            for s in u.outcomes:
                d = s.difference()
                facts.setdefault("ate", {})[s.column] = d
                rows.append({"outcome": s.column, "mean control": s.mean.get(0), "mean treated": s.mean.get(1),
                             "ATE": d["estimate"], "SE": d["se"], "95% CI": ci(d["ci_low"], d["ci_high"])})
            ctx["ate"] = table(pd.DataFrame(rows))
        else:
            ctx["missing"].append("no numeric outcome column in 'units' (source.outcome_cols)")
        if u.covariates:
            warn = page.config.ingest.smd_warn
            rows = [{"covariate": s.column, "mean control": s.mean.get(0), "mean treated": s.mean.get(1),
                     "SD control": math.sqrt(s.var.get(0, float("nan"))),
                     "SD treated": math.sqrt(s.var.get(1, float("nan"))), "SMD": s.smd(),
                     f"|SMD| > {fmt(warn, 2)}": abs(s.smd()) > warn} for s in u.covariates]
            facts["balance"] = {r["covariate"]: r["SMD"] for r in rows}
            ctx["balance"] = table(pd.DataFrame(rows))
        else:
            ctx["missing"].append("no numeric covariate columns in 'units'")
    q = data.get("quarantine")
    if q is not None:
        rc = pick(q, "reason")
        facts["quarantined"] = len(q)
        ctx["quarantine"] = {"n": len(q), "by_reason": table(q.groupby(rc).size().rename("rows").reset_index())
                             if rc and len(q) else None}
    return ctx


def modifier_cards(page: Page, data: ReportData, outcome: Optional[str]) -> Dict[str, Any]:
    """One card per selected modifier: label, statistics, top terms, distinct top examples, its GATE rows.
    Returns {"cards": [...], "missing": [...], "present": bool}; the cards also go to the facts."""
    mods = _for_outcome(data.get("modifiers"), outcome)
    gates = _for_outcome(data.get("gates"), outcome)
    lookup = neuron_lookup(data.get("neuron_labels"))
    ctx: Dict[str, Any] = {"present": mods is not None, "cards": [], "missing": []}
    if mods is None:
        ctx["missing"].append("table 'modifiers' (identify has not run)")
        return ctx
    if data.get("neuron_labels") is None:
        ctx["missing"].append("table 'neuron_labels' (represent has not run): no top examples")
    if gates is None:
        ctx["missing"].append("table 'gates' (effects has not run): no GATEs")
    pcol, tcol = pvalue_col(mods), tstat_col(mods)
    rep = page.config.report
    for _, r in (mods.sort_values("round_added", kind="stable") if "round_added" in mods.columns else mods).iterrows():
        row = r.to_dict()
        is_covariate = str(row.get("kind")) == "W" or str(row.get("source")) == "covariate"
        neuron = None if is_covariate else neuron_row(lookup, row.get("feature"))
        label = modifier_label(row, neuron)
        if is_covariate and label.startswith("feature "):
            label = f"covariate {feature_key(row.get('feature'))}"
        t = row.get(tcol) if tcol else None
        direction = row.get("direction") or (("+" if t > 0 else "−") if finite(t) else "")
        card = {"feature": feature_key(row.get("feature")), "label": label,
                "p_value": row.get(pcol) if pcol else None, "t": t, "direction": direction,
                "negative": str(direction).startswith(("-", "−", "neg", "dec")),
                "kind": row.get("kind"), "round_added": row.get("round_added"), "gates": [], "terms": [],
                "examples": [], "gates_table": None, "gates_missing": None}
        if neuron is not None:
            card["terms"] = [str(x) for x in as_list(neuron.get("top_terms"))[:15]]
            docs = as_list(next((neuron[k] for k in ("top_docs", "top_examples", "examples") if k in neuron), None))
            card["examples"] = distinct_examples(docs, rep.n_examples, rep.example_chars)
        g = gates_of(gates, card["feature"])
        if g is not None:
            if g.empty:
                card["gates_missing"] = f"no GATE rows for feature {card['feature']}"
            else:
                # the contrast first, then the groups, then the joint model's interaction rows
                g = g.iloc[sorted(range(len(g)), key=lambda i: (_gate_rank(g.iloc[i]), i))]
                card["gates"] = g.to_dict("records")
                card["gates_table"] = table(g.assign(**{"95% CI": ci_list(g)}),
                                            ["group", "split", "n", "n_treated", "estimate", "se", "95% CI",
                                             "p_value", "estimated_on", "sample"])
        ctx["cards"].append(card)
    return ctx


def _gate_rank(row: pd.Series) -> int:
    if is_contrast(row.get("group")):
        return 0
    return 2 if str(row.get("split")) == "joint" else 1


def _facts_card(card: Dict[str, Any]) -> Dict[str, Any]:
    keep = ("feature", "label", "p_value", "t", "direction", "gates")
    return {k: card[k] for k in keep}


TRACE_COLUMNS = ("phase", "round", "step", "action", "feature", "label", "kind", "t", "p_value", "threshold",
                 "n_candidates", "n_tested", "n_eligible", "gate2_ref", "reason", "detail")
TRACE_HIDDEN = ("experiment_id", "outcome", "collinear", "seq", "index")
ACTION_WORDS = {"add": "added", "drop": "dropped", "keep": "kept", "selected": "selected (final)",
                "stop_gate1": "stopped by Gate 1", "stop_gate2": "stopped by Gate 2", "stop_empty": "no candidate left",
                "stop_df": "stopped: too few degrees of freedom", "max_rounds": "stopped at max_rounds",
                "skip": "skipped"}


def selection_trace(page: Page, data: ReportData, outcome: Optional[str], labels: Dict[str, str]) -> Dict[str, Any]:
    """The NEXIS decisions: a one-line count per action, then the decisions table (details as key/value lists,
    labels next to feature ids) inside a collapsed <details>."""
    tr = _for_outcome(data.get("selection_trace"), outcome)
    if tr is None:
        return {"present": False, "missing": "table 'selection_trace' (identify has not run)"}
    if "seq" in tr.columns:
        tr = tr.sort_values("seq", kind="stable")
    elif "round" in tr.columns:
        tr = tr.sort_values("round", kind="stable")
    shown = tr[tr["action"].astype(str) != "skip"] if "action" in tr.columns else tr
    if "feature" in shown.columns and labels:
        shown = shown.assign(label=[labels.get(feature_key(f), "") for f in shown["feature"]])
    counts = []
    if "action" in tr.columns:
        for action, n in tr["action"].astype(str).value_counts(sort=False).items():
            counts.append(f"{ACTION_WORDS.get(action, action)}: {fmt(int(n))}")
    order = [c for c in TRACE_COLUMNS if c in shown.columns]
    order += [c for c in shown.columns if c not in order and c not in TRACE_HIDDEN]
    return {"present": True, "n_rows": len(tr), "n_shown": len(shown), "n_skip": len(tr) - len(shown),
            "counts": counts, "table": table(shown, order, max_rows=page.config.report.max_trace_rows)}


def forest_rows(gates: pd.DataFrame, cards: List[dict]):
    """The rows of the answer's picture, as (frame with name/estimate/ci_low/ci_high, x-axis label, contrasts?).

    One row per selected modifier: its GATE contrast (e.g. active − inactive), largest first — the per-group GATEs
    are in each modifier's card. Without contrast rows: every GATE row of the selected modifiers in order of
    selection, then any other rows of ``gates``."""
    labels: Dict[Any, str] = {}
    order: List[Any] = []
    for c in cards:
        g = gates_of(gates, c["feature"])
        for i in (g.index if g is not None else []):
            labels.setdefault(i, c["label"])
            order += [i] if i not in order else []
    groups = gates["group"].astype(str) if "group" in gates.columns else pd.Series("", index=gates.index)
    contrast = [i for i in order if is_contrast(groups[i])]
    if contrast:
        g = gates.loc[contrast].sort_values("estimate", ascending=False, kind="stable")
        same = groups[g.index].nunique() == 1
        names = [labels[i] if same else f"{labels[i]} · {groups[i]}" for i in g.index]
        xlabel = (f"effect difference, {groups[g.index[0]].replace(' - ', ' − ')} (95% CI)" if same
                  else "effect difference (95% CI)")
    else:
        g = gates.loc[order + [i for i in gates.index if i not in order]]
        features = g["feature"] if "feature" in g.columns else pd.Series("", index=g.index)
        names = [f"{labels.get(i, feature_key(features[i]))} · {groups[i]}" for i in g.index]
        xlabel = "effect (95% CI)"
    rows = pd.DataFrame({"name": names, "estimate": g["estimate"].to_numpy(float),
                         "ci_low": g["ci_low"].to_numpy(float), "ci_high": g["ci_high"].to_numpy(float)})
    return rows, xlabel, bool(contrast)


def forest_figure(page: Page, data: ReportData, outcome: Optional[str], cards: List[dict], tag: str):
    """The answer's picture (:func:`forest_rows`) as a forest plot. Returns (figure or None, missing note or None,
    note)."""
    gates = _for_outcome(data.get("gates"), outcome)
    if gates is None:
        return None, "table 'gates' (effects has not run)", None
    if not {"estimate", "ci_low", "ci_high"} <= set(gates.columns):
        return None, "table 'gates' lacks estimate/ci_low/ci_high", None
    rows, xlabel, contrasts = forest_rows(gates, cards)
    shown = rows.head(page.config.report.max_forest_rows)
    what = "GATE contrasts of the selected modifiers" if contrasts else "GATEs with 95% CIs"
    path = plots.forest_plot(shown["name"], shown["estimate"], shown["ci_low"], shown["ci_high"],
                             page.out / f"gates_forest_{tag}.png", what + (f" — {outcome}" if outcome else ""),
                             xlabel=xlabel)
    note = f"first {len(shown)} of {len(rows)} rows shown" if len(rows) > len(shown) else None
    return page.figure(path, "GATE forest plot"), None if path else "GATE forest plot: nothing to plot", note


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


def calibration(page: Page, data: ReportData, outcome: Optional[str], tag: str) -> Dict[str, Any]:
    ctx: Dict[str, Any] = {"figure": None, "missing": [], "table": None}
    cal = _for_outcome(data.get("calibration"), outcome)
    curves = _curves(data, outcome)
    if curves is None:
        ctx["missing"].append("TOC/Qini curve points (calibration rows with metric toc/qini per q)")
    else:
        group = "learner" if "learner" in curves.columns and curves["learner"].nunique() > 1 else None
        path = plots.curves_plot(curves, page.out / f"toc_qini_{tag}.png",
                                 f"Rank-weighted ATE curves{' — ' + outcome if outcome else ''}", group_col=group)
        ctx["figure"] = page.figure(path, "TOC and Qini curves")
    if cal is None:
        ctx["missing"].append("table 'calibration' (effects has not run)")
    elif "metric" in cal.columns:
        # curve points (toc/qini per q) are drawn above; the table keeps the scalar rows (BLP, GATES, AUTOC, ...)
        is_curve = cal["metric"].astype(str).str.lower().isin(CURVE_METRICS)
        if "q" in cal.columns:
            is_curve &= cal["q"].notna()
        elif "group" in cal.columns:
            is_curve &= pd.to_numeric(cal["group"], errors="coerce").notna()
        scalar = cal[~is_curve]
        ctx["table"] = table(scalar.assign(**{"95% CI": ci_list(scalar)}),
                             ["learner", "metric", "group", "estimate", "se", "95% CI", "p_value", "null",
                              "null_hypothesis", "n", "estimated_on", "sample"])
    return ctx


def _value_levels(v: pd.DataFrame) -> pd.DataFrame:
    if "comparison" not in v.columns:
        return v
    return v[v["comparison"].isna() | v["comparison"].astype(str).isin(["", "value", "none", "None"])]


def policy_details(page: Page, data: ReportData, outcome: Optional[str], facts: Dict[str, Any],
                   tag: str) -> Dict[str, Any]:
    ctx: Dict[str, Any] = {"missing": [], "rules": None, "value": None, "figure": None, "assignments": None}
    rules = _for_outcome(data.get("policy_rules"), outcome)
    value = _for_outcome(data.get("policy_value"), outcome)
    if rules is None:
        ctx["missing"].append("table 'policy_rules' (policy has not run)")
    else:
        ctx["rules"] = table(rules, [c for c in rules.columns if c not in ("experiment_id", "outcome")])
    if value is None:
        ctx["missing"].append("table 'policy_value' (policy has not run)")
    elif {"policy", "estimate"} <= set(value.columns):
        facts["policy_value"] = value.to_dict("records")
        ctx["value"] = table(value.assign(**{"95% CI": ci_list(value)}),
                             ["learner", "policy", "comparison", "treated_share", "estimate", "se", "95% CI",
                              "p_value", "n", "cost", "estimated_on", "sample"])
        levels = _value_levels(value)
        if not levels.empty:
            learners = levels["learner"] if "learner" in levels else [None] * len(levels)
            names = [f"{p} ({l})" if isinstance(l, str) and l else str(p) for p, l in zip(levels["policy"], learners)]
            nan = np.full(len(levels), np.nan)
            path = plots.value_plot(names, levels["estimate"], levels["ci_low"] if "ci_low" in levels else nan,
                                    levels["ci_high"] if "ci_high" in levels else nan,
                                    page.out / f"policy_value_{tag}.png",
                                    f"Policy value{' — ' + outcome if outcome else ''}")
            ctx["figure"] = page.figure(path, "policy value vs baselines")
    else:
        ctx["missing"].append("table 'policy_value' lacks policy/estimate columns")
    a = data.get("assignments")
    if a is not None:
        ctx["assignments"] = table(_for_outcome(a, outcome))
    return ctx


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


def marginal(page: Page, data: ReportData, outcome: Optional[str], facts: Dict[str, Any]) -> Dict[str, Any]:
    alpha = page.config.report.alpha
    res = marginal_comparison(data, outcome, alpha)
    if res is None:
        return {"present": False, "missing": "table 'marginal_screen' (identify has not run)"}
    facts["marginal"] = res
    rows = []
    for name, title in (("raw", "unadjusted p ≤ α"), ("bonferroni", "Bonferroni"), ("bh", "Benjamini–Hochberg")):
        r = res.get(name)
        if r is not None:
            rows.append({"marginal test": title, "flagged": r["flagged"], "also selected by NEXIS":
                         r["selected_flagged"], "proxies (flagged, not selected)": r["proxies"]})
    b = res.get("bonferroni") or res.get("raw")
    return {"present": True, "alpha": alpha, "n_features": res["n_features"], "n_selected": res["n_selected"],
            "table": table(pd.DataFrame(rows)) if rows else None,
            "proxies": b["proxy_features"][:30] if b else [],
            "proxies_rule": "Bonferroni" if res.get("bonferroni") else "raw"}


# ---------------------------------------------------------------------------------------------- the answer
def recommended_policy(data: ReportData, outcome: Optional[str], config: Config) -> Optional[Dict[str, Any]]:
    """The recommended policy and its value and gains over the baselines, from ``policy_value``.

    Which policy is recommended: the one flagged ``recommended`` in ``assignments`` (what the policy stage ran
    with), else ``policy.recommended`` of this config when that policy is in the table, else the only learned
    (non-baseline) policy. Its rules come from ``policy_rules``."""
    value = _for_outcome(data.get("policy_value"), outcome)
    if value is None or not {"policy", "estimate"} <= set(value.columns):
        return None
    learned = [p for p in value["policy"].astype(str).unique() if p not in BASELINES]
    name, why = None, ""
    a = _for_outcome(data.get("assignments"), outcome)
    if a is not None and {"policy", "recommended"} <= set(a.columns):
        flagged = a.loc[a["recommended"].fillna(False).astype(bool), "policy"].astype(str).unique()
        if len(flagged) == 1 and flagged[0] in learned:
            name, why = flagged[0], "the policy stage's recommended policy"
    if name is None and config.policy.recommended in learned:
        name, why = config.policy.recommended, "policy.recommended"
    if name is None and len(learned) == 1:
        name, why = learned[0], "the only learned policy"
    if name is None:
        return None
    rows = value[value["policy"].astype(str) == name]
    if "learner" in rows.columns and rows["learner"].nunique() > 1:
        prefer = config.policy.learner if config.policy.learner in set(rows["learner"]) else rows["learner"].iloc[0]
        rows = rows[rows["learner"] == prefer]
    keys = ("estimate", "se", "ci_low", "ci_high", "p_value", "treated_share", "n")
    level = _value_levels(rows)
    out: Dict[str, Any] = {"policy": name, "why": why, "learner": rows["learner"].iloc[0] if "learner" in rows else None,
                           "value": _record(level.iloc[0], keys) if not level.empty else None, "gains": [],
                           "rules": [], "treated_share": None}
    if out["value"] is not None:
        out["treated_share"] = out["value"]["treated_share"]
    if "comparison" in rows.columns:
        for _, r in rows.iterrows():
            comp = str(r["comparison"])
            if comp.startswith("minus "):
                base = comp[len("minus "):]
                gain = _record(r, keys)
                gain.update(baseline=base, words=BASELINE_WORDS.get(base, base),
                            excludes_zero=finite(gain.get("ci_low")) and finite(gain.get("ci_high"))
                            and (gain["ci_low"] > 0 or gain["ci_high"] < 0))
                out["gains"].append(gain)
    # the gain the headline quotes: over treating everyone (the default without a targeting rule)
    out["headline_gain"] = next((g for g in out["gains"] if g["baseline"] == "treat_all"),
                                out["gains"][0] if out["gains"] else None)
    rules = _for_outcome(data.get("policy_rules"), outcome)
    if rules is not None and "rule" in rules.columns:
        mine = rules[rules["policy"].astype(str) == name] if "policy" in rules.columns else rules
        if "learner" in mine.columns and out["learner"] is not None and (mine["learner"] == out["learner"]).any():
            mine = mine[mine["learner"] == out["learner"]]
        out["rules"] = [str(r) for r in mine["rule"].head(8)]
    return out


def _topic_of(term: str) -> Optional[str]:
    """``topic=sport`` → ``sport``; None for a driver that is not a topic indicator."""
    key, sep, value = str(term).partition("=")
    return value.strip() if sep and key.strip() == "topic" else None


def truth_comparison(truth: Optional[TruthCounts], drivers: Optional[pd.DataFrame], cards: List[dict],
                     aligned_share: float) -> Optional[Dict[str, Any]]:
    """For the demo: which true modifiers (``demo_drivers`` rows with role effect_modifier) the selection found.

    A selected neuron is *aligned* with a topic when P(topic | neuron active) > ``aligned_share`` over the
    experiment's units — the rule of the validation study's text design (``validate/text.py``). A true topic
    modifier is found when some selected neuron is aligned with it; a selected feature aligned with no true
    modifier (or a selected covariate: the demo's covariates only shift the outcome level) is listed as such.
    """
    if drivers is None or not {"role", "term", "coefficient"} <= set(drivers.columns):
        return None
    if drivers.empty or truth is None:  # not a demo experiment (drivers are per experiment), or no counts
        return None
    true_rows = drivers[drivers["role"].astype(str) == "effect_modifier"]
    both = truth.both if truth is not None else pd.DataFrame(columns=["neuron", "topic", "n"])
    sizes = truth.topics if truth is not None else pd.DataFrame(columns=["topic", "n"])
    topic_n = {str(t): int(n) for t, n in zip(sizes.get("topic", []), sizes.get("n", []))}
    per_neuron: Dict[int, Dict[str, int]] = {}
    for nid, topic, n in zip(both.get("neuron", []), both.get("topic", []), both.get("n", [])):
        per_neuron.setdefault(int(nid), {})[str(topic)] = int(n)
    aligned: Dict[str, List[Dict[str, Any]]] = {}
    others: List[Dict[str, Any]] = []
    true_topics = {_topic_of(t) for t in true_rows["term"]} - {None}
    for c in cards:
        nid = None if str(c.get("kind")) == "W" else neuron_id(c["feature"])
        counts = per_neuron.get(nid, {}) if nid is not None else {}
        active = sum(counts.values())
        best = max(counts, key=counts.get) if counts else None
        precision = counts[best] / active if best else float("nan")
        entry = {"label": c["label"], "feature": c["feature"], "topic": best, "precision": precision,
                 "recall": counts[best] / topic_n[best] if best and topic_n.get(best) else float("nan"),
                 "n_active": active}
        share = f"{fmt(100 * precision, 0)}% of its active units"
        if nid is None:
            others.append({**entry, "why": "a covariate (the demo's covariates only shift the outcome level)"})
        elif not active:
            others.append({**entry, "why": "never active on the demo's units"})
        elif precision <= aligned_share:
            others.append({**entry, "why": f"aligned with no topic (most often {best}: {share})"})
        elif best not in true_topics:
            others.append({**entry, "why": f"aligned with {best} ({share}), which is not a true modifier"})
        else:
            aligned.setdefault(best, []).append(entry)
    terms = []
    for _, r in true_rows.iterrows():
        topic = _topic_of(r["term"])
        found = aligned.get(topic, []) if topic else []
        terms.append({"term": str(r["term"]), "coefficient": float(r["coefficient"]), "neurons": found,
                      "found": bool(found), "comparable": topic is not None})
    return {"terms": terms, "others": others, "n_true": len(terms), "n_found": sum(t["found"] for t in terms),
            "n_other": len(others), "aligned_share": aligned_share}


def coverage_summary(data: ReportData, outcome: Optional[str]) -> Optional[Dict[str, Any]]:
    """Heterogeneity coverage (issue 18): how much of the heterogeneity detectable on held-out folds the selected
    modifiers explain, from the ``coverage`` rows of ``calibration`` (:func:`~tokens2policy.effects.coverage.
    coverage_facts`: share with CI, warning, the residual features with their labels). None without those rows."""
    from tokens2policy.effects.coverage import coverage_facts

    labels = {f"neuron_{k}": str(r.get("label")) for k, r in neuron_lookup(data.get("neuron_labels")).items()}
    return coverage_facts(_for_outcome(data.get("calibration"), outcome), labels)


ESTIMATED_ON_COLUMNS = ("estimated_on", "sample")
ROLE_WORDS = {  # the honesty roles the stages write (tokens2policy.honesty), as the page says them
    "estimation": "the estimation units, none of which selected the modifiers",
    "all": "all units, the same that selected the modifiers: NOT selection-aware (honesty.mode=none)",
}


def estimated_on_notes(data: ReportData, outcome: Optional[str]) -> List[str]:
    """Which units the GATEs, policy values and calibration were estimated on (selection-aware estimation,
    docs/effects.md §0), from the ``estimated_on`` / ``sample`` column of those tables: the stages' role names
    (``estimation``, ``all``) in words, any other value verbatim; nothing for a table without such a column."""
    notes = []
    for name, what in (("gates", "GATEs"), ("policy_value", "policy values"), ("calibration", "calibration")):
        df = _for_outcome(data.get(name), outcome)
        col = pick(df, *ESTIMATED_ON_COLUMNS)
        if df is None or col is None:
            continue
        values = [str(v) for v in df[col].dropna().unique() if str(v).strip()]
        if values:
            notes.append(f"{what}: estimated on {', '.join(ROLE_WORDS.get(v, v) for v in values)}")
    return notes


def identify_settings(mods: Optional[pd.DataFrame]) -> str:
    """"test gcm, FWER at α = 0.05" from the modifiers table's test/adjust/alpha columns (empty if absent)."""
    if mods is None or mods.empty:
        return ""
    first = mods.iloc[0]
    parts = []
    if "test" in mods.columns and isinstance(first["test"], str):
        parts.append(f"test {first['test']}")
    if "alpha" in mods.columns and finite(first["alpha"]):
        adjust = first["adjust"] if "adjust" in mods.columns and isinstance(first["adjust"], str) else "unadjusted"
        parts.append(f"{adjust} at α = {fmt(first['alpha'], 2)}")
    return ", ".join(parts)


def answer(page: Page, data: ReportData, outcome: Optional[str], cards_ctx: Dict[str, Any], tag: str,
           ofacts: Dict[str, Any]) -> Dict[str, Any]:
    """The top of the page for one outcome: modifiers with their GATE contrast, the forest plot, the recommended
    policy and its gains, the demo's truth comparison and the two slots."""
    cards = cards_ctx["cards"]
    mods = []
    for c in cards:
        contrast = next((g for g in c["gates"] if is_contrast(g.get("group"))), None)
        contrast = None if contrast is None else {k: contrast.get(k) for k in GATE_FIELDS}
        if contrast is not None:
            contrast["sides"] = contrast_sides(contrast["group"])
        mods.append({"label": c["label"], "feature": c["feature"], "negative": c["negative"],
                     "contrast": contrast, "p_value": c["p_value"]})
    figure, fig_missing, fig_note = forest_figure(page, data, outcome, cards, tag)
    policy = recommended_policy(data, outcome, page.config)
    if policy is not None:
        ofacts["recommended_policy"] = policy
    truth, truth_missing, policy_missing = None, None, None
    modifiers_missing = None if cards_ctx["present"] else cards_ctx["missing"][0]
    drivers = data.get("demo_drivers")
    if drivers is not None:
        from tokens2policy.validate.text import TextDesign

        truth = truth_comparison(data.truth, drivers, cards, TextDesign().aligned_share)
        if truth is None and not drivers.empty and cards:
            truth_missing = "the comparison with the demo's truth needs tables 'neurons' and 'demo_truth'"
        if truth is not None:
            ofacts["truth"] = {k: truth[k] for k in ("n_true", "n_found", "n_other")}
            ofacts["truth"]["found"] = [t["term"] for t in truth["terms"] if t["found"]]
    if policy is None:
        value = _for_outcome(data.get("policy_value"), outcome)
        policy_missing = ("table 'policy_value' (policy has not run)" if value is None else
                          "no rows in 'policy_value' for this experiment (the policy stage has not run on it)"
                          if value.empty else "no recommended policy in 'policy_value'")
    coverage = coverage_summary(data, outcome)
    ofacts["coverage"] = coverage  # the run summary prints its line
    ups = [(m["contrast"]["estimate"] >= 0) if m["contrast"] and finite(m["contrast"]["estimate"])
           else not m["negative"] for m in mods]
    return {"outcome": outcome, "present": cards_ctx["present"], "n_selected": len(cards), "modifiers": mods,
            "n_up": sum(ups), "n_down": len(ups) - sum(ups),
            "settings": identify_settings(_for_outcome(data.get("modifiers"), outcome)),
            "forest": figure, "forest_missing": fig_missing, "forest_note": fig_note, "policy": policy,
            "truth": truth, "coverage": coverage,
            "estimated_on": estimated_on_notes(data, outcome), "modifiers_missing": modifiers_missing,
            "policy_missing": policy_missing, "truth_missing": truth_missing}


# ---------------------------------------------------------------------------------------------- the page
def build_page(config: Config, datasets: List[ReportData], out_dir: Path, run_info: Dict[str, Any]) -> Page:
    """Build the context of every experiment and outcome, render ``report.html.j2`` into ``page.html``."""
    page = Page(config, out_dir)
    page.facts["missing"] = sorted({m for d in datasets for m in d.missing})
    experiments = []
    for data in datasets:
        exp = data.experiment_id or ""
        facts = page.facts["experiments"].setdefault(exp, {})
        ctx: Dict[str, Any] = {"id": exp, "title": exp or "(all rows)", "slug": _slug(exp or "all"),
                               "summary": experiment_summary(page, data, facts), "outcomes": []}
        for outcome in _outcomes(data):
            ofacts = facts.setdefault("outcomes", {}).setdefault(outcome or "", {})
            tag = _slug(f"{exp}_{outcome or 'all'}")
            cards = modifier_cards(page, data, outcome)
            if cards["present"]:
                ofacts["modifiers"] = [_facts_card(c) for c in cards["cards"]]
            labels = {c["feature"]: c["label"] for c in cards["cards"]}
            ctx["outcomes"].append({
                "name": outcome, "tag": tag,
                "answer": answer(page, data, outcome, cards, tag, ofacts),
                "cards": cards,
                "trace": selection_trace(page, data, outcome, labels),
                "calibration": calibration(page, data, outcome, tag),
                "policy": policy_details(page, data, outcome, ofacts, tag),
                "marginal": marginal(page, data, outcome, ofacts),
            })
        experiments.append(ctx)
    versions = run_info.get("versions", {})
    context = {
        "title": "tokens2policy report",
        "generated": run_info.get("generated", _dt.datetime.now().isoformat(timespec="seconds")),
        "data_dir": str(config.data_uri), "mlflow_run_id": run_info.get("mlflow_run_id", "—"),
        "inputs": ", ".join(f"{k}@v{v}" for k, v in versions.items() if v is not None) or "none",
        "missing": page.facts["missing"], "experiments": experiments,
    }
    page.html = template_env().get_template("report.html.j2").render(**context)
    return page
