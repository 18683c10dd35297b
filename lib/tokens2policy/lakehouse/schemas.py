"""The table registry: every Delta table's columns and types, keys, partitioning and the stage that writes it.

This is the one place a table's contract is written. The stage runner (:mod:`tokens2policy.stages`) takes each
stage's inputs and outputs from here, a stage's context (:mod:`tokens2policy.context`) checks every write
against it and builds Spark frames with these schemas, and ``docs/tables.md`` is generated from it
(``python -m tokens2policy.lakehouse.schemas --write docs/tables.md``; a test fails when the page is stale).

Types are Spark DDL type strings (``string``, ``bigint``, ``array<float>``, ``struct<a:string,b:double>``),
parsed here without a Spark session so the registry can be read (and the docs checked) anywhere.

Two kinds of column follow something outside the registry:

* ``unit_key`` columns (``experiment_id``, ``unit_id`` of per-unit tables) have the type they have in ``units``
  (ingest writes strings; a table built by hand with integer ids keeps its type downstream);
* ``repeat`` columns stand for one column per configured name, e.g. ``<outcome>`` in ``units`` is one double
  column per ``source.outcome_cols``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from pyspark.sql import types as T


class SchemaContractError(ValueError):
    """A frame written to a registered table does not have the table's columns and types."""


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # Spark DDL type string
    meaning: str
    repeat: Optional[str] = None  # config key whose list of names this placeholder column stands for
    unit_key: bool = False  # type follows the units table (experiment_id, unit_id)


@dataclass(frozen=True)
class TableSpec:
    name: str
    stage: str  # the stage (or service) that writes it
    columns: Tuple[Column, ...]
    keys: Tuple[str, ...]  # what identifies a row
    description: str
    partition_by: Tuple[str, ...] = ()
    optional: bool = False  # written only in some configurations (e.g. the demo tables)
    internal: bool = False  # bookkeeping of the runner, not a stage's data (not read by stages)

    @property
    def column_names(self) -> Tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    def expanded(self, repeats: Optional[Mapping[str, Sequence[str]]] = None,
                 key_types: Optional[Mapping[str, str]] = None) -> List[Tuple[str, str]]:
        """(name, type) of every column, placeholders replaced by the configured names."""
        out: List[Tuple[str, str]] = []
        for c in self.columns:
            if c.repeat is not None:
                if repeats is None or c.repeat not in repeats:
                    raise SchemaContractError(f"table '{self.name}': column {c.name} needs the names of {c.repeat}")
                out += [(n, c.type) for n in repeats[c.repeat]]
            else:
                typ = (key_types or {}).get(c.name, c.type) if c.unit_key else c.type
                out.append((c.name, typ))
        return out

    def schema(self, repeats: Optional[Mapping[str, Sequence[str]]] = None,
               key_types: Optional[Mapping[str, str]] = None) -> T.StructType:
        """The Spark schema (every column nullable: Delta does not enforce more than the writers check)."""
        return T.StructType([T.StructField(n, parse_type(t), True) for n, t in self.expanded(repeats, key_types)])

    def ddl(self, repeats=None, key_types=None) -> str:
        return ", ".join(f"`{n}` {t}" for n, t in self.expanded(repeats, key_types))


# ---------------------------------------------------------------------------------------------- DDL types
_SIMPLE = {
    "string": T.StringType, "int": T.IntegerType, "bigint": T.LongType, "double": T.DoubleType,
    "float": T.FloatType, "boolean": T.BooleanType, "timestamp": T.TimestampType, "binary": T.BinaryType,
    "date": T.DateType, "smallint": T.ShortType, "tinyint": T.ByteType,
}


def _split_top(text: str) -> List[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts]


def parse_type(text: str) -> T.DataType:
    """A Spark DDL type string -> DataType (the subset the registry uses), no Spark session needed."""
    s = text.strip()
    if s in _SIMPLE:
        return _SIMPLE[s]()
    m = re.fullmatch(r"array<(.*)>", s)
    if m:
        return T.ArrayType(parse_type(m.group(1)), True)
    m = re.fullmatch(r"struct<(.*)>", s)
    if m:
        fields = []
        for part in _split_top(m.group(1)):
            name, _, typ = part.partition(":")
            fields.append(T.StructField(name.strip(), parse_type(typ), True))
        return T.StructType(fields)
    raise ValueError(f"unsupported type {text!r} in the table registry")


def type_string(dt: T.DataType) -> str:
    """The registry's spelling of a Spark type (``simpleString``)."""
    return dt.simpleString()


def _same_type(a: T.DataType, b: T.DataType) -> bool:
    """Equal types, ignoring nullability (of columns, array elements and struct fields)."""
    return type_string(a) == type_string(b)


# ---------------------------------------------------------------------------------------------- the tables
def C(name, typ, meaning, **kw) -> Column:
    return Column(name, typ, meaning, **kw)


