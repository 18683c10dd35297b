"""The targeting policy as one MLflow pyfunc: raw pre-treatment inputs in, recommended treatment, CATE and rule out.

The chain it serves is the pipeline's own, with every fitted piece frozen into the model's artifacts:

    text ──(frozen text model, the embed stage's :class:`~tokens2policy.embed.models.TextEmbeddingModel`)──▶ vector
         ──(the represent stage's :class:`~tokens2policy.represent.sae.SparseAutoencoder`)──▶ sparse neurons
    neurons + covariates ──(the effects stage's modifier design)──▶ Z ──(linear final stage [1, Z]·β)──▶ CATE
    Z / CATE ──(policy rule: exact tree, CATE > cost, or the budget's CATE cutoff)──▶ recommended treatment, rule

Artifacts: ``embedding_model`` (the model directory, so nothing downloads at load time; its SHA-256 is checked
against the hash the embeddings were computed with), ``sae`` (``SparseAutoencoder.save``) and ``policy``
(``policy.json``: the :class:`PolicySpec` — embedding settings, modifier encodings fixed on the training units,
final-stage coefficients and covariance, and the rule). Everything is loaded once per Python worker in
``load_context`` (the text model additionally through the embed stage's per-process cache), so
``mlflow.pyfunc.spark_udf`` scores a Delta table of new units at scale.

Two deliberate freezes make scoring a new batch equal to the training-time encoding of the same units: categorical
levels (and their reference level) and the fill value of missing numeric covariates are those of the training
units, not of the batch at hand (the effects stage derives them from the data it sees). The budget rule is served
as the pair the policy job learned (``policy.rules``): its CATE cutoff and the tie share that fills the budget —
treat when τ̂ > cutoff, and a unit tied at the cutoff when its tie draw (a seeded hash of its ``unit_id``, an input
column of budget models) is below the tie share — so the served model treats exactly the units the job's
``assignments`` treat, and the budget holds when CATEs tie (they do: an indicator-encoded linear CATE takes at most
2^k values).

The CATE CI is that of the linear final stage (the best linear projection of τ on Z; Semenova & Chernozhukov
2021): τ̂(z) ± c·√([1, z] V [1, z]'), with V the HC1/CR1S covariance and c the critical value stored at fit time.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd

from ..effects.design import Modifier, neuron_matrix
from ..effects.gates import split_groups
from .rules import budget_assign, budget_fired
from .tree import Leaf, PolicyTree, Split

REGISTERED_MODEL = "tokens2policy-policy"  # log_policy_model's default; the stage names one per experiment/outcome
OUTPUT_COLUMNS = ["recommended", "cate", "ci_low", "ci_high", "rule", "leaf_id", "embed_status"]
OUTPUT_DDL = ("recommended int, cate double, ci_low double, ci_high double, rule string, leaf_id int, "
              "embed_status string")
SPEC_VERSION = 2  # 2: budget rules carry the tie share and the tie seed


# --------------------------------------------------------------------------------------------------------------
# the frozen description of the chain (JSON)
# --------------------------------------------------------------------------------------------------------------
@dataclass
class ModifierEncoding:
    """How one selected modifier is read from raw inputs: a neuron's activation, or a covariate column with the
    training fill value (numeric) or the training levels, reference (most frequent) first (categorical)."""

    feature: str
    source: str  # "neuron" | "covariate"
    kind: str  # "sparse" | "continuous" | "categorical"
    neuron: Optional[int] = None
    column: Optional[str] = None
    fill: Optional[float] = None
    levels: Optional[List[str]] = None
    dtype: Optional[str] = None  # covariates: the input column's MLflow type (long, double, boolean, string)


def _mlflow_type(values) -> str:
    kind = np.asarray(values).dtype.kind
    return {"i": "long", "u": "long", "f": "double", "b": "boolean"}.get(kind, "string")


def freeze_modifiers(modifiers: Sequence[Modifier], values: Mapping[str, np.ndarray], kinds: Mapping[str, str],
                     frame: Optional[pd.DataFrame] = None) -> List[ModifierEncoding]:
    """Encodings of the selected modifiers fixed on the training units (the outputs of the effects stage's
    ``modifier_frame``). The numeric fill is the training mean: computed from the raw ``frame`` column exactly as
    ``modifier_frame`` does when the frame is given, else from the filled values (the same mean up to rounding)."""
    out = []
    for m in modifiers:
        kind = kinds[m.feature]
        enc = ModifierEncoding(m.feature, m.source, kind, neuron=m.neuron, column=m.column)
        if m.source == "covariate":
            raw_col = frame[m.column] if frame is not None and m.column in frame else values[m.feature]
            enc.dtype = _mlflow_type(pd.Series(raw_col).dropna().to_numpy() if kind == "categorical" else [0.0])
        if kind == "categorical":
            _, names = split_groups(values[m.feature], "categorical")
            enc.levels = [nm[len("level="):] for nm in names]
        elif m.source == "covariate":
            raw = frame[m.column] if frame is not None and m.column in frame else values[m.feature]
            v = pd.to_numeric(pd.Series(raw), errors="coerce").astype(float)
            enc.fill = float(v.mean()) if v.notna().any() else 0.0
        out.append(enc)
    return out


def _tree_to_dict(node) -> dict:
    if isinstance(node, Leaf):
        return {"action": int(node.action), "n": int(node.n), "reward": float(node.reward)}
    return {"feature": int(node.feature), "threshold": float(node.threshold),
            "left": _tree_to_dict(node.left), "right": _tree_to_dict(node.right)}


def _tree_from_dict(d: dict):
    if "action" in d:
        return Leaf(int(d["action"]), int(d["n"]), float(d["reward"]))
    return Split(int(d["feature"]), float(d["threshold"]), _tree_from_dict(d["left"]), _tree_from_dict(d["right"]))


def threshold_rule(cost: float = 0.0) -> dict:
    """Treat when τ̂ > ``cost`` (``policy.cost``)."""
    return {"kind": "threshold", "cost": float(cost)}


def budget_rule(cutoff: float, tie_share: float, budget: float, seed: int = 0) -> dict:
    """Treat when τ̂ > ``cutoff``, and units tied at it when their tie draw (``policy.rules.tie_draws`` of the
    unit_id with ``seed``) is below ``tie_share`` — the (cutoff, tie share) ``policy.rules.budget_cutoff`` learned
    on the training units for the top-``budget`` rule."""
    return {"kind": "budget", "cutoff": float(cutoff), "tie_share": float(tie_share), "budget": float(budget),
            "seed": int(seed)}


def tree_rule(tree: PolicyTree) -> dict:
    """A fitted :class:`PolicyTree` over the tree design (``policy.job.tree_design``)."""
    if not hasattr(tree, "tree_"):
        raise ValueError("the PolicyTree is not fitted")
    return {"kind": "tree", "nodes": _tree_to_dict(tree.tree_), "feature_names": list(tree.feature_names_),
            "feature_kinds": list(tree.feature_kinds_), "action_names": list(tree.action_names),
            "depth": int(tree.depth)}


@dataclass
class PolicySpec:
    """Everything of the chain but the model files; saved as ``policy.json``.

    embed: the :class:`~tokens2policy.embed.models.ModelSpec` fields that change a vector or its computation
    (``source`` is replaced by the artifact directory at load time). cate_encoding: how sparse neurons enter the
    linear final stage (``effects.modifier_encoding``: ``indicator`` of active, or the activation ``value``); the
    tree always sees raw values (``policy.job.tree_design``). coef/cov/critical_value: ``[intercept, Z...]``
    coefficients, their robust covariance (None: no CI) and the CI's critical value.
    """

    text_col: str
    embed: Dict[str, Any]
    modifiers: List[ModifierEncoding]
    cate_encoding: str
    coef: List[float]
    rule: Dict[str, Any]
    cov: Optional[List[List[float]]] = None
    critical_value: Optional[float] = None
    metadata: Dict[str, Any] = field(default_factory=dict)
    version: int = SPEC_VERSION

    def __post_init__(self):
        self.modifiers = [m if isinstance(m, ModifierEncoding) else ModifierEncoding(**m) for m in self.modifiers]
        if self.cate_encoding not in ("indicator", "value"):
            raise ValueError(f"cate_encoding must be 'indicator' or 'value', got {self.cate_encoding!r}")
        if self.rule.get("kind") not in ("tree", "threshold", "budget"):
            raise ValueError(f"rule kind must be 'tree', 'threshold' or 'budget', got {self.rule.get('kind')!r}")
        if self.rule["kind"] == "budget" and not {"cutoff", "tie_share", "budget", "seed"} <= set(self.rule):
            raise ValueError("a budget rule needs cutoff, tie_share, budget and seed (policy.pyfunc.budget_rule)")
        n_cols = len(self.linear_design(self._empty())[1])
        if len(self.coef) != 1 + n_cols:
            raise ValueError(f"coef has {len(self.coef)} entries; the modifiers give 1 + {n_cols} design columns")
        if self.cov is not None and np.shape(self.cov) != (len(self.coef), len(self.coef)):
            raise ValueError(f"cov must be {len(self.coef)} x {len(self.coef)}, got shape {np.shape(self.cov)}")

    @classmethod
    def from_fitted(cls, embed_spec, modifiers: Sequence[Modifier], values: Mapping[str, np.ndarray],
                    kinds: Mapping[str, str], rule: Union[PolicyTree, dict], cate_model=None, coef=None,
                    cate_encoding: str = "indicator", text_col: str = "text", metadata: Optional[dict] = None,
                    frame: Optional[pd.DataFrame] = None) -> "PolicySpec":
        """Freeze a fitted chain.

        ``embed_spec``: the embed stage's ``ModelSpec``; ``modifiers, values, kinds``: the effects stage's
        ``modifier_frame`` on the training units; ``rule``: a fitted ``PolicyTree`` or :func:`threshold_rule` /
        :func:`budget_rule`; ``cate_model``: a fitted learner with a linear final stage (``DRLearner(final=
        "linear")``, fitted on ``encode_modifiers(values, kinds, cate_encoding)``) — or plain ``coef`` instead.
        """
        if (cate_model is None) == (coef is None):
            raise ValueError("give exactly one of cate_model (a fitted linear-final learner) or coef")
        cov = crit = None
        if cate_model is not None:
            coef = cate_model.coef_  # raises ValueError for a non-linear final stage
            cov = np.asarray(cate_model.model_.cov).tolist()
            crit = float(cate_model.model_.critical_value(cate_model.alpha))
        embed = {k: getattr(embed_spec, k) for k in ("name", "weights_hash", "loader", "max_tokens", "long_text",
                                                    "max_chunks", "max_text_chars", "batch_tokens", "max_batch_size")}
        if not isinstance(embed["loader"], str):
            raise ValueError("only a named embedding loader ('text' or 'package.module:function') can be served")
        return cls(text_col=text_col, embed=embed, modifiers=freeze_modifiers(modifiers, values, kinds, frame),
                   cate_encoding=cate_encoding, coef=[float(c) for c in np.ravel(coef)],
                   rule=rule if isinstance(rule, dict) else tree_rule(rule), cov=cov, critical_value=crit,
                   metadata=dict(metadata or {}))

    # -- persistence ------------------------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "PolicySpec":
        d = json.loads(text)
        if d.get("version") != SPEC_VERSION:
            raise ValueError(f"policy.json version {d.get('version')} is not {SPEC_VERSION}")
        return cls(**d)

    def save(self, path: str) -> str:
        with open(path, "w") as fh:
            fh.write(self.to_json())
        return path

    @classmethod
    def load(cls, path: str) -> "PolicySpec":
        with open(path) as fh:
            return cls.from_json(fh.read())

    # -- designs ----------------------------------------------------------------------------------------------
    @property
    def covariates(self) -> List[str]:
        return [m.column for m in self.modifiers if m.source == "covariate"]

    @property
    def neurons(self) -> List[int]:
        return [int(m.neuron) for m in self.modifiers if m.source == "neuron"]

    def _empty(self) -> Dict[str, np.ndarray]:
        return {m.feature: np.zeros(0) for m in self.modifiers}

    def modifier_values(self, indices: Sequence, values: Sequence, frame: pd.DataFrame) -> Dict[str, np.ndarray]:
        """Raw modifier values: neuron activations from sparse rows, covariates with the frozen fill."""
        dense = neuron_matrix(indices, values, self.neurons) if self.neurons else None
        out, j = {}, 0
        for m in self.modifiers:
            if m.source == "neuron":
                out[m.feature] = dense[:, j]
                j += 1
            elif m.kind == "categorical":
                out[m.feature] = frame[m.column].to_numpy()
            else:
                v = pd.to_numeric(frame[m.column], errors="coerce").astype(float)
                out[m.feature] = v.fillna(m.fill).to_numpy()
        return out

    def _design(self, vals: Mapping[str, np.ndarray], encoding: str):
        """``effects.gates.encode_modifiers`` with the frozen categorical levels (reference level dropped)."""
        cols, names = [], []
        n = len(next(iter(vals.values()))) if vals else 0
        for m in self.modifiers:
            if m.kind == "categorical":
                s = pd.Series(np.asarray(vals[m.feature], dtype=object)).astype(str).to_numpy()
                for lv in m.levels[1:]:
                    cols.append((s == lv).astype(float))
                    names.append(f"{m.feature}[level={lv}]")
            else:
                x = np.asarray(vals[m.feature], dtype=float)
                cols.append((x > 0).astype(float) if (encoding == "indicator" and m.kind == "sparse") else x)
                names.append(m.feature)
        return (np.column_stack(cols) if cols else np.zeros((n, 0))), names

    def linear_design(self, vals):
        return self._design(vals, self.cate_encoding)

    def tree_design(self, vals):
        return self._design(vals, "value")

    def policy_tree(self) -> PolicyTree:
        r = self.rule
        tree = PolicyTree(depth=r["depth"], action_names=r["action_names"])
        tree.tree_ = _tree_from_dict(r["nodes"])
        tree.feature_names_, tree.feature_kinds_ = list(r["feature_names"]), list(r["feature_kinds"])
        tree.n_features_in_ = len(tree.feature_names_)
        return tree

    def embed_spec(self, source: str, device: str = "cpu", cpu_threads: Optional[int] = None):
        from ..embed.models import ModelSpec

        return ModelSpec(source=str(source), device=device, cpu_threads=cpu_threads, **self.embed)


# --------------------------------------------------------------------------------------------------------------
# scoring (no MLflow): used by the pyfunc and usable in memory
# --------------------------------------------------------------------------------------------------------------
class PolicyScorer:
    """Score raw units with a :class:`PolicySpec`, a loaded embedding model and a fitted SAE.

    ``score(frame)`` needs the spec's text column and covariate columns; returns :data:`OUTPUT_COLUMNS` (rows
    aligned with ``frame``). Units without a vector (empty or too-long text) have no active neuron — as in the
    effects stage, which left-joins the ``neurons`` table and treats a missing row as all-inactive.
    """

    def __init__(self, spec: PolicySpec, embedder, sae):
        self.spec = spec
        self.embedder = embedder
        self.sae = sae
        self.tree = spec.policy_tree() if spec.rule["kind"] == "tree" else None
        if self.tree is not None:
            self.leaf_rules = [leaf["rule"] for leaf in self.tree.leaves()]
            self.leaf_actions = np.array([leaf["action"] for leaf in self.tree.leaves()], dtype=int)

    def neurons(self, texts: Sequence) -> tuple:
        """(indices, values, status) per text: the embed stage's vector, then the SAE's sparse code."""
        from ..embed.models import VECTOR_STATUSES
        from ..represent.sae import csr_to_rows

        enc = self.embedder.encode(list(texts))
        n = len(texts)
        indices: List[np.ndarray] = [np.zeros(0, np.int32)] * n
        values: List[np.ndarray] = [np.zeros(0, np.float32)] * n
        rows = [i for i, (v, s) in enumerate(zip(enc.vectors, enc.status)) if v is not None and s in VECTOR_STATUSES]
        if rows:
            idx, val = csr_to_rows(self.sae.encode(np.stack([enc.vectors[i] for i in rows])))
            for i, ix, vl in zip(rows, idx, val):
                indices[i], values[i] = ix, vl
        return indices, values, list(enc.status)

    def score(self, frame: pd.DataFrame) -> pd.DataFrame:
        spec = self.spec
        need = [spec.text_col] + spec.covariates
        missing = [c for c in need if c not in frame.columns]
        if missing:
            raise ValueError(f"model input lacks column(s) {missing}; it needs {need}")
        n = len(frame)
        if self.spec.neurons:
            indices, values, status = self.neurons(frame[spec.text_col].tolist())
        else:  # no neuron was selected: the text does not enter the policy
            indices, values, status = [[]] * n, [[]] * n, ["not_needed"] * n
        vals = spec.modifier_values(indices, values, frame.reset_index(drop=True))
        Z, _ = spec.linear_design(vals)
        Z = Z if Z.shape[0] == n else np.zeros((n, 0))  # no modifier selected: an intercept-only CATE
        L = np.column_stack([np.ones(n), Z])
        cate = L @ np.asarray(spec.coef)
        if spec.cov is not None:
            se = np.sqrt(np.clip(np.einsum("ij,jk,ik->i", L, np.asarray(spec.cov), L), 0.0, None))
            lo, hi = cate - spec.critical_value * se, cate + spec.critical_value * se
        else:
            lo = hi = np.full(n, np.nan)
        rule = spec.rule
        leaf = np.full(n, -1, dtype=int)
        if rule["kind"] == "tree":
            X, _ = spec.tree_design(vals)
            X = X if X.shape[0] == n else np.zeros((n, 0))
            leaf = self.tree.apply(X) if n else leaf
            treat = self.leaf_actions[leaf]
            fired = np.array(self.leaf_rules, dtype=object)[leaf] if n else np.zeros(0, dtype=object)
        elif rule["kind"] == "threshold":
            c = rule["cost"]
            treat = (cate > c).astype(int)
            fired = np.where(treat == 1, f"cate > {c:.4g}", f"cate <= {c:.4g}")
        else:
            c, p, q = rule["cutoff"], rule["tie_share"], rule["budget"]
            if "unit_id" not in frame.columns:
                raise ValueError("the budget rule decides ties at its CATE cutoff by a seeded hash of the unit id: "
                                 "the model input needs a unit_id column")
            treat = budget_assign(cate, c, p, frame["unit_id"].astype(str).to_numpy(), rule["seed"])
            fired = budget_fired(cate, treat, c, p, q)
        return pd.DataFrame({"recommended": np.asarray(treat, dtype=np.int32), "cate": cate, "ci_low": lo,
                             "ci_high": hi, "rule": np.asarray(fired, dtype=object), "leaf_id": leaf.astype(np.int32),
                             "embed_status": status})


# --------------------------------------------------------------------------------------------------------------
# the MLflow model
# --------------------------------------------------------------------------------------------------------------
try:
    import mlflow.pyfunc as _pyfunc

    _PythonModel = _pyfunc.PythonModel
except ImportError:  # pragma: no cover - mlflow is an install requirement
    _PythonModel = object


class TargetingPolicyModel(_PythonModel):
    """MLflow pyfunc: a DataFrame with the text column and the selected covariates → :data:`OUTPUT_COLUMNS`.

    ``device``/``cpu_threads`` choose where the text model runs (``cpu`` by default: the vectors the effects were
    estimated on came from the same float32 CPU computation; ``auto`` takes a worker's GPU, in half precision).
    """

    def __init__(self, device: str = "cpu", cpu_threads: Optional[int] = None, verify_weights: bool = True):
        self.device = device
        self.cpu_threads = cpu_threads
        self.verify_weights = verify_weights

    def load_context(self, context):
        from ..embed.models import weights_hash
        from ..embed.udf import get_model
        from ..represent.baselines import load_representation

        spec = PolicySpec.load(context.artifacts["policy"])
        source = context.artifacts["embedding_model"]
        if self.verify_weights and weights_hash(source) != spec.embed["weights_hash"]:
            raise ValueError(f"the logged text model at {source} does not match the weights hash "
                             f"{spec.embed['weights_hash']} the embeddings were computed with")
        embedder = get_model(spec.embed_spec(source, self.device, self.cpu_threads))  # once per Python worker
        self.scorer = PolicyScorer(spec, embedder, load_representation(context.artifacts["sae"]))

    def predict(self, context, model_input, params=None):
        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        return self.scorer.score(model_input)


def model_signature(spec: PolicySpec, covariate_types: Optional[Mapping[str, str]] = None):
    """Input: the text column (string) and the selected covariates (``double`` when used as numbers, the training
    column's type when categorical, unless ``covariate_types`` says otherwise); output: :data:`OUTPUT_COLUMNS`."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    types = dict(covariate_types or {})
    inputs = [ColSpec("string", spec.text_col)]
    if spec.rule["kind"] == "budget":  # ties at the cutoff are decided per unit id (policy.rules.tie_draws)
        inputs.append(ColSpec("string", "unit_id"))
    for m in spec.modifiers:
        if m.source == "covariate":
            inputs.append(ColSpec(types.get(m.column, m.dtype or "double"), m.column))
    outputs = [ColSpec(t, c) for c, t in zip(OUTPUT_COLUMNS, ["integer", "double", "double", "double", "string",
                                                               "integer", "string"])]
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs))


