"""Typed run configuration.

One YAML profile (``conf/local.yaml``, ``conf/cluster.yaml``, ``conf/databricks.yaml``) plus ``--set a.b=c``
overrides resolves to one :class:`Config`. Every section is a pydantic model with ``extra="forbid"`` so a typo is
a one-line error naming the key, not a silently ignored setting. ``data_dir`` roots everything a local run writes
(lakehouse, MLflow store, reports), so ``--set data_dir=/new/dir`` gives a fresh, isolated run; it may be a URI
(``hdfs://``, ``s3a://``, ``abfss://``, ``dbfs:/``, ``file://``): see :attr:`Config.data_uri`.

The profiles ship inside the package (``tokens2policy/profiles``, copied from ``conf/`` when the wheel is built), so
``--config local`` (or ``conf/local.yaml`` from any directory) and the default profile are found wherever the
package is installed; in a source checkout ``conf/`` itself is used.

YAML 1.1 turns ``no``/``yes``/``on``/``off`` into booleans; profiles and ``--set`` values are read with only
``true``/``false`` as booleans (YAML 1.2), so ``treatment_labels: [no, yes]`` stays two strings.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

_PACKAGE_DIR = Path(__file__).resolve().parent
_CHECKOUT = _PACKAGE_DIR.parents[1]
# The source checkout this module runs from (lib/tokens2policy/config.py with setup.py two levels up), or None
# for an installed package: nothing is looked up inside site-packages by accident.
REPO_ROOT: Optional[Path] = _CHECKOUT if (_CHECKOUT / "setup.py").is_file() and (_CHECKOUT / "conf").is_dir() \
    else None
PROFILE_NAMES = ("local", "cluster", "databricks")


def profiles_dir():
    """Where the bundled profiles are: ``conf/`` of the source checkout, else the package's ``profiles/`` (an
    importlib.resources Traversable: also inside a zip shipped with ``spark-submit --py-files``)."""
    if REPO_ROOT is not None:
        return REPO_ROOT / "conf"
    from importlib.resources import files

    return files("tokens2policy") / "profiles"


def profile_path(name: str):
    """A bundled profile by name (``local``, ``cluster``, ``databricks``; ``.yaml`` optional)."""
    stem = name[:-5] if name.endswith(".yaml") else name
    return profiles_dir() / f"{stem}.yaml"


DEFAULT_PROFILE = profile_path("local")


class ConfigError(ValueError):
    """A user error in the configuration: printed as one line, never as a stack trace."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SparkConfig(Section):
    master: Optional[str] = "local[2]"  # ignored under spark-submit (its --master wins); null: Spark's default
    app_name: str = "tokens2policy"
    # "auto": reuse an active session (Databricks, notebooks), else build one. "create": always build.
    session: Literal["auto", "create", "existing"] = "auto"
    shuffle_partitions: int = 4
    driver_memory: str = "4g"
    # Extra Spark conf, e.g. {"spark.executor.memory": "8g"}.
    conf: Dict[str, str] = Field(default_factory=dict)
    # "cache": Delta jars from the local cache filled by setup (no network at run time);
    # "packages": resolve io.delta coordinates through spark.jars.packages (clusters with Maven access);
    # "provided": the platform ships Delta (Databricks).
    delta_jars: Literal["cache", "packages", "provided"] = "cache"
    # Hadoop file system connectors to put on the classpath, the same way as the Delta jars: "s3a" (hadoop-aws in
    # pyspark's Hadoop version + its AWS SDK bundle; `t2p setup --s3a` caches them). Nothing with "provided".
    hadoop_connectors: List[Literal["s3a"]] = Field(default_factory=list)


class LakehouseConfig(Section):
    # "path": Delta tables at <root>/<schema>/<table>; "catalog": [catalog.]schema.table in the session's catalog
    # (Unity Catalog on Databricks, the Hive metastore with spark.sql.catalogImplementation=hive elsewhere).
    mode: Literal["path", "catalog"] = "path"
    catalog: Optional[str] = None
    schema_: str = Field("tokens2policy", alias="schema")
    root: Optional[str] = None  # a path or URI (hdfs://, s3a://, abfss://, dbfs:/, file://); <data_dir>/lakehouse
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