EXPERIMENT = C("experiment_id", "string", "experiment", unit_key=True)
UNIT = C("unit_id", "string", "unit id (as in `units`)", unit_key=True)
OUTCOME = C("outcome", "string", "the outcome column of `units` the row is about")

_TABLES: Tuple[TableSpec, ...] = (
    # ------------------------------------------------------------------ runner bookkeeping
    TableSpec("stage_runs", "runner", (
        C("stage", "string", "stage name"),
        C("status", "string", "`success` or `failed`"),
        C("config_hash", "string", "hash of the config sections (and keys) the stage declares, plus `seed`"),
        C("input_versions", "string", "JSON: the Delta version of each input table, pinned before the stage ran "
                                      "(ingest: also `source`, a fingerprint of the logs)"),
        C("output_versions", "string", "JSON: the Delta version of each output table when the stage succeeded "
                                       "(null for a failed run)"),
        C("summary", "string", "JSON summary the stage returned"),
        C("error", "string", "exception type and message when failed"),
        C("seconds", "double", "wall time"),
        C("finished_at", "timestamp", "end time"),
        C("run_id", "string", "the stage's MLflow run id (null when it has none)"),
    ), ("stage", "finished_at"),
        "One row per stage run, appended by the stage runner (`tokens2policy.stages`). A stage is up to date (and "
        "skipped) when its last `success` row has today's config hash and input versions, and each of its output "
        "tables is still at the version that row recorded: a stage killed between two of its commits, or an output "
        "rewritten by anyone else, reruns.", internal=True),
    TableSpec("run_lock", "runner", (
        C("lock", "string", "lock name (`pipeline`: one writer per lakehouse)"),
        C("owner", "string", "random id of the holding run (null: free)"),
        C("host", "string", "host name of the holding process"),
        C("pid", "bigint", "process id of the holding process"),
        C("command", "string", "what the holder runs (stages)"),
        C("acquired_at", "timestamp", "when the holder took the lease"),
        C("renewed_at", "timestamp", "the holder's last renewal"),
        C("expires_at", "timestamp", "the lease is stale after this (renewed every third of `runner.lease_seconds`)"),
    ), ("lock",),
        "The run lock (`tokens2policy.lakehouse.lock`): one row per lock, taken (a conditional Delta UPDATE) by the "
        "pipeline that writes, renewed while it runs and freed (owner null) when it ends. A second pipeline on the "
        "same lakehouse waits "
        "(`runner.lock_wait_seconds`) or exits with one line naming the holder. A lease past `expires_at`, or "
        "held by a process that no longer exists on this host, is stale and taken over; "
        "`runner.break_lock=true` takes over the lease it finds even when it looks live.", internal=True),
    # ------------------------------------------------------------------ ingest
    TableSpec("units", "ingest", (
        EXPERIMENT,
        C("unit_id", "string", "unit id, trimmed", unit_key=True),
        C("treatment", "int", "0 = control label, 1 = treated label (`source.treatment_labels`)"),
        C("<outcome>", "double", "one column per `source.outcome_cols`, same name (demo: `engagement`); finite",
          repeat="source.outcome_cols"),
        C("text", "string", "the pre-treatment text fields joined by `source.text_separator`; non-empty, valid "
                            "UTF-8"),
        C("<covariate>", "double", "one column per `source.covariate_cols`, same name (demo: `tenure_days`, "
                                   "`prior_sessions`); finite", repeat="source.covariate_cols"),
        C("cluster", "string", "cluster id from `source.cluster_col` (demo: `community`); null when none is "
                               "configured"),
        C("fold", "int", "cross-fitting fold in [0, `ingest.n_folds`), balanced within each arm, never changes once "
                         "stored"),
    ), ("experiment_id", "unit_id"),
        "One row per unit; MERGEd on its key (docs/ingest.md: idempotence, duplicates, changed rows).",
        partition_by=("experiment_id",)),
    TableSpec("quarantine", "ingest", (
        C("experiment_id", "string", "the row's experiment id as mapped (null when missing)"),
        C("unit_id", "string", "the row's unit id as mapped (null when missing)"),
        C("reason", "string", "reason code (docs/ingest.md, `tokens2policy.ingest.REASONS`)"),
        C("message", "string", "human-readable explanation naming the column and value"),
        C("raw_json", "string", "the original row: JSON of every source column, nulls kept"),
        C("row_hash", "string", "sha256 of raw_json"),
        C("occurrence", "int", "1..k among k identical rejected rows"),
        C("source", "string", "where the row came from (`delta:/path`, `demo:<experiment_id> ...`)"),
    ), ("row_hash", "occurrence"), "Every rejected input row, unchanged; MERGEd on its key."),
    TableSpec("demo_source", "ingest", (
        C("experiment_id", "string", "`demo.experiment_id`"),
        C("unit_id", "string", "unit id"),
        C("treatment", "int", "assigned arm (a broken row may hold another value)"),
        C("engagement", "double", "the outcome"),
        C("text", "string", "the article the reader last read"),
        C("tenure_days", "double", "covariate"),
        C("prior_sessions", "bigint", "covariate"),
        C("community", "string", "cluster id"),
        C("article_id", "string", "the BBC article (opaque id)"),
        C("assigned_at", "timestamp", "assignment time"),
        C("measured_at", "timestamp", "time the covariates were measured"),
    ), (), "The demo's raw logs (the ingest source for `source.kind: demo`), including the deliberately broken "
           "rows; written by ingest (`tokens2policy.ingest.demo`) when missing or when the `demo` section changed.",
        optional=True),
    TableSpec("demo_truth", "ingest", (
        C("experiment_id", "string", "`demo.experiment_id`"),
        C("unit_id", "string", "unit id"),
        C("article_id", "string", "the BBC article the reader last read (opaque id)"),
        C("topic", "string", "the article's topic: business, entertainment, politics, sport, tech"),
        C("treatment", "int", "assigned arm"),
        C("true_cate", "double", "the unit's true conditional average treatment effect τ"),
        C("mu0", "double", "E[Y(0) \\| unit] without the noise term"),
    ), ("experiment_id", "unit_id"),
        "Ground truth of the bundled demo, one row per clean demo unit (exactly the demo's rows in `units`).",
        optional=True),
    TableSpec("demo_drivers", "ingest", (
        C("experiment_id", "string", "`demo.experiment_id`"),
        C("role", "string", "`effect_modifier`, `base_effect`, `main_effect`, `intercept`, `prognostic`, "
                            "`cluster_sd`, `noise_sd`"),
        C("term", "string", "e.g. `topic=sport`, `treatment`, `log1p(tenure_days) - 5`"),
        C("coefficient", "double", "its value (`effect_modifier`: already multiplied by `demo.effect_scale`)"),
        C("config_hash", "string", "hash of the `demo` section that generated the tables (regenerated when it "
                                   "changes)"),
    ), ("experiment_id", "role", "term"),
        "Every coefficient of the demo's outcome model; rows with `role = effect_modifier` are the true direct "
        "effect modifiers. Written last of the three demo tables.", optional=True),
    # ------------------------------------------------------------------ embed
    TableSpec("embeddings", "embed", (
        EXPERIMENT, UNIT,
        C("model", "string", "model name (`sentence-transformers/all-MiniLM-L6-v2` for `default`, else "
                             "`embed.model`)"),
        C("model_hash", "string", "the vector function: SHA-256 over the model's files plus every setting that "
                                  "changes a vector (docs/embed.md)"),
        C("content_hash", "string", "SHA-256 of the UTF-8 text (null as \"\"): identical texts share one vector"),
        C("vector", "array<float>", "the document vector (null unless status is ok/truncated/chunked)"),
        C("dim", "int", "vector length (null without a vector)"),
        C("status", "string", "`ok`, `truncated`, `chunked`, `empty`, `too_long` (docs/embed.md)"),
        C("n_tokens", "int", "tokens the vector was computed from (special tokens excluded)"),
    ), ("experiment_id", "unit_id", "model_hash"),
        "One row per unit and model version (docs/embed.md).", partition_by=("experiment_id",)),
    TableSpec("token_states", "embed", (
        EXPERIMENT, UNIT,
        C("model_hash", "string", "as in `embeddings`"),
        C("position", "int", "0-based token index in the text (special tokens excluded)"),
        C("token", "string", "the tokenizer's token (word pieces keep their `##`)"),
        C("vector", "array<float>", "the last hidden layer at that token"),
    ), ("experiment_id", "unit_id", "model_hash", "position"),
        "Token vectors of a deterministic sample of units (`embed.token_sample_rate`).",
        partition_by=("experiment_id",)),
    # ------------------------------------------------------------------ represent
    TableSpec("neurons", "represent", (
        EXPERIMENT, UNIT,
        C("indices", "array<int>", "active neurons, ascending"),
        C("values", "array<float>", "their activations"),
        C("pooled_tokens", "int", "token states max-pooled into the code (0: the document vector's code)"),
    ), ("experiment_id", "unit_id"), "Each unit's sparse code (docs/represent.md).",
        partition_by=("experiment_id",)),
    TableSpec("neuron_stats", "represent", (
        C("neuron", "int", "neuron index"),
        C("n_active", "bigint", "units with the neuron active"),
        C("activation_frequency", "double", "share of units with the neuron active"),
        C("mean_activation", "double", "mean activation over all units"),
        C("mean_activation_when_active", "double", "mean activation over the units where it is active"),
    ), ("neuron",), "One row per neuron of the dictionary."),
    TableSpec("neuron_labels", "represent", (
        C("neuron", "int", "neuron index"),
        C("label", "string", "short label from the top terms"),
        C("top_terms", "array<string>", "terms over-represented in the top documents"),
        C("top_term_z", "array<double>", "their z-scores"),
        C("top_docs", "array<struct<unit_id:string,activation:double,snippet:string>>",
          "top-activating documents (unit ids are `experiment_id/unit_id` unless `represent.experiment_id` is set)"),
        C("bottom_docs", "array<struct<unit_id:string,activation:double,snippet:string>>",
          "lowest-scoring documents"),
        C("top_tokens", "array<string>", "top-activating tokens"),
        C("n_active_sample", "int", "units of the labelling sample with the neuron active"),
    ), ("neuron",), "Interpretation of each neuron (docs/represent.md)."),
    TableSpec("represent_training", "represent", (
        C("vector", "array<float>", "a training vector"),
    ), (), "Staging copy of the training vectors for the distributed backends (overwritten each run).",
        optional=True),
    # ------------------------------------------------------------------ identify
    TableSpec("modifiers", "identify", (
        C("experiment_id", "string", "experiment"), OUTCOME,
        C("feature", "string", "neuron index or covariate name"),
        C("kind", "string", "`Z` neuron / `W` covariate"),
        C("source", "string", "`neuron` / `covariate`"),
        C("label", "string", "the neuron's label (a covariate: its name)"),
        C("p_value", "double", "p-value of the feature given the rest of the selected set"),
        C("t", "double", "its test statistic"),
        C("direction", "string", "`+` / `-`"),
        C("round_added", "int", "search round that added it"),
        C("phase", "string", "search phase that added it"),
        C("test", "string", "`identify.test`"),
        C("adjust", "string", "`identify.adjust`"),
        C("alpha", "double", "`identify.alpha`"),
    ), ("experiment_id", "outcome", "kind", "feature"), "The direct effect modifiers NEXIS selected (docs/identify.md)."),
    TableSpec("selection_trace", "identify", (
        C("experiment_id", "string", "experiment"), OUTCOME,
        C("seq", "int", "step number"),
        C("phase", "string", "search phase"),
        C("round", "int", "round"),
        C("step", "string", "step"),
        C("action", "string", "skip/add/stop_gate1/stop_gate2/stop_empty/stop_df/drop/keep/max_rounds/selected"),
        C("kind", "string", "`Z` / `W` (null for a step about no feature)"),
        C("feature", "string", "neuron index or covariate name"),
        C("t", "double", "test statistic"),
        C("p_value", "double", "p-value"),
        C("threshold", "double", "the threshold it was compared with"),
        C("gate2_ref", "double", "gate-2 reference"),
        C("n_tested", "int", "candidates tested"),
        C("n_eligible", "int", "candidates eligible"),
        C("detail", "string", "JSON of the remaining fields"),
    ), ("experiment_id", "outcome", "seq"), "Every decision of the search, in order."),
    TableSpec("marginal_screen", "identify", (
        C("experiment_id", "string", "experiment"), OUTCOME,
        C("feature", "string", "neuron index or covariate name"),
        C("kind", "string", "`Z` / `W`"),
        C("t", "double", "marginal test statistic"),
        C("p_value", "double", "raw p-value"),
        C("p_bonferroni", "double", "Bonferroni-adjusted"),
        C("q_bh", "double", "Benjamini-Hochberg q-value"),
        C("reject_raw", "boolean", "p_value <= alpha"),
        C("reject_bonferroni", "boolean", "p_bonferroni <= alpha"),
        C("reject_bh", "boolean", "q_bh <= alpha"),
    ), ("experiment_id", "outcome", "kind", "feature"), "The marginal screening comparison (one test per feature)."),
    # ------------------------------------------------------------------ effects
    TableSpec("gates", "effects", (
        C("experiment_id", "string", "experiment"), OUTCOME,
        C("feature", "string", "`neuron_<i>` or covariate; `(treatment)` for the joint T row"),
        C("label", "string", "the modifier's label"),
        C("source", "string", "`neuron` / `covariate`"),
        C("split", "string", "`sparse|continuous|categorical|joint`"),
        C("group", "string", "the group (level, active/inactive, quantile, contrast)"),
        C("n", "bigint", "units in the group"),
        C("n_treated", "bigint", "treated units in the group"),
        C("estimate", "double", "the group's effect"),
        C("se", "double", "standard error"),
        C("ci_low", "double", "CI lower bound"),
        C("ci_high", "double", "CI upper bound"),
        C("p_value", "double", "p-value"),
        C("se_type", "string", "`HC1` / `CR1S`"),
        C("estimated_on", "string", "units the numbers come from: `estimation` (none of them selected the modifiers, "
                                    "`honesty.mode=split`) or `all` (`honesty.mode=none`: not selection-aware)"),
    ), ("experiment_id", "outcome", "feature", "group"), "Group effects per selected modifier (docs/effects.md)."),
    TableSpec("effects", "effects", (
        EXPERIMENT, UNIT, OUTCOME,
        C("learner", "string", "CATE learner"),
        C("cate", "double", "CATE"),
        C("ci_low", "double", "CI lower bound (NaN for flexible final stages)"),
        C("ci_high", "double", "CI upper bound"),
        C("cate_oof", "double", "out-of-fold CATE"),
        C("fold", "int", "the unit's fold"),
        C("mu0", "double", "cross-fitted E[Y|T=0,X]"),
        C("mu1", "double", "cross-fitted E[Y|T=1,X]"),
        C("propensity", "double", "propensity"),
        C("dr_score0", "double", "AIPW score Γ(0)"),
        C("dr_score1", "double", "AIPW score Γ(1)"),
        C("sample", "string", "the unit's honesty role: `selection`, `estimation` or `both` (`honesty.mode=none`)"),
        C("dr_score0_nested", "array<double>", "AIPW scores Γ(0) from the nuisances fitted without the unit's fold "
                                               "and each other fold in turn (nested cross-fitting: the rewards a "
                                               "held-out policy tree trains on)"),
        C("dr_score1_nested", "array<double>", "the same for Γ(1)"),
    ), ("experiment_id", "outcome", "learner", "unit_id"), "Per-unit effects of each learner (docs/effects.md)."),
    TableSpec("calibration", "effects", (
        C("experiment_id", "string", "experiment"), OUTCOME,
        C("learner", "string", "CATE learner"),
        C("metric", "string", "`blp|gates|rate|toc_curve|qini_curve`"),
        C("group", "string", "group / coefficient"),
        C("q", "double", "share treated (curves only)"),
        C("estimate", "double", "estimate"),
        C("se", "double", "standard error"),
        C("ci_low", "double", "CI lower bound"),
        C("ci_high", "double", "CI upper bound"),
        C("p_value", "double", "p-value"),
        C("null_hypothesis", "string", "what p_value tests"),
        C("n", "bigint", "units"),
        C("estimated_on", "string", "units the numbers come from: `estimation` (none of them selected the modifiers, "
                                    "`honesty.mode=split`) or `all` (`honesty.mode=none`: not selection-aware)"),
    ), ("experiment_id", "outcome", "learner", "metric", "group", "q"),
        "Held-out calibration of each learner (docs/effects.md)."),
    TableSpec("cate_final_stages", "effects", (
        C("experiment_id", "string", "experiment"), OUTCOME,
        C("learner", "string", "CATE learner with a linear final stage (`dr_selected`, `r_selected`)"),
        C("terms", "array<string>", "the design terms: `(intercept)`, then the selected modifiers' columns as "
                                    "in `effects.modifier_encoding` (`neuron_<i>`, a covariate, `<covariate>[level=x]`)"),
        C("coef", "array<double>", "the fitted coefficients β, one per term: τ̂(z) = [1, z]β"),
        C("cov", "array<array<double>>", "their robust covariance V (rows in the order of `terms`)"),
        C("se_type", "string", "`HC1` / `CR1S`"),
        C("n_clusters", "bigint", "clusters of CR1S (null for HC1)"),
        C("critical_value", "double", "c of the CATE CI τ̂(z) ± c·√([1, z] V [1, z]') (normal; Student t with "
                                      "n_clusters - 1 df for CR1S)"),
        C("alpha", "double", "`effects.alpha`: the CI's level is 1 - alpha"),
        C("encoding", "string", "`effects.modifier_encoding`: how sparse neurons enter the design (`indicator` / "
                                "`value`)"),
        C("n", "bigint", "units the final stage was fitted on"),
        C("estimated_on", "string", "units the numbers come from: `estimation` (none of them selected the modifiers, "
                                    "`honesty.mode=split`) or `all` (`honesty.mode=none`: not selection-aware)"),
    ), ("experiment_id", "outcome", "learner"),
        "The fitted linear final stage of each `*_selected` learner (`tokens2policy.effects.final_stage`), kept as "
        "EconML keeps `model_final_`: the policy stage builds the served model's CATE and CI from it instead of "
        "refitting (docs/effects.md)."),
    # ------------------------------------------------------------------ policy
    TableSpec("policy_rules", "policy", (
        C("experiment_id", "string", "experiment"), OUTCOME,
        C("learner", "string", "the effects learner the rules use (`policy.learner`)"),
        C("policy", "string", "`tree|threshold|budget`"),
        C("leaf_id", "int", "tree leaf (0 for the other rules)"),
        C("rule", "string", "`IF … THEN treat|control`"),
        C("conditions", "string", "the leaf's conditions"),
        C("treat", "int", "1: the rule (leaf) treats, 0: control"),
        C("action_name", "string", "`treat` / `control`"),
        C("n", "bigint", "units the rule covers"),
        C("leaf_effect", "double", "mean DR score difference in the leaf (in-sample: optimistic)"),
        C("leaf_effect_se", "double", "its standard error"),
        C("cost", "double", "`policy.cost`"),
        C("estimated_on", "string", "units the numbers come from: `estimation` (none of them selected the modifiers, "
                                    "`honesty.mode=split`) or `all` (`honesty.mode=none`: not selection-aware)"),
    ), ("experiment_id", "outcome", "learner", "policy", "leaf_id"), "The learned rules (docs/policy.md)."),
    TableSpec("policy_value", "policy", (
        C("experiment_id", "string", "experiment"), OUTCOME,
        C("learner", "string", "the effects learner"),
        C("policy", "string", "`treat_all|treat_none|tree|threshold|budget`"),
        C("comparison", "string", "`value` or `minus treat_all|minus treat_none|minus random_same_budget`"),
        C("treated_share", "double", "share treated"),
        C("estimate", "double", "AIPW value (or difference); a learned rule's row (tree|threshold|budget) is "
                                "cross-fitted (each unit assigned by the rule learned without its fold): it "
                                "estimates the expected value of the rule-learning procedure, not of the deployed "
                                "rule"),
        C("se", "double", "standard error; learned rules: Imai & Li's (2023) cross-fitting variance, which adds the "
                          "learned rule's variability across folds (docs/policy.md)"),
        C("ci_low", "double", "CI lower bound"),
        C("ci_high", "double", "CI upper bound"),
        C("p_value", "double", "p-value"),
        C("n", "bigint", "units"),
        C("cost", "double", "`policy.cost`"),
        C("estimated_on", "string", "units the numbers come from: `estimation` (none of them selected the modifiers, "
                                    "`honesty.mode=split`) or `all` (`honesty.mode=none`: not selection-aware)"),
    ), ("experiment_id", "outcome", "learner", "policy", "comparison"),
        "Cross-fitted policy values and paired comparisons on the estimation units (docs/policy.md)."),
    TableSpec("assignments", "policy", (
        EXPERIMENT, UNIT, OUTCOME,
        C("policy", "string", "the rule"),
        C("recommended", "boolean", "the rule is `policy.recommended`"),
        C("treat", "int", "deployable rule's assignment"),
        C("heldout_treat", "int", "cross-fitted rule's assignment (what the value used)"),
        C("cate", "double", "the unit's CATE"),
        C("rule", "string", "the rule that fired"),
        C("leaf_id", "int", "tree leaf (-1 otherwise)"),
        C("sample", "string", "the unit's honesty role: `selection`, `estimation` or `both`"),
    ), ("experiment_id", "outcome", "policy", "unit_id"), "Per-unit assignments of every rule."),
    # ------------------------------------------------------------------ score (outside the pipeline)
    TableSpec("scores", "score", (
        C("experiment_id", "string", "experiment"),
        C("unit_id", "string", "unit id as in the score input"),
        OUTCOME,
        C("treat", "int", "the recommendation: 1 treat, 0 control"),
        C("cate", "double", "τ̂(z) of the policy model's linear final stage"),
        C("ci_low", "double", "its CI lower bound (null when the model stores no covariance)"),
        C("ci_high", "double", "its CI upper bound"),
        C("rule", "string", "the rule that fired (a tree leaf's rule, or the CATE cutoff)"),
        C("leaf_id", "int", "tree rule: the leaf; -1 otherwise"),
        C("embed_status", "string", "`ok`, `empty`, `too_long` ... (docs/embed.md), or `not_needed`"),
        C("model_name", "string", "registered model name (null for a `runs:/` or path URI)"),
        C("model_version", "string", "registered model version (null likewise)"),
        C("model_uri", "string", "the model used, pinned: `models:/<name>/<version>` when registered"),
        C("input_fingerprint", "string", "SHA-256 of the input row as JSON"),
        C("source", "string", "where the input came from (`kind:location`)"),
        C("scored_at", "timestamp", "when this (input row, model) was first scored"),
    ), ("experiment_id", "unit_id", "outcome"),
        "The registered policy's recommendation for each scored unit (`t2p score`, docs/score.md); MERGEd on its "
        "key, a stored row replaced only when its input row or its model changed.", partition_by=("experiment_id",),
        optional=True),
    TableSpec("score_quarantine", "score", (
        C("experiment_id", "string", "the row's experiment id as mapped (null when missing)"),
        C("unit_id", "string", "the row's unit id as mapped (null when missing)"),
        C("reason", "string", "ingest's reason code (`tokens2policy.ingest.REASONS`)"),
        C("message", "string", "human-readable explanation naming the column and value"),
        C("raw_json", "string", "the original input row: JSON of every column, nulls kept"),
        C("row_hash", "string", "sha256 of raw_json"),
        C("occurrence", "int", "1..k among k identical rejected rows"),
        C("source", "string", "where the row came from (`kind:location`)"),
    ), ("row_hash", "occurrence"),
        "Every score input row that could not be scored, unchanged (the columns of `quarantine`); MERGEd on its "
        "key: a rerun adds nothing, k identical broken rows stay k rows.", optional=True),
    # ------------------------------------------------------------------ validate (outside the pipeline)
    TableSpec("validation_runs", "validate", (
        C("run_id", "string", "MLflow run id of the study"),
        C("study", "string", "size preset (`ci`/`full`)"),
        C("task_id", "bigint", "the Spark task (design point × repetition)"),
        C("design", "string", "`linear`/`quadratic`/`null`/`text`"),
        C("outcome", "string", "`gaussian`/`binary`"),
        C("n", "bigint", "sample size"),
        C("m", "bigint", "proxies or SAE latents"),
        C("effect", "double", "heterogeneity scale"),
        C("rep", "bigint", "repetition index"),
        C("kind", "string", "`selection` or `coverage`"),
        C("method", "string", "selection method"),
        C("family", "string", "method family"),
        C("test", "string", "test"),
        C("backward", "boolean", "backward step on"),
        C("rho", "double", "rho (NaN = off)"),
        C("selected", "string", "JSON list of selected column ids"),
        C("truth", "string", "JSON list of true column ids"),
        C("n_selected", "bigint", "size of the selected set"),
        C("n_true_selected", "bigint", "true features selected"),
        C("iou", "double", "IoU with the truth"),
        C("precision", "double", "precision"),
        C("recall", "double", "recall"),
        C("any_selected", "double", "1 when anything was selected (a family-wise error under the null)"),
        C("estimand", "string", "coverage rows: the estimand"),
        C("estimate", "double", "estimate"),
        C("se", "double", "standard error"),
        C("ci_low", "double", "CI lower bound"),
        C("ci_high", "double", "CI upper bound"),
        C("true_value", "double", "the true value"),
        C("covered", "double", "1 when the CI covers it"),
        C("seconds", "double", "wall time of the method"),
        C("aligned", "string", "JSON list of groups of interchangeable column ids"),
        C("iou_aligned", "double", "IoU modulo `aligned`"),
        C("precision_aligned", "double", "precision modulo `aligned`"),
        C("recall_aligned", "double", "recall modulo `aligned`"),
        C("any_false", "double", "1 when a column outside the truth was selected (a family-wise error)"),
    ), ("run_id", "task_id", "kind", "method", "estimand"),
        "Results of the validation study, appended per run (docs/validation.md)."),
    TableSpec("validation_pipeline_path", "validate", (
        C("run_id", "string", "MLflow run id of the study"),
        C("design", "string", "`null` / `alternative`"),
        C("n", "bigint", "sample size"),
        C("m", "bigint", "neurons"),
        C("effect", "double", "heterogeneity scale"),
        C("rep", "bigint", "repetition index"),
        C("mode", "string", "`honesty.mode`: `split` / `none`"),
        C("selector", "string", "`nexis` / `top_marginal`"),
        C("n_selection", "bigint", "units that selected the modifiers"),
        C("n_estimation", "bigint", "units the numbers come from"),
        C("selected", "string", "JSON list of selected column ids"),
        C("n_selected", "bigint", "size of the selected set"),
        C("iou", "double", "IoU with the truth"),
        C("estimand", "string", "what the row is about (a claim or a CI)"),
        C("kind", "string", "`claim` (a false claim under the null) / `coverage` (a CI against its truth)"),
        C("estimate", "double", "estimate"),
        C("ci_low", "double", "CI lower bound"),
        C("ci_high", "double", "CI upper bound"),
        C("p_value", "double", "p-value"),
        C("true_value", "double", "the true value"),
        C("covered", "double", "1 when the CI covers it"),
        C("claim", "double", "1 when the table makes the claim"),
        C("seconds", "double", "wall time"),
    ), ("run_id", "design", "rep", "mode", "selector", "estimand"),
        "The validation on the pipeline's own path (`tokens2policy.validate.pipeline_path`): select → effects → "
        "policy as the stages run them, appended per run (docs/validation.md)."),
    # ------------------------------------------------------------------ diagnostics (jobs/cluster_check.py)
    TableSpec("cluster_check", "cluster_check", (
        C("partition", "int", "partition index"),
        C("n_rows", "bigint", "rows in the partition"),
        C("pid", "bigint", "Python worker process id"),
        C("hostname", "string", "its host"),
        C("executor_id", "string", "Spark executor id"),
        C("module_file", "string", "the file `tokens2policy` was imported from"),
        C("cwd", "string", "the worker's working directory"),
        C("driver_pid", "bigint", "driver process id"),
        C("driver_host", "string", "driver host"),
        C("master", "string", "Spark master"),
        C("app_id", "string", "Spark application id"),
    ), ("partition",), "Where Python code ran (`tokens2policy.lakehouse.diagnostics`, `jobs/cluster_check.py`).",
        internal=True),
)

