"""The identify stage: ``units`` + ``neurons`` → ``modifiers``, ``selection_trace``, ``marginal_screen``.

Distributed exactly like the in-memory engine: every statistic NEXIS needs is a sum over rows (``stats.Block``),
so :class:`SparkSource` evaluates it per partition with ``mapInPandas`` and sums the partial results on the
driver, where the same selection loop (``engine.run_search``) runs. The GCM basis-ridge nuisances are fit per fold
from per-fold Gram matrices summed across the cluster (rows grouped by the stored ``fold`` column), so each
fold's out-of-fold fit equals the in-memory one. The GCM LightGBM nuisances have no additive statistics: fold k's
model is trained in one Spark task on the rows of the other folds (``tokens2policy.fold_tasks``, the pattern the
effects stage uses), and a pass over the partitions predicts every row with its own fold's model (see
:meth:`SparkSource.lgbm_nuisances`). One Spark job per pass, a constant number per step whatever |S|: moments once,
cross-products once per feature that enters the set, per forward step one robust meat (hc2 / cluster) or one pass
for both GCM basis nuisances plus one for the GCM sums, per backward evaluation the same passes shared by all |S|
tests (``Tester.each_given_rest``); every pass is recorded (``SparkSource.passes``, the stage summary's
``passes`` / ``pass_by_stat``).

Kinds follow the NEXIS API: ``Z`` = SAE neuron (the ``z`` matrix), ``W`` = structured covariate (``w``); the
``source`` column says ``neuron`` / ``covariate`` unambiguously.
"""
from __future__ import annotations

import json
import pickle
import time
from collections import OrderedDict
from typing import Dict, List

import numpy as np
import pandas as pd
import scipy.sparse as sp

from tokens2policy.execution import choose
from tokens2policy.fold_tasks import run_fold_tasks
from tokens2policy.honesty import selection_filter

from .engine import Source, Tester, marginal_from_tester, pass_record, pass_summary, run_search
from .nuisance import lgbm_fit, predict_out_of_fold, pseudo_outcome
from .stats import Block, combine



def block_from_pandas(pdf: pd.DataFrame, spec: Dict) -> Block:
    """One partition's rows → a Block (neurons as a CSR matrix built from the indices/values arrays)."""
    n = len(pdf)
    # one concatenation of the rows' arrays (Arrow hands them over as numpy arrays; a missing row is None):
    # this runs at every pass over the rows, so no per-row conversion
    icol, vcol = pdf["indices"].to_numpy(), pdf["values"].to_numpy()
    lens = np.fromiter((0 if v is None else len(v) for v in icol), dtype=np.int64, count=n)
    idx = [v for v in icol if v is not None and len(v)]
    val = [v for v in vcol if v is not None and len(v)]
    if sum(len(v) for v in val) != lens.sum():
        raise ValueError("neurons: a row's indices and values differ in length")
    indptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    Z = sp.csr_matrix((np.concatenate(val).astype(float) if idx else np.zeros(0),
                       np.concatenate(idx).astype(np.int64) if idx else np.zeros(0, np.int64), indptr),
                      shape=(n, spec["m"]))
    Z.sum_duplicates()
    W = pdf[spec["covariates"]].to_numpy(dtype=float) if spec["covariates"] else None
    codes = pdf["cluster"].map(spec["cluster_codes"]).to_numpy() if spec.get("cluster_codes") else None
    folds = pdf["fold"].map(spec["fold_codes"]).to_numpy() if spec.get("fold_codes") else None
    return Block(pdf["y"].to_numpy(dtype=float), pdf["treatment"].to_numpy(dtype=float), W, Z, codes, folds)


def _combine_payloads(a, b):
    """Two pickled partial statistics → their pickled sum (``stats.combine``), in an executor."""
    return pickle.dumps(combine(pickle.loads(a), pickle.loads(b)), protocol=4)