class TrackingConfig(Section):
    # default: sqlite:///<data_dir>/mlflow/mlflow.db (a local data_dir only; set it for a remote data_dir)
    tracking_uri: Optional[str] = None
    registry_uri: Optional[str] = None
    # artifact location of a new MLflow experiment: None leaves it to the tracking server (the embedded default
    # store keeps its artifacts under <data_dir>/mlflow/artifacts)
    artifact_root: Optional[str] = None
    experiment_name: str = "tokens2policy"
    # registered model names; {catalog}, {schema}, {experiment}, {outcome} are filled in (and, in catalog mode, a
    # name without dots becomes <catalog>.<schema>.<name> with only letters, digits and _). None: the defaults
    # tokens2policy-represent / tokens2policy-policy-{experiment}-{outcome} (catalog mode: represent /
    # policy_{experiment}_{outcome}).
    represent_model_name: Optional[str] = None
    policy_model_name: Optional[str] = None
    model_alias: Optional[str] = "champion"  # set on every new registered version (no "latest" on Unity Catalog)
    # the built wheel (path/URI) the logged models' requirements point at; None: dist/tokens2policy-<version>-*.whl
    # of the source checkout when it exists, else tokens2policy==<version>
    package_wheel: Optional[str] = None


DEMO_TOPICS = ("business", "entertainment", "politics", "sport", "tech")  # the BBC News corpus' five topics


class SourceConfig(Section):
    """Where the experiment logs come from and how their columns map to the ``units`` contract (docs/ingest.md).

    The defaults map the bundled demo experiment's logs. ``kind``: ``demo``; files at ``path`` (a path, URI or
    glob: ``delta``, ``parquet``, ``csv``, ``json``); ``table``: a metastore / Unity Catalog table or view named
    by ``table``; ``query``: the result of the Spark SQL ``query``. ``treatment_labels`` are
    ``[control, treated]``: two numbers compare numerically (``1`` matches ``1``, ``1.0`` and ``"1"``), anything
    else compares as text after trimming (``true``/``false`` case-insensitively, so a boolean column matches); two
    labels naming the same value (``[1, 1.0]``, ``[true, "True"]``) are a ConfigError. A timestamp pair
    (``assigned_at_col``, ``measured_at_col``) enables the post-treatment-covariate check; ``kind: demo`` uses the
    demo's own ``assigned_at``/``measured_at`` when they are not set.
    """

    kind: Literal["demo", "delta", "parquet", "csv", "json", "table", "query"] = "demo"
    path: Optional[str] = None
    table: Optional[str] = None  # kind table: [catalog.]schema.table (or a view)
    query: Optional[str] = None  # kind query: a Spark SQL SELECT
    experiment_id_col: str = "experiment_id"
    unit_id_col: str = "unit_id"
    treatment_col: str = "treatment"
    treatment_labels: List[Any] = Field(default_factory=lambda: [0, 1])  # [control, treated]
    outcome_cols: List[str] = Field(default_factory=lambda: ["engagement"])
    text_cols: List[str] = Field(default_factory=lambda: ["text"])
    text_separator: str = "\n\n"  # joins several text fields into the one ``text`` column
    covariate_cols: List[str] = Field(default_factory=lambda: ["tenure_days", "prior_sessions"])
    cluster_col: Optional[str] = "community"
    assigned_at_col: Optional[str] = None
    measured_at_col: Optional[str] = None
    experiment_id: Optional[str] = None  # constant experiment id when the logs hold one experiment without the column
    csv_header: bool = True  # kind csv: first line holds the column names
    # kind csv: a declared schema (Spark DDL, e.g. "unit_id string, treatment int, text string"); None: the
    # header's column names, every column read as text (the ingest checks do the typing)
    csv_schema: Optional[str] = None
    # kind csv/json: a line that does not parse (too few or too many fields, broken JSON) is quarantined as
    # `malformed_line` with the raw line ("quarantine"), or stops ingest with one line ("fail", Spark FAILFAST)
    malformed: Literal["quarantine", "fail"] = "quarantine"

    @field_validator("treatment_labels")
    @classmethod
    def _two_labels(cls, v: List[Any]) -> List[Any]:
        if len(v) != 2:
            raise ValueError("needs exactly two distinct labels [control, treated]")
        for label in v:
            if label is None or isinstance(label, (list, dict)):
                raise ValueError(f"label {label!r} is not a scalar (a string, number or true/false)")
        a, b = (label_key(x) for x in v)
        same = a == b if a[0] == b[0] == "number" else label_text(v[0]) == label_text(v[1])
        if same:
            raise ValueError(f"control {v[0]!r} and treated {v[1]!r} name the same value ({label_text(v[0])!r}); "
                             "quote the labels as they appear in the data, e.g. ['0', '1']")
        return v

    @property
    def location_key(self) -> Optional[str]:
        """The setting that says where this kind of source is (``path``, ``table``, ``query``; None for demo)."""
        return {"table": "table", "query": "query", "demo": None}.get(self.kind, "path")

    @field_validator("outcome_cols", "text_cols")
    @classmethod
    def _not_empty(cls, v: List[str]) -> List[str]:
        if not v:
            raise ValueError("needs at least one column")
        return v


