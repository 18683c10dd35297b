"""Typed run configuration.

One YAML profile (``conf/local.yaml``, ``conf/cluster.yaml``, ``conf/databricks.yaml``) plus ``--set a.b=c``
overrides resolves to one :class:`Config`. Every section is a pydantic model with ``extra="forbid"`` so a typo is
a one-line error naming the key, not a silently ignored setting. ``data_dir`` roots everything a local run writes
(lakehouse, MLflow store, reports), so ``--set data_dir=/new/dir`` gives a fresh, isolated run.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PROFILE = REPO_ROOT / "conf" / "local.yaml"


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


class LakehouseConfig(Section):
    # "path": Delta tables at <data_dir>/lakehouse/<schema>/<table>; "catalog": catalog.schema.table (Unity Catalog).
    mode: Literal["path", "catalog"] = "path"
    catalog: Optional[str] = None
    schema_: str = Field("tokens2policy", alias="schema")
    root: Optional[str] = None  # defaults to <data_dir>/lakehouse
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


class TrackingConfig(Section):
    tracking_uri: Optional[str] = None  # defaults to sqlite:///<data_dir>/mlflow/mlflow.db
    registry_uri: Optional[str] = None
    artifact_root: Optional[str] = None  # defaults to <data_dir>/mlflow/artifacts
    experiment_name: str = "tokens2policy"


DEMO_TOPICS = ("business", "entertainment", "politics", "sport", "tech")  # the BBC News corpus' five topics


class SourceConfig(Section):
    """Where the experiment logs come from and how their columns map to the ``units`` contract (docs/ingest.md).

    The defaults map the bundled demo experiment's logs. ``treatment_labels`` are ``[control, treated]``: numbers
    compare numerically (``1`` matches ``1``, ``1.0`` and ``"1"``), strings compare after trimming. A timestamp pair
    (``assigned_at_col``, ``measured_at_col``) enables the post-treatment-covariate check; ``kind: demo`` uses the
    demo's own ``assigned_at``/``measured_at`` when they are not set.
    """

    kind: Literal["demo", "delta", "parquet", "csv", "json"] = "demo"
    path: Optional[str] = None
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

    @field_validator("treatment_labels")
    @classmethod
    def _two_labels(cls, v: List[Any]) -> List[Any]:
        if len(v) != 2 or str(v[0]) == str(v[1]):
            raise ValueError("needs exactly two distinct labels [control, treated]")
        return v

    @field_validator("outcome_cols", "text_cols")
    @classmethod
    def _not_empty(cls, v: List[str]) -> List[str]:
        if not v:
            raise ValueError("needs at least one column")
        return v


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


class RepresentConfig(Section):
    kind: Literal["sae", "raw", "pca"] = "sae"
    train_on: Literal["tokens", "documents", "both"] = "documents"
    expansion: int = 8
    n_latents: Optional[int] = None
    k: int = 32
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


class IdentifyConfig(Section):
    alpha: float = 0.05
    # gcm: the test calibrated on every design of the validation study, SAE codes included (hc1 over-rejects on
    # sparse codes: FWER 0.116 at alpha 0.05, docs/validation.md); hc1/linear/cluster stay available
    test: Literal["linear", "hc1", "cluster", "gcm"] = "gcm"
    adjust: Optional[Literal["FWER", "FDR"]] = "FWER"
    rho: Optional[float] = 0.5
    backward: bool = True
    nuisance: Literal["poly2", "lgbm"] = "poly2"
    max_rounds: int = 20
    min_active: int = 20  # neurons active in fewer units are skipped (recorded in the trace)
    use_covariates: bool = True


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


class ReportConfig(Section):
    out_dir: Optional[str] = None  # defaults to <data_dir>/reports
    n_examples: int = 3
    experiment_id: Optional[str] = None  # None: a section per experiment in the lakehouse
    example_chars: int = 400  # top examples are cut to this many characters
    max_trace_rows: int = 200  # NEXIS trace rows shown (the full trace stays in the table)
    max_forest_rows: int = 40  # GATE rows in the forest plot
    alpha: float = 0.05  # level of the marginal-screening comparison (raw / Bonferroni / BH)
    log_to_mlflow: bool = True


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

    @field_validator("cells")
    @classmethod
    def _cells(cls, v: Optional[List[str]]) -> Optional[List[str]]:
        for c in v or []:
            kind, _, outcome = str(c).partition(":")
            if kind not in ("linear", "quadratic") or outcome not in ("gaussian", "binary"):
                raise ValueError(f"cell {c!r} must be 'linear|quadratic:gaussian|binary'")
        return v


class RunnerConfig(Section):
    """The stage runner's run lock (docs/tables.md, ``run_lock``): one writing pipeline per lakehouse at a time."""

    lock_wait_seconds: float = Field(0.0, ge=0)  # a second pipeline waits this long for the lock (0: exits at once)
    lease_seconds: float = Field(120.0, ge=3)  # a holder that stops renewing loses the lock after this long
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
    effects: EffectsConfig = Field(default_factory=EffectsConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    validate_: ValidateConfig = Field(default_factory=ValidateConfig, alias="validate")
    runner: RunnerConfig = Field(default_factory=RunnerConfig)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    @property
    def data_path(self) -> Path:
        """``data_dir`` as an absolute path (relative paths resolve against the working directory)."""
        return Path(os.path.expanduser(self.data_dir)).resolve()

    def to_dict(self) -> Dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


def _parse_value(text: str) -> Any:
    """``--set`` values are YAML scalars/lists: ``3`` → int, ``true`` → bool, ``[a, b]`` → list, ``null`` → None."""
    try:
        return yaml.safe_load(text)
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


def load_config(path: Optional[os.PathLike | str] = None, overrides: Optional[List[str]] = None) -> Config:
    """Load a YAML profile (default ``conf/local.yaml``) and apply ``a.b=c`` overrides.

    Raises :class:`ConfigError` with one line naming the offending key for every user error.
    """
    data: Dict[str, Any] = {}
    profile = Path(path) if path is not None else DEFAULT_PROFILE
    if path is not None or profile.exists():
        if not profile.exists():
            raise ConfigError(f"config file not found: {profile}")
        try:
            loaded = yaml.safe_load(profile.read_text()) or {}
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
