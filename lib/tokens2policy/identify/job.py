"""The identify stage: ``units`` + ``neurons`` → ``modifiers``, ``selection_trace``, ``marginal_screen``.

Distributed exactly like the in-memory engine: every statistic NEXIS needs is a sum over rows (``stats.Block``),
so :class:`SparkSource` evaluates it per partition with ``mapInPandas`` and sums the partial results on the
driver, where the same selection loop (``engine.run_search``) runs. The GCM poly2 nuisances are fit per fold
from per-fold Gram matrices summed across the cluster (rows grouped by the stored ``fold`` column), so each
fold's out-of-fold fit equals the in-memory one. One Spark job per statistic: moments once, cross-products once
per feature that enters the set, robust meats / GCM passes once per step.

Kinds follow the NEXIS API: ``Z`` = SAE neuron (the ``z`` matrix), ``W`` = structured covariate (``w``); the
``source`` column says ``neuron`` / ``covariate`` unambiguously.
"""
from __future__ import annotations

import json
import pickle
from typing import Dict, List

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .engine import Tester, marginal_from_tester, run_search
from .stats import Block

MODIFIERS_SCHEMA = ("experiment_id string, outcome string, feature string, kind string, source string, label string, "
                    "p_value double, t double, direction string, round_added int, phase string, test string, "
                    "adjust string, alpha double")
TRACE_SCHEMA = ("experiment_id string, outcome string, seq int, phase string, round int, step string, action string, "
                "kind string, feature string, t double, p double, threshold double, gate2_ref double, "
                "n_tested int, n_eligible int, detail string")
MARGINAL_SCHEMA = ("experiment_id string, outcome string, feature string, kind string, t double, p_value double, "
                   "p_bonferroni double, q_bh double, reject_raw boolean, reject_bonferroni boolean, "
                   "reject_bh boolean")


def _add(a, b):
    if a is None:
        return b
    if isinstance(a, dict):
        return {k: a[k] + b[k] for k in a}
    return a + b


def block_from_pandas(pdf: pd.DataFrame, spec: Dict) -> Block:
    """One partition's rows → a Block (neurons as a CSR matrix built from the indices/values arrays)."""
    n = len(pdf)
    idx = [np.asarray(v if v is not None else [], dtype=np.int64) for v in pdf["indices"]]
    val = [np.asarray(v if v is not None else [], dtype=float) for v in pdf["values"]]
    indptr = np.concatenate([[0], np.cumsum([len(v) for v in idx])]).astype(np.int64)
    Z = sp.csr_matrix((np.concatenate(val) if n else np.zeros(0), np.concatenate(idx) if n else np.zeros(0, int),
                       indptr), shape=(n, spec["m"]))
    Z.sum_duplicates()
    W = pdf[spec["covariates"]].to_numpy(dtype=float) if spec["covariates"] else None
    codes = pdf["cluster"].map(spec["cluster_codes"]).to_numpy() if spec.get("cluster_codes") else None
    folds = pdf["fold"].map(spec["fold_codes"]).to_numpy() if spec.get("fold_codes") else None
    return Block(pdf["y"].to_numpy(dtype=float), pdf["treatment"].to_numpy(dtype=float), W, Z, codes, folds)


class SparkSource:
    """A Source whose ``reduce`` is a mapInPandas over the partitions of a DataFrame plus a driver-side sum."""

    blocks: List = []  # no in-memory blocks: nuisance='lgbm' is refused by the Tester

    def __init__(self, df, spec: Dict):
        self.df, self.spec = df, spec
        self.mw = len(spec["covariates"])
        self.M = self.mw + spec["m"]

    def reduce(self, method, *args, **kwargs):
        spec = self.spec

        def partials(batches):
            total = None
            for pdf in batches:
                if len(pdf):
                    total = _add(total, getattr(block_from_pandas(pdf, spec), method)(*args, **kwargs))
            if total is not None:
                yield pd.DataFrame({"payload": [pickle.dumps(total, protocol=4)]})

        total = None
        for row in self.df.mapInPandas(partials, "payload binary").collect():
            total = _add(total, pickle.loads(row["payload"]))
        if total is None:
            raise ValueError("no rows to identify on")
        return total


def _numeric_covariates(units, names):
    from pyspark.sql.types import NumericType

    types = {f.name: f.dataType for f in units.schema.fields}
    return [c for c in names if c in types and isinstance(types[c], NumericType)]