def label_text(label: Any) -> str:
    """A treatment label as the text it matches: trimmed (Unicode whitespace), ``true``/``false`` lower-cased so a
    boolean column (and True/TRUE) matches, numbers as written (``1``, ``1.5``)."""
    if isinstance(label, bool):
        return "true" if label else "false"
    text = strip_unicode(str(label))
    return text.lower() if text.lower() in ("true", "false") else text


def label_key(label: Any):
    """What a treatment label matches, as a comparable key: ("number", float) for a number, else ("text",
    :func:`label_text`)."""
    if isinstance(label, (int, float)) and not isinstance(label, bool):
        if isinstance(label, float) and not math.isfinite(label):
            raise ValueError(f"label {label!r} is not a finite number")
        return "number", float(label)
    return "text", label_text(label)


_UNICODE_EDGE = re.compile(r"^[\s\u200b\ufeff]+|[\s\u200b\ufeff]+$")


def strip_unicode(text: str) -> str:
    """Trim Unicode whitespace (and zero-width space / BOM) at both ends, as ingest trims ids and labels."""
    return _UNICODE_EDGE.sub("", text)


class DemoConfig(Section):
    """The bundled semi-synthetic experiment on the real BBC News corpus (docs/ingest.md, "The demo experiment")."""

    experiment_id: str = "bbc_news_feature"
    n_units: int = Field(20000, ge=10)
    seed: int = 7
    base_effect: float = 0.5
    effect_scale: float = 1.0  # multiplies every topic modifier coefficient
    modifiers: Dict[str, float] = Field(default_factory=lambda: {"sport": 1.5, "politics": -1.0})
    topic_main_effects: Dict[str, float] = Field(
        default_factory=lambda: {"business": 0.2, "entertainment": 0.1, "politics": -0.1, "sport": 0.3, "tech": 0.0}
    )
    noise_sd: float = Field(1.0, ge=0.0)
    treated_share: float = Field(0.5, gt=0.0, lt=1.0)
    n_clusters: int = Field(200, ge=1)
    community_sd: float = Field(0.3, ge=0.0)  # sd of the community random intercept (why cluster-robust SEs matter)
    bad_rows: bool = True  # append a handful of deliberately broken log rows (exercises the quarantine)

    @field_validator("modifiers", "topic_main_effects")
    @classmethod
    def _known_topics(cls, v: Dict[str, float]) -> Dict[str, float]:
        unknown = sorted(set(v) - set(DEMO_TOPICS))
        if unknown:
            raise ValueError(f"unknown topic(s) {unknown}; the BBC topics are {list(DEMO_TOPICS)}")
        return v


class IngestConfig(Section):
    n_folds: int = Field(5, ge=2)
    fold_seed: int = 17
    smd_warn: float = 0.1  # |standardized mean difference| above this ...
    smd_tolerance_sd: float = 4.0  # ... and this many standard errors from 0 → broken-randomization warning
    share_tolerance_sd: float = 4.0  # warn when the treated share is this many binomial SDs off the expected share
    expected_treated_share: Optional[float] = Field(None, gt=0.0, lt=1.0)  # None: demo.treated_share for the demo
    # on a changed row for an existing key: "update" (latest ingest wins) or "keep" (first ingest wins; the new
    # row goes to the quarantine as `conflicts_with_stored`)
    on_changed_row: Literal["update", "keep"] = "update"
    # when more than this share of the input rows is rejected, ingest fails (one line naming the top reasons)
    # after writing the quarantine and before touching `units`; 1.0 never fails
    max_reject_share: float = Field(0.5, ge=0.0, le=1.0)


