"""Every job run is an MLflow run: resolved config, input table versions, metrics and artifacts.

The embedded default is a SQLite tracking store and a file artifact store under ``data_dir/mlflow`` (a local
``data_dir`` only); a configured ``tracking.tracking_uri`` (or Databricks' own) replaces it, and then the artifact
location of a new experiment is the tracking server's choice unless ``tracking.artifact_root`` sets one.

What is logged never carries credentials: :func:`redacted_config` masks ``spark.conf`` values whose key looks
secret (Spark's own ``spark.redaction.regex`` plus key/credential/SAS names) and the user-info and credential
query parameters of every URI in the config.
"""
from __future__ import annotations

import contextlib
import os
import re
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple

from tokens2policy.config import Config, ConfigError

# Spark's spark.redaction.regex default, widened to cloud credential settings (fs.s3a.access.key,
# fs.azure.account.key.*, *.sas.*, *.credential*, *.auth*)
SECRET_KEY = re.compile(r"(?i)secret|password|token|access[._-]?key|account[._-]?key|\bkey\b|\.key$|sas|credential|"
                        r"auth|private|passphrase|session[._-]?token")
REDACTED = "*********(redacted)"


def tracking_uri(config: Config) -> str:
    if config.tracking.tracking_uri:
        return config.tracking.tracking_uri
    if "DATABRICKS_RUNTIME_VERSION" in os.environ:
        return "databricks"
    if not config.data_is_local:
        raise ConfigError(f"data_dir={config.data_dir} is remote and the embedded MLflow store is a local SQLite file: "
                          "set tracking.tracking_uri (an MLflow server, databricks, or sqlite:////local/mlflow.db)")
    return f"sqlite:///{config.data_path / 'mlflow' / 'mlflow.db'}"


def artifact_root(config: Config) -> Optional[str]:
    """Artifact location for a new MLflow experiment: ``tracking.artifact_root``; else ``<data_dir>/mlflow/
    artifacts`` for the embedded store; else None (the tracking server's default artifact root)."""
    if config.tracking.artifact_root:
        return config.tracking.artifact_root
    if config.tracking.tracking_uri is None and "DATABRICKS_RUNTIME_VERSION" not in os.environ:
        return (config.data_path / "mlflow" / "artifacts").as_uri()
    return None


def configure_mlflow(config: Config):
    """Point MLflow at this config's store and experiment; return the experiment id."""
    import mlflow

    uri = tracking_uri(config)
    if uri.startswith("sqlite:///") and config.tracking.tracking_uri is None:
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