class SparkSource:
    """A Source whose ``reduce`` is a mapInPandas over the partitions of a DataFrame plus a sum of the partitions'
    partial statistics: on the driver for up to TREE_ABOVE partitions, else tree-combined in the executors."""

    TREE_ABOVE = 16

    def __init__(self, df, spec: Dict):
        self.df, self.spec = df, spec
        self.mw = len(spec["covariates"])
        self.M = self.mw + spec["m"]
        self.fold_tasks: List[Dict] = []  # layout of every per-fold LightGBM fit job (S size, target, partitions)
        self.passes: List[Dict] = []  # one record per reduce (one Spark job): statistic, seconds

    def reduce(self, method, *args, **kwargs):
        """Sum over partitions of ``Block.<method>(*args, **kwargs)`` — or of ``method(block)`` for a callable."""
        spec = self.spec
        if callable(method):
            stat = method
        else:
            def stat(block):
                return getattr(block, method)(*args, **kwargs)

        whole = bool(spec.get("cluster_codes"))

        def partials(batches):
            total = None
            if whole:  # the cluster statistics need each cluster whole: one Block per partition (see run())
                batches = [pd.concat([b for b in batches if len(b)] or [pd.DataFrame()], ignore_index=True)]
            for pdf in batches:
                if len(pdf):
                    total = combine(total, stat(block_from_pandas(pdf, spec)))
            if total is not None:
                yield pd.DataFrame({"payload": [pickle.dumps(total, protocol=4)]})

        t0 = time.perf_counter()
        payloads = self.df.mapInPandas(partials, "payload binary").rdd.map(lambda r: r[0])
        if payloads.getNumPartitions() > self.TREE_ABOVE:
            # many partitions: partial sums combined in the executors first (one job, a shuffle between levels),
            # so the driver receives ~sqrt(partitions) payloads, not one per partition (a GCM forward step's
            # payload is M x K x q numbers per partition)
            try:
                total = pickle.loads(payloads.treeReduce(_combine_payloads, depth=2))
            except ValueError:  # every partition empty: nothing to reduce
                total = None
        else:
            total = None
            for payload in payloads.collect():
                total = combine(total, pickle.loads(payload))
        if total is None:
            raise ValueError("no rows to identify on")
        self.passes.append(pass_record(method, args, time.perf_counter() - t0))
        return total

    # ---------------------------------------------------------------- LightGBM GCM nuisances, per fold
    def design_frame(self, S):
        """unit_id, fold code, y, t and the dense columns x0..x{|S|-1} of S: all a nuisance fit needs (|S| is
        small; Z itself never travels)."""
        spec = self.spec
        xcols = [f"x{c}" for c in range(len(S))]
        key_type = self.df.schema["unit_id"].dataType.simpleString()
        schema = ", ".join([f"unit_id {key_type}", "fold int", "y double", "t double"] + [f"{c} double" for c in xcols])

        def rows(batches):
            for pdf in batches:
                if not len(pdf):
                    continue
                b = block_from_pandas(pdf, spec)
                out = pd.DataFrame({"unit_id": pdf["unit_id"].to_numpy(), "fold": b.folds.astype(np.int32),
                                    "y": b.y, "t": b.t})
                XS = b.columns(S)
                for c, name in enumerate(xcols):
                    out[name] = XS[:, c]
                yield out

        return self.df.mapInPandas(rows, schema)

    def fit_fold_models(self, design, S, n_folds, seed, m_models=None, e=None):
        """Fold k's LightGBM model (``nuisance.lgbm_fit``), one Spark task per fold, trained on the rows of the
        other folds (of the :meth:`design_frame` ``design``) in unit_id order: of y on X_S, or — given the outcome
        models ``m_models`` — of the pseudo-outcome φ = (y - m̂)(t - e)/(e(1 - e)), each training row's m̂ from the
        model of its own fold."""
        xcols = [f"x{c}" for c in range(len(S))]

        def task(pdf: pd.DataFrame, k: int) -> pd.DataFrame:
            pdf = pdf.sort_values("unit_id", kind="stable")
            X = pdf[xcols].to_numpy(dtype=float).reshape(len(pdf), len(xcols))
            target = pdf["y"].to_numpy(dtype=float)
            if m_models is not None:
                m_hat = predict_out_of_fold(m_models, X, pdf["fold"].to_numpy())
                target = pseudo_outcome(target, pdf["t"].to_numpy(dtype=float), m_hat, e)
            return pd.DataFrame({"model": [pickle.dumps(lgbm_fit(X, target, seed), protocol=4)]})

        spark = self.df.sparkSession
        out = run_fold_tasks(spark, design, range(n_folds), task, "model binary",
                             training_only=True).collect()
        by_fold = {int(r["task_fold"]): pickle.loads(r["model"]) for r in out}
        if sorted(by_fold) != list(range(n_folds)):
            raise ValueError(f"LightGBM nuisance: folds {sorted(by_fold)} came back, expected 0..{n_folds - 1}")
        self.fold_tasks.append({"s": len(S), "target": "y" if m_models is None else "phi",
                                "partitions": sorted({int(r["partition_id"]) for r in out}),
                                "fit_seconds_max": max(float(r["fit_seconds"]) for r in out)})
        return [by_fold[k] for k in range(n_folds)]

    def lgbm_nuisances(self, S, n_folds, e, seed):
        """(m models, g models): the cross-fitted outcome model m̂(X_S) and the model of φ on X_S, per fold. The
        narrow design frame is cached for the two fits, so the rows are read from the partitions once."""
        design = self.design_frame(S).cache()
        try:
            m_models = self.fit_fold_models(design, S, n_folds, seed)
            return m_models, self.fit_fold_models(design, S, n_folds, seed, m_models=m_models, e=e)
        finally:
            design.unpersist()