class EmbedConfig(Section):
    model: str = "default"
    max_tokens: int = 128
    long_text: Literal["truncate", "chunk_mean"] = "truncate"
    # token budget and item cap per forward pass; None: per device (embed.models.DEFAULT_BATCHING)
    batch_tokens: Optional[int] = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    token_sample_rate: float = 0.1
    token_states_per_unit: int = 64
    max_text_chars: int = 100000
    # "text" (built in) or "package.module:function" returning a tokens2policy.embed.models.EmbeddingModel
    loader: str = "text"
    max_chunks: int = 16  # long_text=chunk_mean: at most this many windows per text (status "truncated" beyond)
    max_batch_size: Optional[int] = None  # items per forward pass, whatever the token budget
    cpu_threads: Optional[int] = None  # torch threads per Python worker; None: cores / concurrent tasks
    partitions: Optional[int] = None  # None: max(default parallelism, texts / 20000)
    load_log: Optional[str] = None  # diagnostics: append one JSON line per model load (pid, seconds, device)
    # forward pass: torch, or ONNX Runtime (exported once per machine into cache_dir); auto: docs/embed.md
    runtime: Literal["auto", "torch", "onnx"] = "auto"
    quantize: Literal["none", "int8"] = "none"  # int8: ONNX Runtime dynamic quantization (a new model_hash)
    # torch arithmetic: auto = fp16 on a GPU, fp32 on a CPU; bf16 = bf16 autocast (fast on CPUs with AMX /
    # AVX512-BF16; a new model_hash: docs/embed.md, "Precision")
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    cache_dir: Optional[str] = None  # local ONNX export cache; None: $T2P_CACHE_DIR or ~/.cache/tokens2policy


class RepresentConfig(Section):
    kind: Literal["sae", "raw", "pca"] = "sae"
    train_on: Literal["tokens", "documents", "both"] = "documents"
    expansion: int = 8
    n_latents: Optional[int] = None  # None: from docs_per_latent (docs/represent.md, "Choosing the dictionary")
    # k = 8 and >= 100 distinct texts per latent: 128 latents on the 2,225-article demo corpus; bigger dictionaries
    # split drivers into many small neurons (validation designs 2 and 3)
    k: int = 8
    epochs: int = 20
    batch_size: int = 512
    lr: float = 1e-3
    backend: Literal["local", "torch", "horovod"] = "local"
    num_processes: int = 1
    use_gpu: bool = False
    redact: bool = True
    n_examples: int = 5
    register_model: bool = True
    # represent stage additions (docs/represent.md)
    experiment_id: Optional[str] = None  # None: one dictionary over every experiment's vectors
    model_hash: Optional[str] = None  # None: the embedding model version with the most vectors
    aux_k: int = 64  # dead latents in the TopK auxiliary loss (0: off)
    num_threads: Optional[int] = None  # torch CPU threads for local training
    pca_components: Optional[int] = None  # kind=pca
    label_top_docs: int = 20  # documents whose words are contrasted with the corpus for a label
    label_max_docs: int = 20000  # units sampled (deterministically) for labelling
    label_max_tokens: int = 50000  # token states encoded for top tokens
    # neurons table: each unit's document-vector code, or the max over its sampled token states' codes
    # (units without sampled token states keep their document code; see docs/represent.md)
    encode: Literal["document", "tokens_maxpool"] = "document"
    # nested (Matryoshka) dictionary prefixes, e.g. [16, 64]: the first 16 latents must reconstruct alone (coarse
    # features), the next add detail; [] = a plain TopK SAE (docs/represent.md)
    matryoshka: List[int] = Field(default_factory=list)
    # n_latents: null -> from the data: the largest power of 2 with (distinct documents x k / n_latents) >= this
    # (capped at expansion x dim); null here too -> expansion x dim (docs/represent.md, "Choosing the dictionary")
    docs_per_latent: Optional[int] = Field(100, ge=1)