TABLES: Dict[str, TableSpec] = {t.name: t for t in _TABLES}


class UnknownTableError(KeyError):
    pass


def table_spec(name: str) -> TableSpec:
    try:
        return TABLES[name]
    except KeyError:
        raise UnknownTableError(f"table '{name}' is not in the table registry (tokens2policy/lakehouse/schemas.py)") \
            from None


def tables_of(stage: str) -> Tuple[str, ...]:
    """The tables ``stage`` writes, in registry order."""
    return tuple(t.name for t in _TABLES if t.stage == stage)


def check_frame_schema(name: str, actual: T.StructType, repeats: Optional[Mapping[str, Sequence[str]]] = None,
                       key_types: Optional[Mapping[str, str]] = None) -> None:
    """Raise :class:`SchemaContractError` (one line) unless ``actual`` has exactly the table's columns and types
    (any order; nullability not compared)."""
    spec = table_spec(name)
    want = dict(spec.expanded(repeats, key_types))
    have = {f.name: f.dataType for f in actual.fields}
    missing = [c for c in want if c not in have]
    extra = [c for c in have if c not in want]
    wrong = [f"{c} is {type_string(have[c])}, not {want[c]}" for c in want
             if c in have and not _same_type(have[c], parse_type(want[c]))]
    if missing or extra or wrong:
        parts = ([f"missing {missing}"] if missing else []) + ([f"unregistered {extra}"] if extra else []) + wrong
        raise SchemaContractError(f"frame written to table '{name}' breaks its contract (lakehouse/schemas.py): "
                                  + "; ".join(parts))


