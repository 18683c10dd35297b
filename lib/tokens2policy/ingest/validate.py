"""Column mapping and row validation for ingest, in Spark.

:func:`map_columns` checks the source schema against the config once, on the driver (a column that cannot be mapped is
a :class:`~tokens2policy.config.ConfigError` naming it, before anything is written). :func:`classify_rows` then gives
every input row the ``units`` columns, a copy of the original row (``raw_json``) and — when it must be rejected — the
first failing reason of :data:`REASONS` (in that priority order) with a human-readable message.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from tokens2policy.config import Config, ConfigError, label_key, label_text

# Reject reasons in priority order: a row gets the first one that applies.
REASONS: Dict[str, str] = {
    "malformed_line": "a CSV/JSON line that does not parse (too few or too many fields, broken JSON): raw line kept",
    "missing_experiment_id": "the experiment id is null or blank",
    "missing_unit_id": "the unit id is null or blank",
    "bad_treatment": "the treatment is not one of the two configured labels",
    "wrong_type": "a value cannot be read as its column's type (number, timestamp)",
    "missing_outcome": "an outcome is null",
    "non_finite_outcome": "an outcome is NaN or infinite",
    "empty_text": "the joined text fields are empty or whitespace",
    "non_decodable_text": "the text is not valid UTF-8 or holds U+FFFD replacement characters of a lossy decode",
    "missing_covariate": "a covariate is null, NaN or infinite",
    "post_treatment_covariate": "covariates were measured after treatment assignment (measured_at > assigned_at)",
    "duplicate_unit_id": "another row of the same (experiment_id, unit_id) was kept (rule: docs/ingest.md)",
    "conflicts_with_stored": "ingest.on_changed_row=keep and the stored row for this key differs",
}

KEYS = ("experiment_id", "unit_id")
CORRUPT_COL = "_corrupt_record"  # Spark's column for a CSV/JSON line that does not parse (PERMISSIVE mode)
NUMERIC = (T.ByteType, T.ShortType, T.IntegerType, T.LongType, T.FloatType, T.DoubleType, T.DecimalType)


@dataclass
class ColumnMap:
    """Which source column feeds which ``units`` column (validated against a schema by :func:`map_columns`)."""

    experiment_id_col: Optional[str]
    experiment_id: Optional[str]
    unit_id_col: str
    treatment_col: Optional[str]  # None: new units to score, no treatment yet
    treatment_labels: List
    outcome_cols: List[str]
    text_cols: List[str]
    text_separator: str
    covariate_cols: List[str]
    cluster_col: Optional[str]
    assigned_at_col: Optional[str]
    measured_at_col: Optional[str]
    dtypes: Dict[str, T.DataType] = field(default_factory=dict)
    corrupt_col: Optional[str] = None  # the reader's corrupt-record column (CSV/JSON), when the source has one

    @property
    def units_columns(self) -> List[str]:
        """The ``units`` contract's columns, in order."""
        return [*KEYS, "treatment", *self.outcome_cols, "text", *self.covariate_cols, "cluster", "fold"]

    @property
    def numeric_labels(self) -> bool:
        return all(label_key(v)[0] == "number" for v in self.treatment_labels)


def _kind(dtype: T.DataType) -> str:
    if isinstance(dtype, NUMERIC):
        return "numeric"
    if isinstance(dtype, (T.StringType, T.VarcharType, T.CharType)):
        return "string"
    if isinstance(dtype, T.BooleanType):
        return "boolean"
    if isinstance(dtype, (T.TimestampType, T.TimestampNTZType, T.DateType)):
        return "time"
    if isinstance(dtype, T.BinaryType):
        return "binary"
    return "nested"


