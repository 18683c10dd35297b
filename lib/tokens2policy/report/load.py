"""Read the stage tables a report needs, tolerating tables and columns that do not exist (yet).

Every table is read through the lakehouse helpers, filtered to one experiment when it has an ``experiment_id``
column, and handed over as pandas (these tables are small: one row per feature, group, rule or trace step).
``units`` is the exception: it is summarised in Spark (counts, arm means and variances), never collected; so are
``neurons`` and ``demo_truth``, which only feed the comparison with the known truth of the demo (each selected
neuron's activations counted per true topic, in Spark). Whatever is missing is recorded in
:attr:`ReportData.missing` so the page and the printed summary can say so.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import pandas as pd

from tokens2policy.config import Config
from tokens2policy.stages import REPORT_TABLES as _REPORT_INPUTS

# what the report reads: the report stage's declared inputs (tokens2policy.stages), read as of their pinned versions
REPORT_TABLES = _REPORT_INPUTS
# tables that are only optional extras (their absence is not reported as a gap): the demo's truth exists for the
# demo only, and neurons is read only to compare the selection with it
OPTIONAL_TABLES = ("demo_drivers", "demo_truth", "neurons")
# tables summarised in Spark, never collected (one row per unit)
UNIT_TABLES = ("units", "demo_truth", "neurons")
# columns the report reads, by table (anything else is shown as-is where a table is printed)
EXPECTED_COLUMNS: Dict[str, Sequence[str]] = {
    "units": ("experiment_id", "unit_id", "treatment"),
    "quarantine": (),
    "modifiers": ("feature", "p_value", "t"),
    "selection_trace": ("action",),
    "marginal_screen": ("feature",),
    "neuron_labels": ("neuron", "label"),
    "gates": ("feature", "group", "estimate", "ci_low", "ci_high"),
    "calibration": ("metric", "estimate"),
    "policy_rules": ("rule",),
    "policy_value": ("policy", "estimate", "ci_low", "ci_high"),
    "assignments": (),
    "demo_drivers": ("role", "term", "coefficient"),
}
TREATMENT_ALIASES = ("treatment", "t", "treated", "w")


def pick(df: Optional[pd.DataFrame], *names: str) -> Optional[str]:
    """The first of ``names`` that is a column of ``df`` (None if none is)."""
    if df is None:
        return None
    for n in names:
        if n in df.columns:
            return n
    return None


def feature_key(value) -> str:
    """A comparable key for a feature id that may be stored as int, float or string (``7``, ``7.0``, ``"7"``)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def trailing_int(text: str) -> Optional[str]:
    """``"neuron_42"`` → ``"42"``; used to match a feature name to a neuron id stored as an integer."""
    digits = ""
    for ch in reversed(text):
        if not ch.isdigit():
            break
        digits = ch + digits
    return str(int(digits)) if digits else None


@dataclass
class ArmStats:
    """Per-arm count, mean and variance of one numeric column of ``units``."""

    column: str
    n: Dict[int, int]
    mean: Dict[int, float]
    var: Dict[int, float]

    def smd(self) -> float:
        """Standardized mean difference (treated − control) / sqrt((s²₁ + s²₀)/2) (Austin 2009)."""
        pooled = math.sqrt((self.var.get(1, float("nan")) + self.var.get(0, float("nan"))) / 2)
        diff = self.mean.get(1, float("nan")) - self.mean.get(0, float("nan"))
        return diff / pooled if pooled > 0 else float("nan")

    def difference(self, z: float = 1.959963984540054) -> Dict[str, float]:
        """Difference in means with the Neyman (unequal-variance) SE: the unadjusted ATE for an outcome."""
        n1, n0 = self.n.get(1, 0), self.n.get(0, 0)
        est = self.mean.get(1, float("nan")) - self.mean.get(0, float("nan"))
        se = math.sqrt(self.var.get(1, float("nan")) / n1 + self.var.get(0, float("nan")) / n0) if n1 and n0 \
            else float("nan")
        return {"estimate": est, "se": se, "ci_low": est - z * se, "ci_high": est + z * se}


@dataclass
class UnitsSummary:
    n_units: int
    n_treated: int
    n_clusters: Optional[int]
    n_folds: Optional[int]
    outcomes: List[ArmStats]
    covariates: List[ArmStats]

    @property
    def treated_share(self) -> float:
        return self.n_treated / self.n_units if self.n_units else float("nan")


@dataclass
class TruthCounts:
    """For the demo: how the selected neurons' activations fall on the true topics (from ``neurons`` ⋈
    ``demo_truth``). ``both``: experiment_id, neuron, topic, n (units of the topic with the neuron active);
    ``topics``: experiment_id, topic, n (units of the topic)."""

    both: pd.DataFrame
    topics: pd.DataFrame


@dataclass
class ReportData:
    experiment_id: Optional[str]
    tables: Dict[str, pd.DataFrame] = field(default_factory=dict)
    versions: Dict[str, Optional[int]] = field(default_factory=dict)
    missing: List[str] = field(default_factory=list)  # human-readable: "table 'gates' does not exist", ...
    units: Optional[UnitsSummary] = None
    truth: Optional[TruthCounts] = None  # the demo's truth, when demo_drivers / demo_truth / neurons exist

    def get(self, name: str) -> Optional[pd.DataFrame]:
        return self.tables.get(name)