def identify_frame(df, spec, cfg_identify, seed=0):
    """Run NEXIS + the marginal screen on a prepared DataFrame (columns y, treatment, [fold], [cluster],
    covariates, indices, values). Returns (NexisResult, MarginalResult)."""
    ic = cfg_identify
    G = len(spec.get("cluster_codes") or {})
    K = len(spec.get("fold_codes") or {})
    src = SparkSource(df, spec)
    tester = Tester(src, ic.test, G, K, ic.nuisance, seed, with_nnz=True)
    params = dict(alpha=ic.alpha, test=ic.test, adjust=ic.adjust, rho=ic.rho, backward=ic.backward,
                  nuisance=ic.nuisance, max_rounds=ic.max_rounds, min_active=ic.min_active)
    res = run_search(tester, src.mw, alpha=ic.alpha, adjust=ic.adjust, rho=ic.rho, backward=ic.backward,
                     max_rounds=ic.max_rounds, min_active=ic.min_active, params=params)
    mg = marginal_from_tester(tester, src.mw, ic.alpha, ic.min_active)
    return res, mg


def _validate_spark_options(ic, has_fold, has_cluster):
    if ic.test == "gcm" and ic.nuisance != "poly2":
        raise ValueError("the Spark identify job fits GCM nuisances from per-fold Grams: use identify.nuisance=poly2")
    if ic.test == "gcm" and not has_fold:
        raise ValueError("identify.test=gcm needs the stored 'fold' column in units")
    if ic.test == "cluster" and not has_cluster:
        raise ValueError("identify.test=cluster needs a 'cluster' column in units")


def run(spark, cfg) -> dict:
    import mlflow
    from pyspark.sql import functions as F

    from tokens2policy.lakehouse import read_table, table_exists, table_version, write_table
    from tokens2policy.tracking import stage_run

    ic = cfg.identify
    units = read_table(spark, cfg, "units")
    neurons = read_table(spark, cfg, "neurons")
    versions = {name: table_version(spark, cfg, name) for name in ("units", "neurons")}
    has_fold, has_cluster = "fold" in units.columns, "cluster" in units.columns
    _validate_spark_options(ic, has_fold, has_cluster)
    outcomes = [c for c in cfg.source.outcome_cols if c in units.columns] or \
        [c for c in units.columns if c == "outcome"]
    if not outcomes:
        raise ValueError(f"none of the outcome columns {cfg.source.outcome_cols} is in units")
    covariates = _numeric_covariates(units, cfg.source.covariate_cols) if ic.use_covariates else []
    max_idx = neurons.select(F.max(F.array_max("indices"))).first()[0]
    m = 0 if max_idx is None else int(max_idx) + 1
    experiments = sorted(r[0] for r in units.select("experiment_id").distinct().collect())
    mod_rows, trace_rows, marg_rows, summary = [], [], [], {"experiments": {}, "m": m, "covariates": covariates}

    with stage_run(cfg, "identify", inputs=versions):
        for exp in experiments:
            u = units.where(F.col("experiment_id") == exp)
            nz = neurons.where(F.col("experiment_id") == exp).select("unit_id", "indices", "values")
            joined = u.join(nz, "unit_id", "left")
            spec = {"m": m, "covariates": covariates}
            if ic.test == "cluster":
                levels = sorted(str(r[0]) for r in u.select(F.col("cluster").cast("string")).distinct().collect())
                spec["cluster_codes"] = {v: i for i, v in enumerate(levels)}
            if ic.test == "gcm":
                levels = sorted(int(r[0]) for r in u.select("fold").distinct().collect())
                spec["fold_codes"] = {v: i for i, v in enumerate(levels)}
            summary["experiments"][exp] = {}
            for outcome in outcomes:
                cols = [F.col(outcome).cast("double").alias("y"), F.col("treatment").cast("double").alias("treatment"),
                        "indices", "values"] + [F.col(c).cast("double").alias(c) for c in covariates]
                if ic.test == "cluster":
                    cols.append(F.col("cluster").cast("string").alias("cluster"))
                if ic.test == "gcm":
                    cols.append(F.col("fold").cast("int").alias("fold"))
                df = joined.where(F.col(outcome).isNotNull()).select(*cols).cache()
                try:
                    res, mg = identify_frame(df, spec, ic, cfg.seed)
                finally:
                    df.unpersist()
                mod_rows += modifier_rows(exp, outcome, res, covariates, ic)
                trace_rows += trace_table_rows(exp, outcome, res, covariates)
                marg_rows += marginal_rows(exp, outcome, mg, covariates)
                key = f"{exp}.{outcome}"
                mlflow.log_metric(f"n_selected.{_metric(key)}", len(res.selected) + len(res.selected_w))
                mlflow.log_metric(f"n_marginal_bonferroni.{_metric(key)}", int(mg.reject_bonferroni.sum()))
                summary["experiments"][exp][outcome] = {
                    "selected": res.selected.tolist(), "selected_w": [covariates[i] for i in res.selected_w],
                    "pvalues": res.pvalues.tolist(), "converged": res.converged}
        mlflow.log_dict(summary, "identify/summary.json")
        mod_rows = with_neuron_labels(spark, cfg, mod_rows)
        pred = "experiment_id IN (" + ", ".join("'" + str(e).replace("'", "''") + "'" for e in experiments) + ")"
        for name, rows, schema in (("modifiers", mod_rows, MODIFIERS_SCHEMA),
                                   ("selection_trace", trace_rows, TRACE_SCHEMA),
                                   ("marginal_screen", marg_rows, MARGINAL_SCHEMA)):
            out = spark.createDataFrame(rows, schema)
            if table_exists(spark, cfg, name):
                write_table(out, cfg, name, mode="overwrite", replace_where=pred)
            else:
                write_table(out, cfg, name, mode="overwrite")
            summary[f"{name}_rows"] = len(rows)
    return {"experiments": len(experiments), "outcomes": len(outcomes), "modifiers": len(mod_rows),
            "trace_rows": len(trace_rows), "marginal_rows": len(marg_rows)}