class IdentifyConfig(Section):
    alpha: float = 0.05
    # gcm: model-free and calibrated on every null design of the validation study (docs/validation.md);
    # linear / hc2 / cluster stay available (hc1 was removed: anti-conservative on sparse codes, issue 13)
    test: Literal["linear", "hc2", "cluster", "gcm"] = "gcm"
    adjust: Optional[Literal["FWER", "FDR"]] = "FWER"
    rho: Optional[float] = 0.5
    backward: bool = True
    # GCM learner of y and the pseudo-outcome on Z_S, and of every candidate Z_j on Z_S (docs/identify.md)
    nuisance: Literal["spline", "poly2", "lgbm"] = "spline"
    z_nuisance: Literal["spline", "poly2", "linear"] = "spline"  # (per-candidate lgbm: in-memory nexis() only)
    max_rounds: int = 20
    min_active: int = 20  # neurons active in fewer units are skipped (recorded in the trace)
    use_covariates: bool = True

    @field_validator("test", mode="before")
    @classmethod
    def _no_hc1(cls, v):
        if v == "hc1":
            raise ValueError("hc1 is no longer offered: anti-conservative on sparse codes (null FWER 0.88 at "
                             "alpha 0.05, docs/validation.md); use hc2 (HC2 + Bell-McCaffrey df) or gcm")
        return v


class HonestyConfig(Section):
    """Selection-aware inference by sample splitting (docs/effects.md, "Selection-aware inference";
    ``tokens2policy.honesty``): identify selects on the ``selection`` units, effects and policy estimate on the
    ``estimation`` units. ``mode: none`` reproduces the paper's single-sample analysis (labelled not
    selection-aware in the tables and the report)."""

    mode: Literal["split", "none"] = "split"
    selection_share: float = Field(0.5, gt=0, lt=1)  # expected share of units in the selection role
    seed: int = 23  # the role hash's seed (changing it reassigns every unit)


class EffectsConfig(Section):
    se: Literal["hc1", "cluster"] = "hc1"
    propensity: Optional[float] = None  # None: the randomization share from the data
    nuisance: Literal["ridge", "lgbm", "hgb", "forest"] = "ridge"  # lgbm = hgb: sklearn histogram boosting
    n_bootstrap: int = 200
    alpha: float = Field(0.05, gt=0, lt=1)
    propensity_model: bool = False  # True: logistic-regression propensity (non-randomized data) instead of the share
    propensity_clip: float = Field(0.01, ge=0, lt=0.5)
    nuisance_neurons: int = Field(64, ge=0)  # most frequently active neurons added to the nuisance features
    full_final: Literal["ridge", "hgb", "forest"] = "ridge"  # final stage of the full-feature comparison learners
    modifier_encoding: Literal["value", "indicator"] = "indicator"  # sparse neurons: active indicator or activation
    n_quantile_groups: int = Field(5, ge=2)
    max_levels: int = Field(10, ge=2)  # numeric covariates with at most this many values split per level
    # heterogeneity coverage (effects/coverage.py): warn when the selected modifiers explain less than this share of
    # the held-out detectable heterogeneity (and the beyond-selection test rejects); residual features listed
    coverage_warn_below: float = Field(0.8, gt=0, le=1)
    coverage_residual_top: int = Field(5, ge=0)


class PolicyConfig(Section):
    cost: float = 0.0
    budget: float = Field(0.3, ge=0, le=1)
    tree_depth: int = Field(2, ge=0, le=3)
    register_model: bool = True
    learner: str = "dr_selected"  # which effects learner's CATE the threshold/budget rules use
    min_leaf_size: int = Field(20, ge=1)
    min_leaf_share: float = Field(0.05, ge=0, lt=0.5)  # tree leaves keep >= this share of the training units too
    max_candidates: int = Field(32, ge=1)  # split candidates per tree feature (quantiles when more values)
    recommended: Literal["tree", "threshold", "budget"] = "tree"
    alpha: float = Field(0.05, gt=0, lt=1)


