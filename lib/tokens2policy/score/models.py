"""Which registered policy scores which units: the policy stage's own registration, or an explicit model URI.

Default (``score.model_uri`` unset): for each (experiment, outcome) the model version that the **last successful
policy stage run** registered under ``tracking.model_name(cfg, "policy", experiment, outcome)`` — found through the
version's ``run_id``, not through "latest" or an alias another run may have moved. If that run registered nothing
for the pair (``policy.register_model=false``, a learner without a linear final stage), scoring stops with one
line instead of falling back to an older model. An explicit URI (``models:/name/3``, ``models:/name@champion``,
``runs:/...``) is pinned to its version before scoring, so the ``scores`` table names the version that was used.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Optional

from tokens2policy.config import Config, ConfigError

_RUN_ID = re.compile(r"[0-9a-fA-F]{8,64}")


@dataclass(frozen=True)
class PolicyModel:
    """A loadable policy model: its pinned URI, registered name and version (None outside the registry) and the
    input columns its signature asks for."""

    uri: str
    name: Optional[str]
    version: Optional[str]
    inputs: tuple


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def _with_inputs(uri: str, name: Optional[str], version: Optional[str]) -> PolicyModel:
    import mlflow

    try:
        info = mlflow.models.get_model_info(uri)
    except Exception as exc:  # MlflowException, OSError: no such model / version / run / path
        raise ConfigError(f"cannot load the policy model {uri}: {_first_line(exc)}") from None
    if info.signature is None:
        raise ConfigError(f"the model {uri} has no signature: it is not a policy model logged by tokens2policy")
    return PolicyModel(uri, name, version, tuple(info.signature.inputs.input_names()))


def explicit_model(uri: str) -> PolicyModel:
    """``models:/name/version`` as is, ``models:/name@alias`` pinned to the alias' current version, any other URI
    (``runs:/``, a path) unregistered."""
    import mlflow

    m = re.fullmatch(r"models:/(.+)@([^@/]+)", uri)
    if m:
        try:
            v = mlflow.MlflowClient().get_model_version_by_alias(m.group(1), m.group(2))
        except Exception as exc:
            raise ConfigError(f"cannot load the policy model {uri}: {_first_line(exc)}") from None
        return _with_inputs(f"models:/{v.name}/{v.version}", v.name, str(v.version))
    m = re.fullmatch(r"models:/(.+)/(\d+)", uri)
    if m:
        return _with_inputs(uri, m.group(1), m.group(2))
    return _with_inputs(uri, None, None)


def last_policy_run(cfg: Config) -> Optional[str]:
    """The run id of the last successful (FINISHED) policy stage run in the config's MLflow experiment."""
    import mlflow

    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(cfg.tracking.experiment_name)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id],
                              filter_string="tags.`t2p.stage` = 'policy' AND attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def registered_models(run_id: str) -> List:
    """The model versions a run registered (a run id is MLflow's hex id, checked before it enters the filter)."""
    import mlflow

    if not _RUN_ID.fullmatch(run_id):
        raise ValueError(f"not an MLflow run id: {run_id!r}")
    return list(mlflow.MlflowClient().search_model_versions(f"run_id = '{run_id}'"))


def stage_model(cfg: Config, experiment_id: str, outcome: str, run_id: Optional[str],
                versions: List) -> PolicyModel:
    """The version of ``experiment_id``/``outcome``'s policy model among ``versions`` (those ``run_id`` registered)."""
    from tokens2policy.tracking import model_name

    name = model_name(cfg, "policy", experiment_id, outcome)
    if run_id is None:
        raise ConfigError(f"no successful policy stage run in MLflow experiment '{cfg.tracking.experiment_name}' "
                          "(tracking.experiment_name): run the pipeline through "
                          "the policy stage first, or pass --model-uri")
    found = [v for v in versions if v.name == name]
    if not found:
        raise ConfigError(f"the last successful policy stage run ({run_id}) registered no policy model "
                          f"'{name}' for experiment {experiment_id!r}, outcome {outcome!r} (policy.register_model, "
                          "policy.learner *_selected); pass --model-uri to score with another model")
    v = max(found, key=lambda v: int(v.version))
    return _with_inputs(f"models:/{name}/{v.version}", name, str(v.version))
