"""Every job run is an MLflow run: resolved config, input table versions, metrics and artifacts.

The embedded default is a SQLite tracking store and a file artifact store under ``data_dir/mlflow``; a configured
``tracking.tracking_uri`` (or Databricks' own) replaces it.
"""
from __future__ import annotations

import contextlib
import os
from typing import Dict, Iterator, Mapping, Optional

from tokens2policy.config import Config


def tracking_uri(config: Config) -> str:
    if config.tracking.tracking_uri:
        return config.tracking.tracking_uri
    if "DATABRICKS_RUNTIME_VERSION" in os.environ:
        return "databricks"
    return f"sqlite:///{config.data_path / 'mlflow' / 'mlflow.db'}"


def artifact_root(config: Config) -> str:
    return config.tracking.artifact_root or (config.data_path / "mlflow" / "artifacts").as_uri()


def configure_mlflow(config: Config):
    """Point MLflow at this config's store and experiment; return the experiment id."""
    import mlflow

    uri = tracking_uri(config)
    if uri.startswith("sqlite:///"):
        (config.data_path / "mlflow").mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    if config.tracking.registry_uri:
        mlflow.set_registry_uri(config.tracking.registry_uri)
    name = config.tracking.experiment_name
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp else client.create_experiment(name, artifact_location=artifact_root(config))
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def _flatten(prefix: str, value, out: Dict[str, str]) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = str(value)[:500]


@contextlib.contextmanager
def stage_run(
    config: Config, stage: str, inputs: Optional[Mapping[str, Optional[int]]] = None, nested: bool = False
) -> Iterator["object"]:
    """An MLflow run for one stage: logs the full resolved config and the Delta version of every input table."""
    import mlflow

    configure_mlflow(config)
    with mlflow.start_run(run_name=stage, nested=nested or mlflow.active_run() is not None) as run:
        mlflow.set_tag("t2p.stage", stage)
        cfg = config.to_dict()
        mlflow.log_dict(cfg, "config.json")
        flat: Dict[str, str] = {}
        _flatten("", {k: cfg[k] for k in ("data_dir", "seed", stage) if k in cfg}, flat)
        mlflow.log_params(flat)
        for table, version in (inputs or {}).items():
            mlflow.log_param(f"input_version.{table}", "none" if version is None else int(version))
        yield run