def lgbm_gcm_block_sums(block: Block, S, m_models, g_models, e, zspec=("linear",), n_folds=0):
    """One partition's GCM sums with φ_res = φ - ĝ(X_S), φ = (y - m̂(X_S))(t - e)/(e(1 - e)), every row predicted
    by its own fold's models — the arithmetic of the in-memory ``nexis(..., nuisance="lgbm")``; the candidates'
    residualization ``zspec`` as there (``Block.gcm_sums``)."""
    XS = block.columns(S)
    phi = pseudo_outcome(block.y, block.t, predict_out_of_fold(m_models, XS, block.folds), e)
    return block.gcm_sums(S, phi - predict_out_of_fold(g_models, XS, block.folds), zspec, n_folds)


class SparkTester(Tester):
    """The engine's :class:`~tokens2policy.identify.engine.Tester` whose LightGBM GCM nuisances are fit per fold
    across the cluster (:meth:`SparkSource.lgbm_nuisances`) instead of on one in-memory block.

    The fitted fold models are small (2K model strings), so unlike the engine, which keeps only the latest S's
    n-vector φ_res, the models of the last ``MODEL_CACHE`` conditioning sets are kept: the final p(j | S∖{j}) and
    the marginal screen revisit sets the search already fit (fits are deterministic, so reuse changes nothing)."""

    MODEL_CACHE = 32

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._fold_models: "OrderedDict[tuple, tuple]" = OrderedDict()

    def _gcm_residual(self, S):
        if self.nuisance != "lgbm":
            return super()._gcm_residual(S)
        cache = self._fold_models
        key = tuple(int(s) for s in S)  # order matters: it is the feature order of the models
        if key in cache:
            cache.move_to_end(key)
        else:
            cache[key] = self.src.lgbm_nuisances(list(key), self.K, self.e, self.seed)
            while len(cache) > self.MODEL_CACHE:
                cache.popitem(last=False)
        m_models, g_models = cache[key]
        return "lgbm", (m_models, g_models, self.e)

    def _gcm_sums(self, S, f):
        if f[0] != "lgbm":
            return super()._gcm_sums(S, f)
        m_models, g_models, e = f[1]
        zs, K = self.z_spec(S), self.K
        if zs[0] == "lgbm":
            raise ValueError("z_nuisance='lgbm' runs in memory only; use identify.z_nuisance=spline in the job")
        return self.src.reduce(lambda b: lgbm_gcm_block_sums(b, S, m_models, g_models, e, zs, K))