class ScoreConfig(Section):
    """``t2p score``: the registered policy applied to new units (docs/score.md). The input's columns are read with
    the ``source`` section's mapping (``experiment_id_col``, ``unit_id_col``, ``text_cols``, ``covariate_cols``);
    a treatment, outcomes, a cluster or timestamps are not needed."""

    input: Optional[str] = None  # a path/URI/glob of files, a catalog table or view, or (kind query) a Spark SQL SELECT
    kind: Optional[Literal["delta", "parquet", "csv", "json", "table", "query"]] = None  # None: from ``input``
    experiment_id: Optional[str] = None  # constant experiment id when the input has no experiment id column
    outcome: Optional[str] = None  # None: every source.outcome_cols (one registered policy each)
    # None: for each (experiment, outcome) the version the last successful policy stage run registered
    model_uri: Optional[str] = None


class ReportConfig(Section):
    out_dir: Optional[str] = None  # defaults to <data_dir>/reports
    n_examples: int = 3
    experiment_id: Optional[str] = None  # None: a section per experiment in the lakehouse
    example_chars: int = 400  # top examples are cut to this many characters
    max_trace_rows: int = 200  # NEXIS trace rows shown (the full trace stays in the table)
    max_forest_rows: int = 40  # GATE rows in the forest plot
    alpha: float = 0.05  # level of the marginal-screening comparison (raw / Bonferroni / BH)
    log_to_mlflow: bool = True
    screenshot: bool = True  # screenshot.png of the page's top by headless Chromium, when it is installed


class ValidateConfig(Section):
    """The validation study (docs/validation.md): simulation repetitions run as Spark tasks."""

    size: Literal["ci", "full"] = "ci"
    repetitions: Optional[int] = Field(None, ge=1)  # None: the size's default (every override below likewise)
    null_repetitions: Optional[int] = Field(None, ge=0)
    alpha: float = Field(0.05, gt=0, lt=1)
    cells: Optional[List[str]] = None  # "design:outcome", design in linear|quadratic, outcome in gaussian|binary
    n_values: Optional[List[int]] = None  # sample sizes of the sweep
    effects: Optional[List[float]] = None  # heterogeneity scales of the sweep
    m: Optional[int] = Field(None, ge=0)  # leaky proxies per representation
    null_outcomes: Optional[List[Literal["gaussian", "binary"]]] = None  # null (no heterogeneity) designs; [] none
    null_n: Optional[int] = Field(None, ge=20)
    coverage_n: Optional[int] = None  # CI coverage is computed at this n of the sweep (and on the null design)
    coverage: bool = True
    methods: Optional[List[str]] = None  # subset of tokens2policy.validate.study.METHOD_NAMES; None: all
    policy_cost: float = 0.2  # per-unit treatment cost of the learned policy whose value CI is checked
    n_truth: Optional[int] = Field(None, ge=1000)  # fresh draws for Monte-Carlo true values
    tasks_per_partition: int = Field(1, ge=1)  # Spark: 1 = one task per (design point, repetition)
    figures: bool = True
    out_dir: Optional[str] = None  # figures + summary CSVs; None: <data_dir>/validation (docs use docs/figures)
    text: Optional[bool] = None  # design 2 (BBC corpus -> embed -> SAE); None: the size's default (full: on)
    text_n_values: Optional[List[int]] = None
    text_effects: Optional[List[float]] = None
    text_min_active: int = Field(20, ge=0)  # as identify.min_active: neurons active in fewer units are skipped
    text_epochs: Optional[int] = Field(None, ge=1)  # SAE epochs for the study's representation; None: represent.epochs
    text_articles: Optional[int] = Field(None, ge=50)  # seeded subset of the 2,225 articles; None: all
    # calibration designs (null FWER of every test option, docs/validation.md): dense | sparse | rare | covariates |
    # clusters | nonlinear; None: the size's default (all of them), [] none
    calibration: Optional[List[Literal["dense", "sparse", "rare", "covariates", "clusters", "nonlinear"]]] = None
    calibration_repetitions: Optional[int] = Field(None, ge=1)
    # first repetition index of the calibration draws: a long study runs in chunks (first 0, 125, 250, ...) whose rows
    # are summarised together; a draw's rows depend only on (seed, design, repetition index), not on the chunk
    calibration_first_repetition: int = Field(0, ge=0)
    calibration_methods: Optional[List[str]] = None  # None: study.CALIBRATION_METHODS
    # the pipeline's own path (validate/pipeline_path.py): repetitions per design; None: 5 (ci) / 500 (full); 0: off
    pipeline_path_repetitions: Optional[int] = Field(None, ge=0)
    # design 3, distributed drivers (validate/drivers.py, docs/validation.md): corpora x representation variants
    drivers: bool = False
    drivers_corpora: List[Literal["bbc", "drugs"]] = Field(default_factory=lambda: ["bbc", "drugs"])
    drivers_variants: List[str] = Field(default_factory=lambda: ["doc:128:8"])  # <doc|tok>:<latents>:<k>[:m<p>-<p>]
    drivers_n_values: List[int] = Field(default_factory=lambda: [2000, 5000, 10000, 20000])
    drivers_effects: List[float] = Field(default_factory=lambda: [1.0])  # 0.0 adds the null (FWER) point
    drivers_repetitions: Optional[int] = Field(None, ge=1)  # None: validate.repetitions (or the size's)
    drivers_methods: List[str] = Field(default_factory=lambda: ["nexis_gcm", "nexis_gcm_norho", "nexis_gcm_rho0.25"])
    drivers_coverage: bool = True  # heterogeneity coverage of the first method's selection per repetition

    @field_validator("cells")
    @classmethod
    def _cells(cls, v: Optional[List[str]]) -> Optional[List[str]]:
        for c in v or []:
            kind, _, outcome = str(c).partition(":")
            if kind not in ("linear", "quadratic") or outcome not in ("gaussian", "binary"):
                raise ValueError(f"cell {c!r} must be 'linear|quadratic:gaussian|binary'")
        return v