def map_columns(schema: T.StructType, cfg: Config, where: str, pre_treatment_only: bool = False) -> ColumnMap:
    """Map the source schema to the ``units`` contract or raise one ConfigError naming every unmappable column.

    ``pre_treatment_only``: map only the ids, text and covariates (new units to score: ``t2p score``); treatment,
    outcomes, cluster and timestamps are neither required nor checked."""
    src = cfg.source
    demo = src.kind == "demo"
    cmap = ColumnMap(
        experiment_id_col=src.experiment_id_col if src.experiment_id_col in schema.names or not src.experiment_id
        else None,
        experiment_id=src.experiment_id,
        unit_id_col=src.unit_id_col,
        treatment_col=src.treatment_col,
        treatment_labels=list(src.treatment_labels),
        outcome_cols=list(src.outcome_cols),
        text_cols=list(src.text_cols),
        text_separator=src.text_separator,
        covariate_cols=list(src.covariate_cols),
        cluster_col=src.cluster_col,
        assigned_at_col=src.assigned_at_col or ("assigned_at" if demo else None),
        measured_at_col=src.measured_at_col or ("measured_at" if demo else None),
    )
    if pre_treatment_only:
        cmap.treatment_col, cmap.outcome_cols, cmap.cluster_col = None, [], None
        cmap.assigned_at_col = cmap.measured_at_col = None
    wanted: List[Tuple[str, str, Tuple[str, ...]]] = [  # (column, config key, accepted kinds)
        (cmap.unit_id_col, "source.unit_id_col", ("string", "numeric")),
        *([(cmap.treatment_col, "source.treatment_col", ("string", "numeric", "boolean"))] if cmap.treatment_col
          else []),
        *[(c, "source.outcome_cols", ("numeric", "string", "boolean")) for c in cmap.outcome_cols],
        *[(c, "source.text_cols", ("string", "binary")) for c in cmap.text_cols],
        *[(c, "source.covariate_cols", ("numeric", "string", "boolean")) for c in cmap.covariate_cols],
    ]
    if cmap.experiment_id_col:
        wanted.insert(0, (cmap.experiment_id_col, "source.experiment_id_col (or set source.experiment_id)",
                          ("string", "numeric")))
    if cmap.cluster_col:
        wanted.append((cmap.cluster_col, "source.cluster_col", ("string", "numeric")))
    if (cmap.assigned_at_col is None) != (cmap.measured_at_col is None):
        raise ConfigError("set both source.assigned_at_col and source.measured_at_col, or neither")
    if cmap.assigned_at_col:
        for col, key in ((cmap.assigned_at_col, "source.assigned_at_col"),
                         (cmap.measured_at_col, "source.measured_at_col")):
            wanted.append((col, key, ("time", "string", "numeric")))
    if CORRUPT_COL in schema.names and all(c != CORRUPT_COL for c, _, _ in wanted):
        cmap.corrupt_col = CORRUPT_COL
    fields = {f.name: f.dataType for f in schema.fields}
    missing = [f"'{c}' ({key})" for c, key, _ in wanted if c not in fields]
    if missing:
        raise ConfigError(f"source column {', '.join(missing)} not found in {where}; "
                          f"its columns are: {', '.join(schema.names)}")
    bad = [f"'{c}' has type {fields[c].simpleString()} ({key} needs {'/'.join(kinds)})"
           for c, key, kinds in wanted if _kind(fields[c]) not in kinds]
    if bad:
        raise ConfigError(f"source column {'; '.join(bad)} in {where}")
    out_names = cmap.units_columns
    clash = sorted({c for c in out_names if out_names.count(c) > 1})
    if clash:
        raise ConfigError(f"outcome/covariate column name(s) {clash} collide with the units contract's columns "
                          f"{list(KEYS) + ['treatment', 'text', 'cluster', 'fold']} or with each other")
    cmap.dtypes = {c: fields[c] for c, _, _ in wanted}
    return cmap


def _col(name: str) -> Column:
    return F.col("`" + name.replace("`", "``") + "`")


# Unicode whitespace (Java's (?U)\s: no-break, ideographic, en/em spaces, tabs, line breaks), zero-width space and
# BOM at either end; the same set as tokens2policy.config.strip_unicode
_EDGE_SPACE = r"(?U)^[\s\x{200B}\x{FEFF}]+|[\s\x{200B}\x{FEFF}]+$"


def unicode_trim(c: Column) -> Column:
    """Trim Unicode whitespace at both ends (``F.trim`` removes ASCII spaces only: ``"u1\t"`` stayed ``"u1\t"``)."""
    return F.regexp_replace(c, _EDGE_SPACE, "")


def _blank(name: str, dtype: T.DataType) -> Column:
    """Null, or (for strings) empty after trimming: treated as missing, not as a wrong type."""
    c = _col(name)
    return c.isNull() | (unicode_trim(c) == "") if _kind(dtype) == "string" else c.isNull()


def _as_double(name: str) -> Column:
    return _col(name).try_cast("double")


def _as_timestamp(name: str, dtype: T.DataType) -> Column:
    kind = _kind(dtype)
    if kind == "numeric":  # epoch seconds
        return F.timestamp_seconds(_col(name).cast("double"))
    return _col(name).try_cast("timestamp")


def _non_finite(c: Column) -> Column:
    return F.isnan(c) | (F.abs(c) == float("inf"))


def _names_where(pairs: List[Tuple[str, Column]]) -> Column:
    """Comma-separated quoted names of the columns whose condition holds on this row."""
    return F.concat_ws(", ", *[F.when(cond, F.lit(f"'{name}'")) for name, cond in pairs]) if pairs else F.lit("")


def _shown(name: str) -> Column:
    return F.coalesce(_col(name).cast("string"), F.lit("null"))