def identify_frame(df, spec, cfg_identify, seed=0, on_decision=None):
    """Run NEXIS + the marginal screen on a prepared DataFrame (columns y, treatment, [fold], [cluster],
    covariates, indices, values; GCM with LightGBM also unit_id, the key that orders each fold's training rows).
    Returns (NexisResult, MarginalResult). With LightGBM the result equals ``nexis(..., nuisance="lgbm")`` on the
    rows sorted by unit_id with the same fold ids."""
    ic = cfg_identify
    _check_unit_key(ic, df.columns)
    whole = None
    if ic.test == "cluster":  # every cluster in one partition: its statistics are functions of per-cluster sums
        whole = df = df.repartition("cluster").cache()
    try:
        return _search(SparkSource(df, spec), SparkTester, spec, ic, seed, on_decision)
    finally:
        if whole is not None:
            whole.unpersist()


def identify_pandas(pdf: pd.DataFrame, spec: Dict, cfg_identify, seed=0, on_decision=None):
    """In-memory twin of :func:`identify_frame` (same columns, collected): one :class:`Block` of all rows and the
    engine's :class:`Tester` — no Spark job. Rows are put in unit_id order when there is one (the order in which
    the Spark path's LightGBM fold tasks train); the additive statistics equal the Spark path's up to the order
    of floating-point sums (tests/execution: p-values to 1e-9 relative)."""
    ic = cfg_identify
    _check_unit_key(ic, pdf.columns)
    if "unit_id" in pdf.columns:
        pdf = pdf.sort_values("unit_id", kind="stable").reset_index(drop=True)
    if not len(pdf):
        raise ValueError("no rows to identify on")
    return _search(Source([block_from_pandas(pdf, spec)]), Tester, spec, ic, seed, on_decision)


def _check_unit_key(ic, columns):
    if ic.test == "gcm" and ic.nuisance == "lgbm" and "unit_id" not in columns:
        raise ValueError("GCM with nuisance='lgbm' needs a unit_id column (it orders each fold's training rows)")


def _search(src, tester_class, spec, ic, seed, on_decision):
    """NEXIS and the marginal screen over ``src`` (a Spark or in-memory Source) with ``tester_class``."""
    G = len(spec.get("cluster_codes") or {})
    K = len(spec.get("fold_codes") or {})
    tester = tester_class(src, ic.test, G, K, ic.nuisance, seed, with_nnz=True, z_nuisance=ic.z_nuisance)
    params = dict(alpha=ic.alpha, test=ic.test, adjust=ic.adjust, rho=ic.rho, backward=ic.backward,
                  nuisance=ic.nuisance, z_nuisance=ic.z_nuisance, max_rounds=ic.max_rounds,
                  min_active=ic.min_active)
    res = run_search(tester, src.mw, alpha=ic.alpha, adjust=ic.adjust, rho=ic.rho, backward=ic.backward,
                     max_rounds=ic.max_rounds, min_active=ic.min_active, params=params, on_decision=on_decision)
    search_passes = len(src.passes)
    mg = marginal_from_tester(tester, src.mw, ic.alpha, ic.min_active)
    res.passes = {**pass_summary(src.passes), "search_passes": search_passes}
    return res, mg


def frame_spec(df, ic, m, covariates) -> Dict:
    """The Block spec of the rows actually analysed (``df``: one experiment, one outcome, non-null outcomes only; a
    Spark DataFrame or its collected pandas frame):
    cluster and fold levels are counted over these rows, as the in-memory ``nexis`` counts them over its input — a
    unit without an outcome must not add a cluster to the cluster test's G (issue 13, finding 6) or a fold to the cross-fit."""
    spec = {"m": m, "covariates": covariates}
    in_memory = isinstance(df, pd.DataFrame)  # the collected frame of identify_pandas

    def distinct(col, cast):
        if in_memory:
            return sorted({cast(v) for v in df[col].unique()})
        from pyspark.sql import functions as F

        return sorted({cast(r[0]) for r in df.select(F.col(col).cast("string" if cast is str else "int"))
                       .distinct().collect()})

    if ic.test == "cluster":
        spec["cluster_codes"] = {v: i for i, v in enumerate(distinct("cluster", str))}
    if ic.test == "gcm":
        spec["fold_codes"] = {v: i for i, v in enumerate(distinct("fold", int))}
    return spec