@dataclass
class Lakehouse:
    """Every report table read once (pandas), the ``units`` summaries per experiment, and what is missing."""

    tables: Dict[str, pd.DataFrame]
    versions: Dict[str, Optional[int]]
    missing: List[str]
    units: Dict[Optional[str], UnitsSummary]
    truth: Optional[TruthCounts] = None

    def experiments(self, only: Optional[str] = None) -> List[Optional[str]]:
        """Experiments to report on: ``only``, else every experiment in units / modifiers / gates, else [None]."""
        if only:
            return [only]
        ids = [e for e in self.units if e is not None]
        for name in ("modifiers", "gates"):
            df = self.tables.get(name)
            if df is not None and "experiment_id" in df.columns:
                ids += [e for e in df["experiment_id"].dropna().astype(str).unique() if e not in ids]
        return sorted(ids) or [None]

    def for_experiment(self, experiment_id: Optional[str]) -> ReportData:
        data = ReportData(experiment_id, versions=dict(self.versions), missing=list(self.missing))
        for name, df in self.tables.items():
            if experiment_id is not None and "experiment_id" in df.columns:
                df = df[df["experiment_id"].astype(str) == experiment_id].reset_index(drop=True)
            data.tables[name] = df
        data.units = self.units.get(experiment_id) if experiment_id in self.units else self.units.get(None)
        if self.truth is not None:
            keep = (lambda df: df) if experiment_id is None else \
                (lambda df: df[df["experiment_id"].astype(str) == experiment_id].reset_index(drop=True))
            data.truth = TruthCounts(keep(self.truth.both), keep(self.truth.topics))
        return data