# ---------------------------------------------------------------------------------------------- docs/tables.md
BEGIN, END = "<!-- BEGIN TABLES (generated from lakehouse/schemas.py; do not edit by hand) -->", \
    "<!-- END TABLES -->"


def _md(text: str) -> str:
    return text.replace("|", "\\|") if "\\|" not in text else text


def markdown(stage_order: Optional[Iterable[str]] = None) -> str:
    """The generated part of docs/tables.md: one section per table, in pipeline order."""
    order = list(stage_order or ("runner", "ingest", "embed", "represent", "identify", "effects", "policy",
                                 "score", "validate", "cluster_check"))
    out: List[str] = []
    for stage in order:
        for spec in (t for t in _TABLES if t.stage == stage):
            bits = [f"written by {'the stage runner' if stage == 'runner' else stage}",
                    "key (" + ", ".join(spec.keys) + ")" if spec.keys else "no key"]
            if spec.partition_by:
                bits.append("partitioned by " + ", ".join(spec.partition_by))
            if spec.optional:
                bits.append("optional")
            out.append(f"## {spec.name} ({'; '.join(bits)})")
            out.append(spec.description)
            out.append("")
            out.append("| column | type | meaning |")
            out.append("| --- | --- | --- |")
            for c in spec.columns:
                name = f"*{c.name.strip('<>')}*" if c.repeat else c.name
                typ = c.type + (" (as in `units`)" if c.unit_key else "")
                out.append(f"| {name} | {typ} | {_md(c.meaning)} |")
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def render_doc(current: str) -> str:
    """``current`` (the text of docs/tables.md) with its generated section replaced by :func:`markdown`."""
    if BEGIN not in current or END not in current:
        raise ValueError("docs/tables.md has no generated section markers")
    head, rest = current.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return head + BEGIN + "\n" + markdown() + END + tail


def parse_doc_tables(text: str) -> Dict[str, List[Tuple[str, str]]]:
    """Every ``## name (...)`` section's (column, type) rows as written in the page (for the docs test)."""
    out: Dict[str, List[Tuple[str, str]]] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"## (\w+) \(", line)
        if m:
            current = m.group(1)
            out[current] = []
            continue
        if current and line.startswith("| ") and not line.startswith(("| column", "| ---")):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            if len(cells) >= 2:
                typ = cells[1].replace(" (as in `units`)", "")
                out[current].append((cells[0].strip("*"), typ))
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse
    from pathlib import Path

    p = argparse.ArgumentParser(description="print or update the generated table contracts of docs/tables.md")
    p.add_argument("--write", metavar="PATH", help="rewrite the generated section of this file (docs/tables.md)")
    args = p.parse_args(argv)
    if args.write:
        path = Path(args.write)
        path.write_text(render_doc(path.read_text(encoding="utf-8")), encoding="utf-8")
    else:
        print(markdown(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