def _redact_value(value: Any) -> Any:
    from tokens2policy.lakehouse.storage import redact_uri

    if isinstance(value, str):
        return redact_uri(value) if ("://" in value or "?" in value or "@" in value) else value
    if isinstance(value, list):
        return [_redact_value(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _redact_value(v) for k, v in value.items()}
    return value


def redacted_config(config: Config) -> Dict[str, Any]:
    """``config.to_dict()`` fit to log: secret-looking ``spark.conf`` values masked, credentials in URIs masked."""
    cfg = _redact_value(config.to_dict())
    conf = cfg.get("spark", {}).get("conf") or {}
    cfg["spark"]["conf"] = {k: (REDACTED if SECRET_KEY.search(k) else v) for k, v in conf.items()}
    return cfg


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
        cfg = redacted_config(config)
        mlflow.log_dict(cfg, "config.json")
        flat: Dict[str, str] = {}
        _flatten("", {k: cfg[k] for k in ("data_dir", "seed", stage) if k in cfg}, flat)
        flat.update({f"input_version.{table}": "none" if version is None else str(int(version))
                     for table, version in (inputs or {}).items()})
        mlflow.log_params(flat)  # one batch (one store transaction), not one call per input table
        yield run


# ------------------------------------------------------------------------------------------------------------
# the model registry: names, aliases and the requirement on this package
# ------------------------------------------------------------------------------------------------------------
_DEFAULT_NAMES = {
    "represent": ("tokens2policy-represent", "represent"),
    "policy": ("tokens2policy-policy-{experiment}-{outcome}", "policy_{experiment}_{outcome}"),
}


def _name_part(value: str, catalog: bool) -> str:
    """A data value (experiment id, outcome) made safe for a registered-model name: letters, digits, ``_`` (and
    ``-`` outside Unity Catalog); when that changed the value, a short hash keeps two ids apart."""
    import hashlib

    allowed = r"[^A-Za-z0-9_]" if catalog else r"[^A-Za-z0-9_\-]"
    clean = re.sub(allowed, "_", str(value))
    if catalog:
        clean = clean.lower()
    if clean != str(value) and not (catalog and clean == str(value).lower()):
        clean += "_" + hashlib.sha1(str(value).encode("utf-8")).hexdigest()[:6]
    return clean


def model_name(config: Config, kind: str, experiment: Optional[str] = None, outcome: Optional[str] = None) -> str:
    """The registered-model name of the ``represent`` or ``policy`` model (``tracking.<kind>_model_name``).

    ``{experiment}``/``{outcome}`` are filled with registry-safe forms of the ids (``{catalog}``/``{schema}`` with
    the lakehouse's). In catalog mode a name without a dot becomes ``<catalog>.<schema>.<name>`` (Unity Catalog's
    three-level names; lower case, letters, digits and ``_``).
    """
    catalog_mode = config.lakehouse.mode == "catalog"
    template = getattr(config.tracking, f"{kind}_model_name") or _DEFAULT_NAMES[kind][int(catalog_mode)]
    lh = config.lakehouse
    name = template.format(experiment=_name_part(experiment if experiment is not None else "all", catalog_mode),
                           outcome=_name_part(outcome if outcome is not None else "all", catalog_mode),
                           catalog=lh.catalog or "", schema=lh.schema_)
    if catalog_mode and "." not in name:
        name = ".".join(p for p in (lh.catalog, lh.schema_, name) if p)
    return name


def register_alias(config: Config, name: str, version) -> Optional[str]:
    """Point ``tracking.model_alias`` (``champion``) at a new registered version; return ``models:/name@alias``."""
    import mlflow

    alias = config.tracking.model_alias
    if not alias:
        return None
    mlflow.MlflowClient().set_registered_model_alias(name, alias, str(version))
    return f"models:/{name}@{alias}"


def package_requirement(config: Config) -> Tuple[str, Dict[str, str]]:
    """(requirement line, extra model artifacts) for this package in a logged model's ``requirements.txt``.

    With a built wheel of the running version (``tracking.package_wheel``, else ``dist/tokens2policy-<version>-
    *.whl`` of the source checkout) the wheel is logged inside the model (``artifacts/<wheel>``) and the line
    points at it: MLflow installs requirements from the model directory, so a serving environment installs
    exactly this code. Without one: ``tokens2policy==<version>`` (a package index must serve it).
    """
    import glob

    from tokens2policy import __version__
    from tokens2policy.config import REPO_ROOT
    from tokens2policy.lakehouse.storage import is_local, local_path

    wheel = config.tracking.package_wheel
    if wheel is None and REPO_ROOT is not None:
        found = sorted(glob.glob(str(REPO_ROOT / "dist" / f"tokens2policy-{__version__}-*.whl")))
        wheel = found[-1] if found else None
    if wheel is None:
        return f"tokens2policy=={__version__}", {}
    if not is_local(wheel):
        raise ConfigError(f"tracking.package_wheel={wheel}: give a local path to the built wheel (make dist)")
    path = local_path(wheel)
    if not os.path.isfile(path):
        raise ConfigError(f"tracking.package_wheel={wheel} does not exist: build it with `make dist`")
    return f"artifacts/{os.path.basename(path)}", {"package_wheel": path}