def _validate_spark_options(ic, has_fold, has_cluster):
    if ic.test == "gcm" and ic.nuisance == "lgbm":
        try:
            import lightgbm  # noqa: F401
        except ImportError as exc:
            raise ValueError("identify.nuisance=lgbm needs the lightgbm package (pip install lightgbm)") from exc
    if ic.test == "gcm" and not has_fold:
        raise ValueError("identify.test=gcm needs the stored 'fold' column in units")
    if ic.test == "cluster" and not has_cluster:
        raise ValueError("identify.test=cluster needs cluster ids in units (ingest with source.cluster_col)")
    if ic.test == "linear" and has_cluster:  # as nexis(test="linear", cluster=...): refused, not silently invalid
        raise ValueError("identify.test=linear assumes independent units, but units carry cluster ids "
                         "(source.cluster_col): use identify.test=cluster (cluster-robust) or gcm, or ingest "
                         "without source.cluster_col to assert that the units are independent")


def run(spark, cfg) -> dict:
    """Run the identify stage directly (tests, notebooks): :func:`main` under a stage context."""
    from tokens2policy.context import run_job

    return run_job(spark, cfg, "identify", main)


def main(ctx) -> dict:
    """NEXIS and the marginal screen per experiment and outcome; one commit per output table."""
    from pyspark.sql import functions as F

    from tokens2policy.progress import spark_progress

    spark, cfg = ctx.spark, ctx.config
    ic = cfg.identify
    units = ctx.read("units")
    neurons = ctx.read("neurons")
    # ingest always writes the cluster column (null without source.cluster_col): clustered means a non-null id
    has_fold = "fold" in units.columns
    has_cluster = "cluster" in units.columns and bool(units.where(F.col("cluster").isNotNull()).limit(1).take(1))
    _validate_spark_options(ic, has_fold, has_cluster)
    outcomes = list(ctx.units.outcomes)
    covariates = list(ctx.units.numeric_covariates) if ic.use_covariates else []
    # one job each: per-experiment sizes (units, neurons' non-zeros) and the dictionary size m
    unit_counts = {r[0]: int(r[1]) for r in units.groupBy("experiment_id").count().collect()}
    nz_stats = neurons.groupBy("experiment_id").agg(F.max(F.array_max("indices")).alias("max_idx"),
                                                    F.sum(F.size("indices")).alias("nnz")).collect()
    max_idx = max((r["max_idx"] for r in nz_stats if r["max_idx"] is not None), default=None)
    nnz_of = {r["experiment_id"]: int(r["nnz"] or 0) for r in nz_stats}
    m = 0 if max_idx is None else int(max_idx) + 1
    experiments = sorted(unit_counts)
    mod_rows, trace_rows, marg_rows = [], [], []
    summary = {"experiments": {}, "m": m, "covariates": covariates, "execution": {}}
    passes_total = []  # per experiment and outcome: the passes over the rows (Spark jobs on the distributed path)

    with ctx.clock.timed("total"):
        for exp in experiments:
            u = units.where((F.col("experiment_id") == exp) & selection_filter(cfg.honesty))  # honesty: selection units
            nz = neurons.where(F.col("experiment_id") == exp).select("unit_id", "indices", "values")
            joined = u.join(nz, "unit_id", "left")
            summary["experiments"][exp] = {}
            base = ([F.col("treatment").cast("double").alias("treatment"), "indices", "values"]
                    + [F.col(c).cast("double").alias(c) for c in covariates])
            if ic.test == "cluster":
                base.append(F.col("cluster").cast("string").alias("cluster"))
            if ic.test == "gcm":
                base.append(F.col("fold").cast("int").alias("fold"))
            if ic.test == "gcm" and ic.nuisance == "lgbm":
                base.append("unit_id")  # orders each fold's training rows (same models as in memory)
            # in memory: every outcome's rows collected once (null outcomes flagged, not dropped: a NaN is not a null)
            choice = choose(cfg.execution, "identify", unit_counts[exp], len(base) - 2 + len(outcomes),
                            nnz_of.get(exp, 0))
            choice.record(ctx)
            summary["execution"][exp] = choice.as_dict()
            collected = None
            if choice.mode == "memory":
                ys = [(f"__y{i}", f"__has_y{i}") for i in range(len(outcomes))]
                with_key = ic.test == "gcm" and ic.nuisance == "lgbm"  # base has unit_id already
                key = [] if with_key else ["unit_id"]  # identify_pandas sorts by it: a fixed sum order
                collected = joined.select(*base, *key, *[F.col(o).cast("double").alias(y) for o, (y, _) in zip(outcomes, ys)],
                                          *[F.col(o).isNotNull().alias(h) for o, (_, h) in zip(outcomes, ys)]
                                          ).toPandas()
                others = [c for c in collected.columns if c not in {name for pair in ys for name in pair}]
            for i, outcome in enumerate(outcomes):
                if collected is not None:
                    keep = collected[f"__has_y{i}"].to_numpy(bool)
                    df = collected.loc[keep, others].assign(y=collected.loc[keep, f"__y{i}"]).reset_index(drop=True)
                else:
                    df = joined.where(F.col(outcome).isNotNull()).select(F.col(outcome).cast("double").alias("y"),
                                                                         *base).cache()
                try:
                    spec = frame_spec(df, ic, m, covariates)
                    label = f"NEXIS {ic.test}, {m} neurons, {choice.mode}"
                    with spark_progress(spark, f"identify {exp}/{outcome}", note=label,
                                        open_ended=True) as bar:  # one Spark job per statistic: the total grows

                        def show(rec, selected, bar=bar, label=label):
                            bar.set_label(f"{label}, {rec['phase']} round {rec['round']}, {len(selected)} selected")

                        run = identify_pandas if collected is not None else identify_frame
                        res, mg = run(df, spec, ic, cfg.seed, on_decision=show)
                finally:
                    if collected is None:
                        df.unpersist()
                mod_rows += modifier_rows(exp, outcome, res, covariates, ic)
                trace_rows += trace_table_rows(exp, outcome, res, covariates)
                marg_rows += marginal_rows(exp, outcome, mg, covariates)
                key = f"{exp}.{outcome}"
                ctx.log_metrics({f"n_selected.{_metric(key)}": len(res.selected) + len(res.selected_w),
                                 f"n_marginal_bonferroni.{_metric(key)}": int(mg.reject_bonferroni.sum())})
                summary["experiments"][exp][outcome] = {
                    "selected": res.selected.tolist(), "selected_w": [covariates[i] for i in res.selected_w],
                    "pvalues": res.pvalues.tolist(), "converged": res.converged, **res.passes}
                passes_total.append(res.passes)
        ctx.log_dict(summary, "identify/summary.json")
        mod_rows = with_neuron_labels(spark, cfg, mod_rows)
        tables = (("modifiers", mod_rows), ("selection_trace", trace_rows), ("marginal_screen", marg_rows))
        ctx.write_experiment_tables([(name, ctx.frame(name, rows)) for name, rows in tables], experiments)
        summary.update({f"{name}_rows": len(rows) for name, rows in tables})
    return {"experiments": len(experiments), "outcomes": len(outcomes), "modifiers": len(mod_rows),
            "trace_rows": len(trace_rows), "marginal_rows": len(marg_rows), "execution": summary["execution"],
            "passes": sum(p["passes"] for p in passes_total),
            "search_passes": sum(p["search_passes"] for p in passes_total),
            "pass_seconds": round(sum(p["pass_seconds"] for p in passes_total), 2),
            "pass_by_stat": _merge_counts(p["pass_by_stat"] for p in passes_total)}


def _merge_counts(dicts) -> Dict[str, list]:
    """Sum {stat: [count, seconds]} dicts."""
    out: Dict[str, list] = {}
    for d in dicts:
        for k, (c, sec) in d.items():
            cur = out.setdefault(k, [0, 0.0])
            cur[0], cur[1] = cur[0] + c, round(cur[1] + sec, 3)
    return out


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