def _summarise_units(df, config: Config) -> Dict[Optional[str], UnitsSummary]:
    """Per experiment and arm: counts, means and variances of outcomes and covariates, in one Spark job (plus one
    for distinct clusters/folds). Units are never collected."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import BooleanType, NumericType

    tcol = next((c for c in TREATMENT_ALIASES if c in df.columns), None)
    numeric = {f.name for f in df.schema.fields if isinstance(f.dataType, (NumericType, BooleanType))}
    outcomes = [c for c in config.source.outcome_cols if c in numeric]
    if not outcomes and "outcome" in numeric:
        outcomes = ["outcome"]
    cluster_col = next((c for c in (config.source.cluster_col, "cluster") if c and c in df.columns), None)
    skip = {"unit_id", "fold", tcol, *outcomes, cluster_col}
    covs = [c for c in config.source.covariate_cols if c in numeric]
    if not covs:
        covs = [c for c in df.columns if c in numeric and c not in skip and not c.startswith("_")]
    exp = F.col("experiment_id").cast("string") if "experiment_id" in df.columns else F.lit(None).cast("string")
    arm = F.col(tcol).cast("int") if tcol is not None else F.lit(-1)
    aggs = [F.count(F.lit(1)).alias("n")]
    for c in outcomes + covs:
        x = F.col(c).cast("double")
        aggs += [F.mean(x).alias(f"m__{c}"), F.var_samp(x).alias(f"v__{c}"), F.count(x).alias(f"n__{c}")]
    arms: Dict[Optional[str], Dict[int, dict]] = {}
    for r in df.groupBy(exp.alias("_exp"), arm.alias("_arm")).agg(*aggs).collect():
        arms.setdefault(r["_exp"], {})[-1 if r["_arm"] is None else int(r["_arm"])] = r.asDict()
    extra = {}
    distinct = []
    if cluster_col:
        distinct.append(F.countDistinct(cluster_col).alias("clusters"))
    if "fold" in df.columns:
        distinct.append(F.countDistinct("fold").alias("folds"))
    if distinct:
        extra = {r["_exp"]: r.asDict() for r in df.groupBy(exp.alias("_exp")).agg(*distinct).collect()}

    def stats(by_arm, c):
        return ArmStats(
            c,
            n={a: int(v[f"n__{c}"] or 0) for a, v in by_arm.items()},
            mean={a: float("nan") if v[f"m__{c}"] is None else float(v[f"m__{c}"]) for a, v in by_arm.items()},
            var={a: float("nan") if v[f"v__{c}"] is None else float(v[f"v__{c}"]) for a, v in by_arm.items()},
        )

    out = {}
    for e, by_arm in arms.items():
        ex = extra.get(e, {})
        out[e] = UnitsSummary(
            n_units=sum(int(v["n"]) for v in by_arm.values()),
            n_treated=int(by_arm.get(1, {}).get("n", 0)),
            n_clusters=ex.get("clusters"),
            n_folds=ex.get("folds"),
            outcomes=[stats(by_arm, c) for c in outcomes],
            covariates=[stats(by_arm, c) for c in covs],
        )
    return out


def input_versions(spark, config: Config) -> Dict[str, Optional[int]]:
    """Delta version of every report table (None: missing)."""
    from tokens2policy.lakehouse import table_version

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(REPORT_TABLES, pool.map(lambda n: table_version(spark, config, n), REPORT_TABLES)))


def load_lakehouse(spark, config: Config, versions: Optional[Dict[str, Optional[int]]] = None) -> Lakehouse:
    """Read every report table once, at the given Delta versions (default: latest; missing tables are noted)."""
    from pyspark.sql import functions as F

    from tokens2policy.lakehouse import read_table

    versions = dict(versions) if versions is not None else input_versions(spark, config)
    only = config.report.experiment_id

    def read(name):
        # read the very version recorded as the report run's input
        df = read_table(spark, config, name, version=versions[name])
        if only is not None and "experiment_id" in df.columns:
            df = df.where(F.col("experiment_id") == only)
        gone = [f"table '{name}' has no column '{c}'" for c in EXPECTED_COLUMNS.get(name, ()) if c not in df.columns]
        if name == "units":
            return gone, _summarise_units(df, config)
        if name in UNIT_TABLES:  # read later, for the truth comparison only
            return gone, df
        return gone, _assignment_counts(df) if name == "assignments" else df.toPandas()

    present = [n for n in REPORT_TABLES if versions.get(n) is not None]
    missing = [f"table '{n}' does not exist (its stage has not run)" for n in REPORT_TABLES
               if versions.get(n) is None and n not in OPTIONAL_TABLES]
    # Small tables: the cost is Spark's per-job latency, so the reads overlap (Spark schedules concurrent jobs).
    with ThreadPoolExecutor(max_workers=4) as pool:
        loaded = dict(zip(present, pool.map(read, present)))
    tables: Dict[str, pd.DataFrame] = {}
    frames = {}
    units: Dict[Optional[str], UnitsSummary] = {}
    for name in present:
        gone, value = loaded[name]
        if name not in OPTIONAL_TABLES:
            missing += gone
        if name == "units":
            units = value
        elif name in UNIT_TABLES:
            frames[name] = value
        else:
            tables[name] = value
    truth = None
    if {"demo_truth", "neurons"} <= set(frames) and tables.get("demo_drivers") is not None:
        truth = truth_counts(frames["neurons"], frames["demo_truth"], tables.get("modifiers"))
    return Lakehouse(tables, versions, missing, units, truth)


def selected_neurons(modifiers: Optional[pd.DataFrame]) -> List[int]:
    """The neuron indices among the selected modifiers (feature ``12``, ``12.0`` or ``neuron_12``; covariates
    excluded)."""
    if modifiers is None or "feature" not in modifiers.columns:
        return []
    rows = modifiers
    if "kind" in rows.columns:
        rows = rows[rows["kind"].astype(str) != "W"]
    out = set()
    for f in rows["feature"]:
        key = feature_key(f)
        digits = key if key.isdigit() else trailing_int(key)
        if digits is not None:
            out.add(int(digits))
    return sorted(out)


def truth_counts(neurons, truth, modifiers: Optional[pd.DataFrame]) -> Optional[TruthCounts]:
    """Per experiment, selected neuron and true topic: the units with the neuron active (code > 0), in two small
    Spark aggregations over ``neurons`` ⋈ ``demo_truth`` (nothing per unit is collected)."""
    from pyspark.sql import functions as F

    ids = selected_neurons(modifiers)
    if "topic" not in truth.columns or not {"indices", "values"} <= set(neurons.columns):
        return None
    keys = ["experiment_id", "unit_id"]
    topics = truth.select(*keys, F.col("topic").cast("string").alias("topic"))
    sizes = topics.groupBy("experiment_id", "topic").agg(F.count(F.lit(1)).alias("n")).toPandas()
    if not ids:
        return TruthCounts(pd.DataFrame(columns=["experiment_id", "neuron", "topic", "n"]), sizes)
    active = (neurons.select(*keys, F.explode(F.arrays_zip("indices", "values")).alias("c"))
              .where(F.col("c.indices").isin(ids) & (F.col("c.values") > 0))
              .select(*keys, F.col("c.indices").cast("int").alias("neuron")))
    both = (active.join(topics, keys).groupBy("experiment_id", "neuron", "topic")
            .agg(F.count(F.lit(1)).alias("n")).toPandas())
    return TruthCounts(both, sizes)


def load_report_data(spark, config: Config, experiment_id: Optional[str]) -> ReportData:
    """One experiment's report data (reads the lakehouse; use :func:`load_lakehouse` to read once for many)."""
    return load_lakehouse(spark, config).for_experiment(experiment_id)


def _assignment_counts(df) -> pd.DataFrame:
    """Assignments are one row per unit: report only how many units each experiment/policy/action got."""
    keys = [c for c in ("experiment_id", "outcome", "policy", "recommended", "action", "action_name", "treat",
                        "assign") if c in df.columns]
    if not keys:
        return pd.DataFrame({"n": [df.count()]})
    # one row per group, few groups: sorted here (Spark's ascending order, nulls first), not by a global sort, which
    # samples its input in an extra Spark job
    counts = df.groupBy(*keys).count().toPandas()
    return counts.sort_values(keys, na_position="first", kind="stable").reset_index(drop=True)
