"""The serving chain of the targeting policy: raw pre-treatment inputs in, recommended treatment, CATE and rule out.

The chain is the pipeline's own, each fitted piece frozen:

    text ──(the embed stage's text model, :class:`~tokens2policy.embed.models.TextEmbeddingModel`)──▶ vector
         ──(the represent stage's :class:`~tokens2policy.represent.sae.SparseAutoencoder`)──▶ sparse neurons
    neurons + covariates ──(the effects stage's modifier encoding, frozen on the training units)──▶ Z
         ──(the effects stage's fitted linear final stage [1, Z]·β, table ``cate_final_stages``)──▶ CATE and CI
    Z / CATE ──(policy rule: exact tree, CATE > cost, or the budget's CATE cutoff)──▶ recommended treatment, rule

:class:`PolicySpec` is everything but the model files (saved as ``policy.json``): the embedding settings and the
weights hash the embeddings were computed with, the modifier encodings, the final stage's coefficients,
covariance and critical value, and the rule. :class:`PolicyScorer` runs the chain in memory
(:meth:`PolicyScorer.score` from raw text, :meth:`PolicyScorer.score_codes` from sparse codes, the represent
stage's ``neurons`` rows); :func:`load_scorer` builds one from the saved pieces and refuses a text model whose
files are not the ones the embeddings were computed with. The MLflow packaging around it is
:mod:`tokens2policy.policy.pyfunc`.

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
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd

from ..effects.design import Modifier, neuron_matrix
from ..effects.gates import split_groups
from .rules import budget_assign, budget_fired
from .tree import Leaf, PolicyTree, Split

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
                    frame: Optional[pd.DataFrame] = None, cov=None, critical_value: Optional[float] = None,
                    terms: Optional[Sequence[str]] = None) -> "PolicySpec":
        """Freeze a fitted chain.

        ``embed_spec``: the embed stage's ``ModelSpec``; ``modifiers, values, kinds``: the effects stage's
        ``modifier_frame`` on the training units; ``rule``: a fitted ``PolicyTree`` or :func:`threshold_rule` /
        :func:`budget_rule`. The linear final stage is either ``cate_model`` (a fitted learner with a linear final
        stage, ``DRLearner(final="linear")``, fitted on ``encode_modifiers(values, kinds, cate_encoding)``) or the
        fitted numbers: ``coef`` with, for a CI, ``cov`` and ``critical_value`` — what the effects stage stored
        (:class:`tokens2policy.effects.final_stage.LinearFinalStage`). ``terms``: the names the coefficients are
        for (``(intercept)`` first); when given they must be the design this spec computes from the modifiers, so
        coefficients fitted on another design are refused instead of served.
        """
        if (cate_model is None) == (coef is None):
            raise ValueError("give exactly one of cate_model (a fitted linear-final learner) or coef")
        if cate_model is not None:
            if cov is not None or critical_value is not None:
                raise ValueError("cov and critical_value come from cate_model; give them only with coef")
            coef = cate_model.coef_  # raises ValueError for a non-linear final stage
            cov = cate_model.model_.cov
            critical_value = cate_model.model_.critical_value(cate_model.alpha)
        elif (cov is None) != (critical_value is None):
            raise ValueError("a CI needs both cov and critical_value (or neither: no CI)")
        embed = {k: getattr(embed_spec, k) for k in ("name", "weights_hash", "loader", "max_tokens", "long_text",
                                                    "max_chunks", "max_text_chars", "batch_tokens", "max_batch_size")}
        if not isinstance(embed["loader"], str):
            raise ValueError("only a named embedding loader ('text' or 'package.module:function') can be served")
        spec = cls(text_col=text_col, embed=embed, modifiers=freeze_modifiers(modifiers, values, kinds, frame),
                   cate_encoding=cate_encoding, coef=[float(c) for c in np.ravel(coef)],
                   rule=rule if isinstance(rule, dict) else tree_rule(rule),
                   cov=None if cov is None else np.asarray(cov, dtype=float).tolist(),
                   critical_value=None if critical_value is None else float(critical_value),
                   metadata=dict(metadata or {}))
        if terms is not None:
            design = spec.linear_design(spec._empty())[1]
            if list(terms)[1:] != design:
                raise ValueError(f"the final stage's coefficients are for terms {list(terms)}, but the modifiers give "
                                 f"the design {['(intercept)', *design]}: effects and policy did not see the same "
                                 "modifiers and settings (rerun the effects stage)")
        return spec

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
        """The whole chain: ``frame``'s text → vector → sparse code (:meth:`neurons`), then :meth:`score_codes`."""
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
        return self.score_codes(indices, values, frame, status)

    def score_codes(self, indices: Sequence, values: Sequence, frame: pd.DataFrame,
                    status: Optional[Sequence[str]] = None) -> pd.DataFrame:
        """The chain from the sparse codes on: per unit the active neurons ``indices`` and their ``values`` (a
        ``neurons`` row; none for a unit without one), the covariates and (budget rule) ``unit_id`` in ``frame``
        → modifier encoding → [1, Z]β with its CI → the rule. ``status``: the embed status to report (default
        ``ok``)."""
        spec = self.spec
        missing = [c for c in spec.covariates if c not in frame.columns]
        if missing:
            raise ValueError(f"model input lacks column(s) {missing}; it needs {spec.covariates}")
        n = len(frame)
        frame = frame.reset_index(drop=True)
        status = ["ok"] * n if status is None else list(status)
        vals = spec.modifier_values(indices, values, frame)
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


def load_scorer(spec_path: str, embedding_dir: str, representation_dir: str, device: str = "cpu",
                cpu_threads: Optional[int] = None, verify_weights: bool = True) -> PolicyScorer:
    """The chain from its saved pieces: ``policy.json``, the text model's directory and the saved representation.

    The text model's files must hash to the weights hash the embeddings were computed with (``spec.embed``): a
    different model would put new units on another vector space than the one the SAE and the effects were fitted
    on, so it is refused (``verify_weights=False`` skips the check). The representation is the one the policy stage
    took: the represent model version that wrote the ``neurons`` version it read."""
    from ..embed.models import weights_hash
    from ..embed.udf import get_model
    from ..represent.baselines import load_representation

    spec = PolicySpec.load(spec_path)
    if verify_weights and weights_hash(embedding_dir) != spec.embed["weights_hash"]:
        raise ValueError(f"the text model at {embedding_dir} does not match the weights hash "
                         f"{spec.embed['weights_hash']} the embeddings were computed with")
    embedder = get_model(spec.embed_spec(embedding_dir, device, cpu_threads))  # once per Python worker
    return PolicyScorer(spec, embedder, load_representation(representation_dir))