def classify_rows(df: DataFrame, cmap: ColumnMap) -> DataFrame:
    """Every input row with its ``units`` columns, ``raw_json``, ``assigned_at`` and ``reason``/``message``.

    ``reason`` is null for a row that passes every check. Duplicates are resolved among the rows that pass all
    other checks (so a broken copy never displaces a good one): per (experiment_id, unit_id) the row with the
    earliest ``assigned_at`` is kept (nulls last; without timestamps this step is skipped), ties broken by the
    smallest ``raw_json`` string — a rule that does not depend on the input's order or partitioning.
    """
    d = cmap.dtypes
    raw_json = F.to_json(F.struct(*[_col(c) for c in df.columns]), {"ignoreNullFields": "false"})
    if cmap.experiment_id_col:
        exp = unicode_trim(_col(cmap.experiment_id_col).cast("string"))
        exp_missing = _blank(cmap.experiment_id_col, d[cmap.experiment_id_col])
    else:
        exp, exp_missing = F.lit(cmap.experiment_id).cast("string"), F.lit(False)
    uid = unicode_trim(_col(cmap.unit_id_col).cast("string"))
    uid_missing = _blank(cmap.unit_id_col, d[cmap.unit_id_col])

    control, treated = cmap.treatment_labels
    if cmap.treatment_col is None:  # new units to score (map_columns(pre_treatment_only=True)): no treatment yet
        treatment = F.lit(None).cast("int")
    elif cmap.numeric_labels:
        t = _as_double(cmap.treatment_col)
        treatment = F.when(t == F.lit(label_key(treated)[1]), 1).when(t == F.lit(label_key(control)[1]), 0)
    else:  # text (labels compared as written; true/false case-insensitively, as label_text does)
        t = unicode_trim(_col(cmap.treatment_col).cast("string"))
        t = F.when(F.lower(t).isin("true", "false"), F.lower(t)).otherwise(t)
        treatment = F.when(t == F.lit(label_text(treated)), 1).when(t == F.lit(label_text(control)), 0)

    outcomes = {c: _as_double(c) for c in cmap.outcome_cols}
    covariates = {c: _as_double(c) for c in cmap.covariate_cols}
    stamps = {}
    if cmap.assigned_at_col:
        stamps = {c: _as_timestamp(c, d[c]) for c in (cmap.assigned_at_col, cmap.measured_at_col)}
    typed = {**outcomes, **covariates, **stamps}
    wrong = [(c, ~_blank(c, d[c]) & v.isNull()) for c, v in typed.items()]

    texts = [_col(c).cast("string") for c in cmap.text_cols]
    # blank fields are skipped in the join; "empty" means nothing but whitespace (any kind, not just spaces): a
    # field is kept when it holds one character outside that set (a search that stops there, not a rewrite)
    text = F.concat_ws(cmap.text_separator, *[F.when(s.rlike(r"(?U)[^\s\x{200B}\x{FEFF}]"), s) for s in texts])
    undecodable = [(c, s.isNotNull() & (~F.is_valid_utf8(s) | s.contains("\ufffd"))) for c, s in
                   zip(cmap.text_cols, texts)]
    out_missing = [(c, v.isNull()) for c, v in outcomes.items()]
    out_nonfinite = [(c, _non_finite(v)) for c, v in outcomes.items()]
    cov_missing = [(c, v.isNull() | _non_finite(v)) for c, v in covariates.items()]

    def any_of(pairs):
        return F.greatest(*[F.coalesce(p, F.lit(False)) for _, p in pairs], F.lit(False)) if pairs else F.lit(False)

    labels = f"[{control!r}, {treated!r}]"
    malformed = []
    if cmap.corrupt_col:
        raw_line = _col(cmap.corrupt_col)
        malformed = [("malformed_line", raw_line.isNotNull(), F.concat(
            F.lit("line does not parse (too few or too many fields, or broken JSON): "),
            F.substring(raw_line, 1, 200)))]
    checks = malformed + [
        ("missing_experiment_id", exp_missing, F.lit(f"experiment id (column '{cmap.experiment_id_col}') is missing")),
        ("missing_unit_id", uid_missing, F.lit(f"unit id (column '{cmap.unit_id_col}') is missing")),
        *([("bad_treatment", treatment.isNull(),
            F.concat(F.lit(f"treatment '{cmap.treatment_col}' = "), _shown(cmap.treatment_col),
                     F.lit(f" is not one of the configured labels {labels}")))] if cmap.treatment_col else []),
        ("wrong_type", any_of(wrong), F.concat(F.lit("column "), _names_where(wrong),
                                               F.lit(" cannot be read as a number/timestamp"))),
        ("missing_outcome", any_of(out_missing), F.concat(F.lit("outcome "), _names_where(out_missing),
                                                          F.lit(" is null"))),
        ("non_finite_outcome", any_of(out_nonfinite), F.concat(F.lit("outcome "), _names_where(out_nonfinite),
                                                               F.lit(" is NaN or infinite"))),
        ("empty_text", text == "", F.lit(f"text {cmap.text_cols} is empty")),
        ("non_decodable_text", any_of(undecodable),
         F.concat(F.lit("text "), _names_where(undecodable), F.lit(" is not valid UTF-8 (or holds U+FFFD)"))),
        ("missing_covariate", any_of(cov_missing), F.concat(F.lit("covariate "), _names_where(cov_missing),
                                                            F.lit(" is null, NaN or infinite"))),
    ]
    if stamps:
        a, m = stamps[cmap.assigned_at_col], stamps[cmap.measured_at_col]
        checks.append(("post_treatment_covariate", m > a, F.concat(
            F.lit(f"covariates measured at '{cmap.measured_at_col}' = "), m.cast("string"),
            F.lit(f" after assignment '{cmap.assigned_at_col}' = "), a.cast("string"))))
    cluster = (F.when(~_blank(cmap.cluster_col, d[cmap.cluster_col]),
                      unicode_trim(_col(cmap.cluster_col).cast("string")))
               if cmap.cluster_col else F.lit(None).cast("string"))
    # Two projections: the typed values and one boolean per check first, then reason/message/raw_json from them. In
    # one projection Spark evaluated a check's condition again in `message` (and the text's whitespace scan in every
    # check using it): conditions after the first of a coalesce are not shared by subexpression elimination. Spark
    # keeps the two projections apart because the flags are used twice (spark.sql.optimizer.collapseProjectAlwaysInline
    # is false by default). The messages are built from the source columns, only for the rejected rows.
    tag = "__t2p_"
    while any(c.startswith(tag) for c in df.columns):
        tag += "_"
    values = {
        "experiment_id": exp,
        "unit_id": uid,
        "treatment": treatment.cast("int"),
        **{f"o{i}": v for i, v in enumerate(outcomes.values())},
        "text": text,
        **{f"w{i}": v for i, v in enumerate(covariates.values())},
        "cluster": cluster,
        "assigned_at": stamps[cmap.assigned_at_col] if stamps else F.lit(None).cast("timestamp"),
    }
    staged = df.select(
        *[_col(c) for c in df.columns],
        *[v.alias(f"{tag}v_{k}") for k, v in values.items()],
        *[F.coalesce(cond, F.lit(False)).alias(f"{tag}f{i}") for i, (_, cond, _) in enumerate(checks)],
    )
    flag = [F.col(f"{tag}f{i}") for i in range(len(checks))]
    reason = F.coalesce(*[F.when(f, F.lit(code)) for f, (code, _, _) in zip(flag, checks)])
    message = F.coalesce(*[F.when(f, msg) for f, (_, _, msg) in zip(flag, checks)])
    rows = staged.select(
        F.col(f"{tag}v_experiment_id").alias("experiment_id"),
        F.col(f"{tag}v_unit_id").alias("unit_id"),
        F.col(f"{tag}v_treatment").alias("treatment"),
        *[F.col(f"{tag}v_o{i}").alias(c) for i, c in enumerate(cmap.outcome_cols)],
        F.col(f"{tag}v_text").alias("text"),
        *[F.col(f"{tag}v_w{i}").alias(c) for i, c in enumerate(cmap.covariate_cols)],
        F.col(f"{tag}v_cluster").alias("cluster"),
        F.col(f"{tag}v_assigned_at").alias("assigned_at"),
        raw_json.alias("raw_json"),
        reason.alias("reason"),
        message.alias("message"),
    )
    return _mark_duplicates(rows)