def pip_requirements(package: Optional[str] = None) -> List[str]:
    """Explicit requirements (inferring them would load the model in a subprocess: slow, and offline here).

    ``package``: the line for this package (``tracking.package_requirement``: the built wheel logged with the
    model, or ``tokens2policy==<version>``); default the pinned version."""
    from importlib import metadata

    from .. import __version__

    def pin(dist):
        try:
            return f"{dist}=={metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            return dist

    return [pin(d) for d in ("mlflow", "torch", "sentence-transformers", "transformers", "tokenizers", "numpy",
                             "pandas", "scipy", "scikit-learn")] + [package or f"tokens2policy=={__version__}"]


def input_example(spec: PolicySpec, covariate_types: Optional[Mapping[str, str]] = None) -> pd.DataFrame:
    """One valid input row that carries no unit's data: a placeholder text, numeric covariates at their training
    fill value, categorical ones at their reference level, and a placeholder ``unit_id`` when the rule is the
    budget rule (its ties are decided per unit id, so the signature requires one)."""
    types = dict(covariate_types or {})
    row: Dict[str, Any] = {spec.text_col: "An example text."}
    if spec.rule["kind"] == "budget":
        row["unit_id"] = "example-unit"
    for m in spec.modifiers:
        if m.source != "covariate":
            continue
        kind = types.get(m.column, m.dtype or "double")
        if m.kind == "categorical" and m.levels:
            value: Any = m.levels[0]
            value = {"long": int, "double": float, "boolean": lambda v: str(v).lower() == "true"}.get(
                kind, str)(value)
        else:
            value = float(m.fill if m.fill is not None else 0.0)
        row[m.column] = value
    return pd.DataFrame([row])


