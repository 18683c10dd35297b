"""The targeting policy as an MLflow pyfunc: packaging, registration and Spark scoring of the serving chain.

The chain itself — :class:`~tokens2policy.policy.serving.PolicySpec` and
:class:`~tokens2policy.policy.serving.PolicyScorer`, raw text and covariates → embed → represent → modifier
encoding → [1, Z]β → rule — is :mod:`tokens2policy.policy.serving`; this module wraps it for MLflow.

Artifacts: ``embedding_model`` (the model directory, so nothing downloads at load time; its SHA-256 is checked
against the hash the embeddings were computed with), ``sae`` (``SparseAutoencoder.save``, or the represent model's
saved representation) and ``policy`` (``policy.json``: the :class:`PolicySpec`). Everything is loaded once per
Python worker in ``load_context`` (:func:`~tokens2policy.policy.serving.load_scorer`; the text model additionally
through the embed stage's per-process cache), so ``mlflow.pyfunc.spark_udf`` scores a Delta table of new units at
scale. The policy stage's hook that builds and logs one model per (experiment, outcome) is
:func:`tokens2policy.policy.job.log_stage_policy_model`.

(Models are pickled by reference to ``tokens2policy.policy.pyfunc.TargetingPolicyModel``: the class keeps this
module path so models registered earlier still load.)
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Dict, List, Mapping, Optional, Sequence

import pandas as pd

from .serving import OUTPUT_COLUMNS, OUTPUT_DDL, PolicySpec, load_scorer

REGISTERED_MODEL = "tokens2policy-policy"  # log_policy_model's default; the stage names one per experiment/outcome

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
        self.scorer = load_scorer(context.artifacts["policy"], context.artifacts["embedding_model"],
                                  context.artifacts["sae"], self.device, self.cpu_threads, self.verify_weights)

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