def _mark_duplicates(rows: DataFrame) -> DataFrame:
    # the partition flag is a column, so both window functions share one partitioning: one shuffle and one sort of
    # the rows (with the expression in the spec, Spark planned two, each of every wide row)
    w = Window.partitionBy("__valid", *KEYS).orderBy(F.col("assigned_at").asc_nulls_last(), "raw_json")
    marked = (rows.withColumn("__valid", F.col("reason").isNull())
              .select("*", F.row_number().over(w).alias("__rank"), F.first("raw_json").over(w).alias("__kept")))
    dup = F.col("reason").isNull() & (F.col("__rank") > 1)
    message = F.concat(
        F.lit("duplicate of unit_id '"), F.col("unit_id"), F.lit("' in experiment '"), F.col("experiment_id"),
        F.when(F.col("raw_json") == F.col("__kept"), F.lit("': an exact copy of the kept row"))
        .otherwise(F.lit("': differs from the kept row (kept: earliest assigned_at, then smallest raw row JSON)")),
    )
    return marked.select(
        *[c for c in rows.columns if c not in ("reason", "message")],
        F.when(dup, F.lit("duplicate_unit_id")).otherwise(F.col("reason")).alias("reason"),
        F.when(dup, message).otherwise(F.col("message")).alias("message"),
    )