def with_neuron_labels(spark, cfg, rows):
    """Fill each selected neuron's label from ``neuron_labels`` (written by represent with ``neurons``);
    a covariate is labelled by its own name."""
    from tokens2policy.lakehouse import read_table, table_exists

    labels = {}
    if table_exists(spark, cfg, "neuron_labels"):
        wanted = sorted({int(r[2]) for r in rows if r[4] == "neuron"})
        if wanted:
            from pyspark.sql import functions as F

            labels = {int(r[0]): r[1] for r in read_table(spark, cfg, "neuron_labels")
                      .where(F.col("neuron").isin(wanted)).select("neuron", "label").collect()}
    return [r[:5] + ((labels.get(int(r[2])) if r[4] == "neuron" else r[2]),) + r[6:] for r in rows]


def _metric(s):
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in s)


def _feature_name(kind, index, covariates):
    return covariates[index] if kind == "W" else str(index)


def modifier_rows(exp, outcome, res, covariates, ic):
    rows = []
    for kind, ids, ps, ts, rounds in (("W", res.selected_w, res.pvalues_w, res.tstats_w, res.round_added_w),
                                      ("Z", res.selected, res.pvalues, res.tstats, res.round_added)):
        for j, p, t, r in zip(ids, ps, ts, rounds):
            rows.append((exp, outcome, _feature_name(kind, int(j), covariates), kind,
                         "covariate" if kind == "W" else "neuron", None, float(p), float(t),
                         "+" if t > 0 else "-", int(r), None, ic.test, ic.adjust, float(ic.alpha)))
    # phase of addition from the trace
    phase = {(x["kind"], x["index"]): x["added_in"][0] for x in res.trace if x["action"] == "selected"}
    out = []
    for r in rows:
        idx = covariates.index(r[2]) if r[3] == "W" else int(r[2])
        out.append(r[:10] + (phase.get((r[3], idx)),) + r[11:])
    return out


def trace_table_rows(exp, outcome, res, covariates):
    rows = []
    core = {"phase", "round", "step", "action", "kind", "feature", "index", "t", "p", "threshold", "gate2_ref",
            "n_tested", "n_eligible"}

    def num(v):
        return None if v is None else float(v)

    for seq, x in enumerate(res.trace):
        kind = x.get("kind")
        feat = None if kind is None else _feature_name(kind, int(x["index"]), covariates)
        detail = {k: v for k, v in x.items() if k not in core}
        rows.append((exp, outcome, seq, x["phase"], int(x["round"]), x["step"], x["action"], kind, feat,
                     num(x.get("t")), num(x.get("p")), num(x.get("threshold")), num(x.get("gate2_ref")),
                     None if x.get("n_tested") is None else int(x["n_tested"]),
                     None if x.get("n_eligible") is None else int(x["n_eligible"]), json.dumps(detail, default=str)))
    return rows


def marginal_rows(exp, outcome, mg, covariates):
    rows = []

    def f(v):
        return None if not np.isfinite(v) else float(v)

    parts = [("Z", mg.tstats, mg.pvalues, mg.p_bonferroni, mg.q_bh)]
    if mg.tstats_w is not None:
        parts.insert(0, ("W", mg.tstats_w, mg.pvalues_w, mg.p_bonferroni_w, mg.q_bh_w))
    for kind, tt, pp, bb, qq in parts:
        for j in range(len(tt)):
            if not np.isfinite(pp[j]):
                continue  # skipped (constant / rare): recorded in selection_trace
            rows.append((exp, outcome, _feature_name(kind, j, covariates), kind, f(tt[j]), f(pp[j]), f(bb[j]),
                         f(qq[j]), bool(pp[j] <= mg.alpha), bool(bb[j] <= mg.alpha), bool(qq[j] <= mg.alpha)))
    return rows