def log_policy_model(spec: PolicySpec, sae, embed_source: str, name: str = "policy_model",
                     registered_model_name: Optional[str] = REGISTERED_MODEL, device: str = "cpu",
                     cpu_threads: Optional[int] = None, covariate_types: Optional[Mapping[str, str]] = None,
                     extra_pip_requirements: Sequence[str] = (), package_requirement: Optional[str] = None,
                     extra_artifacts: Optional[Mapping[str, str]] = None, alias: Optional[str] = None) -> str:
    """Log the chain as a pyfunc in the active (or a new) MLflow run, register a version; return the model URI.

    ``sae``: the fitted ``SparseAutoencoder`` (or a baseline representation, or the directory either was saved
    to, e.g. the represent stage's logged ``representation`` artifact); ``embed_source``: the local
    directory of the text model (``ModelSpec.source`` of the embed stage). The model carries its signature and an
    input example; ``package_requirement``/``extra_artifacts`` come from ``tracking.package_requirement`` (the
    built wheel inside the model). ``alias`` (e.g. ``champion``) is moved to the new version. Returns
    ``models:/<name>/<version>`` when registered, else the run's ``runs:/`` URI.
    """
    import mlflow

    from ..embed.models import weights_hash

    if not os.path.isdir(str(embed_source)):
        raise ValueError(f"embed_source must be the text model's local directory, got {embed_source!r}")
    if weights_hash(embed_source) != spec.embed["weights_hash"]:
        raise ValueError(f"the model files at {embed_source} do not match the spec's weights hash "
                         f"{spec.embed['weights_hash']}")
    tmp = tempfile.mkdtemp(prefix="t2p_policy_")
    try:
        sae_dir = sae if isinstance(sae, (str, os.PathLike)) else sae.save(os.path.join(tmp, "sae"))
        policy_path = spec.save(os.path.join(tmp, "policy.json"))
        info = mlflow.pyfunc.log_model(
            name=name, python_model=TargetingPolicyModel(device=device, cpu_threads=cpu_threads),
            artifacts={"embedding_model": str(embed_source), "sae": str(sae_dir), "policy": policy_path,
                       **dict(extra_artifacts or {})},
            signature=model_signature(spec, covariate_types),
            input_example=input_example(spec, covariate_types),
            pip_requirements=pip_requirements(package_requirement) + list(extra_pip_requirements),
            registered_model_name=registered_model_name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if registered_model_name:
        if alias:
            mlflow.MlflowClient().set_registered_model_alias(registered_model_name, alias,
                                                             str(info.registered_model_version))
        return f"models:/{registered_model_name}/{info.registered_model_version}"
    return info.model_uri


def spark_scorer(spark, model_uri: str):
    """``mlflow.pyfunc.spark_udf`` returning a struct of :data:`OUTPUT_COLUMNS` (local env: the driver's Python)."""
    import mlflow.pyfunc

    return mlflow.pyfunc.spark_udf(spark, model_uri, result_type=OUTPUT_DDL, env_manager="local")


def log_stage_policy_model(cfg, exp: str, outcome: str, sub: pd.DataFrame, mods: Sequence[Modifier],
                           values: Mapping[str, np.ndarray], kinds: Mapping[str, str], tree: PolicyTree,
                           budget_fit, cluster=None, representation_dir: Optional[str] = None,
                           representation_uri: Optional[str] = None) -> Optional[str]:
    """The policy stage's hook: freeze one (experiment, outcome)'s deployable rule (``policy.recommended``) and log
    and register it in the active run; returns the model URI, or None when ``policy.learner`` has no linear final
    stage (only ``*_selected`` learners can be served as ``[1, Z]β``) or no registered representation exists
    (with a warning).

    ``sub``: the policy job's per-outcome frame (units joined with their ``effects`` rows: treatment, the outcome,
    fold, mu0, mu1, propensity, cate, sample). The linear final stage is refitted from the stored cross-fitted
    nuisances of the estimation units (``sample``, as the effects stage fits it) — the same OLS, checked against
    the stored CATE of every unit. ``budget_fit``: the budget rule's (cutoff, tie share) from
    ``policy.job.learn_policies``. ``representation_dir``: the saved SAE; else ``representation_uri``: the
    represent model that wrote the ``neurons`` version the policy stage read (``represent.job.represent_model_uri``),
    never a floating "latest". Registered as ``tracking.policy_model_name`` for (exp, outcome), with the
    ``tracking.model_alias`` alias.
    """
    import mlflow

    from ..effects.learners import DRLearner, RLearner
    from ..embed.models import resolve_model
    from ..tracking import model_name, package_requirement, tracking_uri

    p = cfg.policy
    if not p.learner.endswith("_selected"):
        return None
    if representation_dir is None:
        import warnings

        if representation_uri is None:  # neurons written without the represent stage's model record
            warnings.warn(f"policy model not logged for {exp}/{outcome}: the neurons table does not record the "
                          "represent model that wrote it (run the represent stage)")
            return None
        try:
            local = mlflow.artifacts.download_artifacts(representation_uri)
        except Exception as exc:
            warnings.warn(f"policy model not logged for {exp}/{outcome}: cannot load the representation "
                          f"{representation_uri} that wrote the neurons ({type(exc).__name__}: {exc})")
            return None
        representation_dir = os.path.join(local, "artifacts", "representation")
    from ..honesty import estimated_on
    from .job import estimation_mask

    Z, _ = _encode_training(values, kinds, cfg.effects.modifier_encoding, len(sub))
    cls = DRLearner if p.learner.startswith("dr") else RLearner
    est = estimation_mask(sub)
    nuisances = {"mu0": sub["mu0"].to_numpy()[est], "mu1": sub["mu1"].to_numpy()[est],
                 "e": sub["propensity"].to_numpy()[est]}
    learner = cls(final="linear", alpha=cfg.effects.alpha, seed=cfg.seed).fit(
        Z[est], sub["treatment"].astype(int).to_numpy()[est], sub[outcome].astype(float).to_numpy()[est],
        sub["fold"].astype(int).to_numpy()[est], Z=Z[est], cluster=None if cluster is None else cluster[est],
        nuisances=nuisances)
    if not np.allclose(learner.effect(Z), sub["cate"].to_numpy(), rtol=0, atol=1e-8):
        raise ValueError(f"{exp}/{outcome}: the refitted linear final stage does not reproduce the effects table's "
                         f"'{p.learner}' CATE (were effects and policy run with the same modifiers and config?)")
    rule = {"tree": tree, "threshold": threshold_rule(p.cost),
            "budget": budget_rule(budget_fit[0], budget_fit[1], p.budget, cfg.seed)}[p.recommended]
    embed_spec = resolve_model(cfg.embed, tracking_uri=tracking_uri(cfg), registry_uri=cfg.tracking.registry_uri)
    spec = PolicySpec.from_fitted(embed_spec, mods, values, kinds, rule, cate_model=learner,
                                  cate_encoding=cfg.effects.modifier_encoding, frame=sub,
                                  metadata={"experiment_id": exp, "outcome": outcome, "learner": p.learner,
                                            "policy": p.recommended, "n_units": int(len(sub)),
                                            "n_estimation": int(est.sum()),
                                            "estimated_on": estimated_on(cfg.honesty)})
    name = "policy_" + "".join(ch if ch.isalnum() else "_" for ch in f"{exp}_{outcome}")
    requirement, artifacts = package_requirement(cfg)
    return log_policy_model(spec, representation_dir, embed_spec.source, name=name,
                            registered_model_name=model_name(cfg, "policy", exp, outcome) if p.register_model
                            else None, package_requirement=requirement, extra_artifacts=artifacts,
                            alias=cfg.tracking.model_alias)


def _encode_training(values, kinds, encoding, n):
    from ..effects.gates import encode_modifiers

    return encode_modifiers(values, kinds, encoding) if values else (np.zeros((n, 0)), [])