class ExecutionConfig(Section):
    """How the stages that have both an in-memory core and a distributed one run (``tokens2policy.execution``):
    ``auto`` collects the inputs to the driver once and runs the in-memory core when they fit the bounds below,
    else the Spark path; ``memory`` / ``spark`` force one. Both paths give the same tables (tests/execution), so
    this section decides *how* a stage runs, not *what* it computes: it is a stage's ``runtime`` setting, outside
    its config hash (a change alone does not rerun a stage; tokens2policy/stages.py)."""

    mode: Literal["auto", "memory", "spark"] = "auto"
    # per stage, overriding ``mode`` (identify, effects, represent): e.g. {identify: spark}
    stages: Dict[Literal["identify", "effects", "represent"], Literal["auto", "memory", "spark"]] = Field(
        default_factory=dict)
    # auto: in memory while (rows x columns + stored non-zeros) <= max_entries and the estimated driver frame
    # <= max_bytes (20,000 units with 8 active neurons each: 0.5M entries, ~10 MB)
    max_entries: int = Field(50_000_000, ge=0)
    max_bytes: int = Field(1 << 30, ge=0)  # 1 GiB

    def mode_for(self, stage: str) -> str:
        return self.stages.get(stage, self.mode)


class RunnerConfig(Section):
    """The stage runner's run lock (docs/tables.md, ``run_lock``): one writing pipeline per lakehouse at a time."""

    lock_wait_seconds: float = Field(0.0, ge=0)  # a second pipeline waits this long for the lock (0: exits at once)
    # a holder that stops renewing loses the lock after this long; renewed every third of it. Each renewal is a
    # Delta UPDATE plus a read of the lock table (Spark jobs beside the stage's, 3-10 s on the 2-core dev VM:
    # docs/benchmarks.md), so 300 s renews every 100 s; a crashed holder on this host is taken over at once (its
    # pid is gone), one on another host after at most this long (or at once with runner.break_lock=true)
    lease_seconds: float = Field(300.0, ge=3)
    # take the lock over from a live-looking holder (one on another host whose lease has not expired yet) when the
    # operator knows it is gone: --set runner.break_lock=true
    break_lock: bool = False


class Config(Section):
    data_dir: str = "data"
    seed: int = 0
    spark: SparkConfig = Field(default_factory=SparkConfig)
    lakehouse: LakehouseConfig = Field(default_factory=LakehouseConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    source: SourceConfig = Field(default_factory=SourceConfig)
    demo: DemoConfig = Field(default_factory=DemoConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    represent: RepresentConfig = Field(default_factory=RepresentConfig)
    identify: IdentifyConfig = Field(default_factory=IdentifyConfig)
    honesty: HonestyConfig = Field(default_factory=HonestyConfig)
    effects: EffectsConfig = Field(default_factory=EffectsConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    validate_: ValidateConfig = Field(default_factory=ValidateConfig, alias="validate")
    runner: RunnerConfig = Field(default_factory=RunnerConfig)
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    @property
    def data_uri(self) -> str:
        """``data_dir`` as Spark and Hadoop see it: a URI unchanged, a local path made absolute (relative paths
        resolve against the working directory)."""
        from tokens2policy.lakehouse.storage import resolve

        return resolve(self.data_dir)

    @property
    def data_is_local(self) -> bool:
        from tokens2policy.lakehouse.storage import is_local

        return is_local(self.data_dir)

    @property
    def data_path(self) -> Path:
        """``data_dir`` as a local absolute path; a ConfigError when ``data_dir`` is a remote URI (use
        :attr:`data_uri` and ``lakehouse.storage`` there)."""
        from tokens2policy.lakehouse.storage import local_path

        if not self.data_is_local:
            raise ConfigError(f"data_dir={self.data_dir} is not on the local file system; this needs a local "
                              "directory (set the setting that names it, e.g. tracking.tracking_uri)")
        return Path(local_path(self.data_uri))

    def to_dict(self) -> Dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2's booleans: only true/false (any case), never yes/no/on/off/y/n."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))


def yaml_load(text: str) -> Any:
    """Parse a profile or a ``--set`` value (YAML 1.2 booleans)."""
    return yaml.load(text, Loader=_Yaml12Loader)


def _parse_value(text: str) -> Any:
    """``--set`` values are YAML scalars/lists: ``3`` → int, ``true`` → bool, ``[a, b]`` → list, ``null`` → None."""
    try:
        return yaml_load(text)
    except yaml.YAMLError:
        return text


def _apply_override(data: Dict[str, Any], assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    key, _, raw = assignment.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key '{key}': '{part}' is not a section")
        node = child
    node[parts[-1]] = _parse_value(raw)


def _first_error(err: ValidationError) -> str:
    e = err.errors()[0]
    key = ".".join(str(p) for p in e["loc"])
    if e["type"] == "extra_forbidden":
        return f"unknown config key '{key}'"
    if e["type"] == "missing":
        return f"missing required config value '{key}'"
    return f"config key '{key}': {e['msg']} (got {e.get('input')!r})"


def find_profile(path: os.PathLike | str):
    """A profile file: the path as given when it exists, else a bundled profile named like it (``local``,
    ``local.yaml`` or ``conf/local.yaml``), so the names in the docs work from any directory and install."""
    given = Path(os.path.expanduser(str(path)))
    if given.exists():
        return given
    text = str(path).replace("\\", "/")
    stem = text[len("conf/"):] if text.startswith("conf/") else text
    stem = stem[:-5] if stem.endswith(".yaml") else stem
    if stem in PROFILE_NAMES and profile_path(stem).is_file():
        return profile_path(stem)
    return given


def load_config(path: Optional[os.PathLike | str] = None, overrides: Optional[List[str]] = None) -> Config:
    """Load a YAML profile (default: the bundled ``local`` profile) and apply ``a.b=c`` overrides.

    Raises :class:`ConfigError` with one line naming the offending key for every user error.
    """
    data: Dict[str, Any] = {}
    profile = find_profile(path) if path is not None else DEFAULT_PROFILE
    if not profile.is_file():  # never silently the built-in defaults
        if path is None:
            raise ConfigError(f"the default profile {profile} is missing from this installation: pass --config")
        raise ConfigError(f"config file not found: {path} (bundled profiles: {', '.join(PROFILE_NAMES)})")
    try:
        loaded = yaml_load(profile.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"config file {profile} is not valid YAML{where}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {profile} must hold a mapping at the top level")
    data = loaded
    for assignment in overrides or []:
        _apply_override(data, assignment)
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_first_error(err)) from None


def apply_overrides(config: Config, overrides: Optional[List[str]] = None) -> Config:
    """A copy of ``config`` with ``a.b=c`` overrides applied (the rules and one-line errors of :func:`load_config`);
    the Python API's way to change a loaded config."""
    data = config.to_dict()
    for assignment in overrides or []:
        _apply_override(data, assignment)
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_first_error(err)) from None
