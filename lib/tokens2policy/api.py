"""The Python API: what ``t2p`` does, callable from a notebook or a script (``docs/api.md``).

    import tokens2policy as t2p
    results = t2p.run("all", config="conf/local.yaml", overrides=["data_dir=/tmp/run1"])
    t2p.status(config="conf/local.yaml")          # a pandas DataFrame: each stage, up to date or stale and why
    t2p.tables(config="conf/local.yaml")          # each table: rows, Delta version, last commit
    t2p.show("modifiers", config="conf/local.yaml")
    t2p.api.score("s3a://bucket/new_units/", config="conf/local.yaml")   # the registered policy on new units

Each function takes ``config`` (a YAML path, a loaded :class:`~tokens2policy.config.Config`, or None for the
embedded default ``conf/local.yaml``), ``overrides`` (``["key=value", ...]`` as ``--set``) and ``spark`` (a session
to use; None: the active session, else one built from the config). The CLI calls these same functions.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Union

from tokens2policy.config import Config, ConfigError, apply_overrides, load_config

log = logging.getLogger(__name__)

ConfigLike = Union[None, str, "os.PathLike[str]", Config]


def resolve_config(config: ConfigLike = None, overrides: Sequence[str] = ()) -> Config:
    """A Config from a YAML path (None: the embedded default) or a loaded Config, with ``overrides`` applied."""
    if isinstance(config, Config):
        return apply_overrides(config, list(overrides)) if overrides else config
    return load_config(config, list(overrides))


def check_force(names: Sequence[str]) -> None:
    """Every ``--force`` name is a stage (pipeline or extra, e.g. validate) or ``all``; else one ConfigError line."""
    from tokens2policy.stages import EXTRA_STAGES, STAGE_NAMES

    known = (*STAGE_NAMES, *(s.name for s in EXTRA_STAGES))
    for name in names:
        if name not in (*known, "all"):
            raise ConfigError(f"--force {name}: unknown stage; choose one of {', '.join(known)} or all")


def stage_list(stage: Union[str, Sequence[str]]) -> List[str]:
    """"all" → every pipeline stage; a name or a list of names → those (checked, one ConfigError line)."""
    from tokens2policy.stages import EXTRA_STAGES, STAGE_NAMES

    names = list(STAGE_NAMES) if stage == "all" else ([stage] if isinstance(stage, str) else list(stage))
    known = (*STAGE_NAMES, *(s.name for s in EXTRA_STAGES))
    for name in names:
        if name not in known:
            raise ConfigError(f"unknown stage '{name}'; choose one of {', '.join(known)} or all")
    return names


def session(config: Config, spark=None):
    """``spark`` if given, else the session the config asks for (``spark.session``: reuse the active one or make
    one with the Delta jars)."""
    if spark is not None:
        return spark
    from tokens2policy.lakehouse import get_spark

    return get_spark(config)


def run_with(spark, config: Config, stage: Union[str, Sequence[str]] = "all", force: Sequence[str] = ()) -> List[dict]:
    """Run stages on a session and config you already have (what :func:`run` and ``t2p run`` do after setup)."""
    from tokens2policy.stages import EXTRA_STAGES, STAGES, run_stages

    check_force(force)
    names = stage_list(stage)
    stages = STAGES + tuple(s for s in EXTRA_STAGES if s.name in names)
    log.info("[t2p] data_dir=%s", config.data_uri)
    return run_stages(spark, config, names, force=list(force), stages=stages)


def run(stage: Union[str, Sequence[str]] = "all", config: ConfigLike = None, overrides: Sequence[str] = (),
        spark=None, force: Sequence[str] = ()) -> List[dict]:
    """Run the pipeline (``"all"``), one stage (``"identify"``), several (``["effects", "policy"]``) or the
    validation study (``"validate"``), exactly as ``t2p run`` does: up-to-date stages are skipped unless named in
    ``force`` (``["all"]`` for every one), every outcome is recorded in ``stage_runs`` and MLflow.

    Returns one dict per stage: ``stage``, ``skipped``, ``seconds`` (wall time) and the stage's own summary (the
    report's ``report_path``, identify's selection counts, ...). Errors are the CLI's: :class:`ConfigError`,
    ``MissingTableError``, ``EmptyInputError``, each with a one-line message saying what to do.
    """
    from tokens2policy.logs import ensure_console_logging

    ensure_console_logging()
    cfg = resolve_config(config, overrides)
    return run_with(session(cfg, spark), cfg, stage, force)


def status(config: ConfigLike = None, overrides: Sequence[str] = (), spark=None):
    """Each stage's last run and whether it is up to date, with the reason when stale (a pandas DataFrame;
    see :func:`tokens2policy.overview.stage_status`)."""
    from tokens2policy.overview import stage_status

    cfg = resolve_config(config, overrides)
    return stage_status(session(cfg, spark), cfg)


def tables(config: ConfigLike = None, overrides: Sequence[str] = (), spark=None):
    """Each table the pipeline writes: rows, Delta version, last commit and operation, writing stage (a pandas
    DataFrame; see :func:`tokens2policy.overview.table_overview`)."""
    from tokens2policy.overview import table_overview

    cfg = resolve_config(config, overrides)
    return table_overview(session(cfg, spark), cfg)


def show(table: str, limit: int = 20, version: Optional[int] = None, config: ConfigLike = None,
         overrides: Sequence[str] = (), spark=None):
    """The first ``limit`` rows of a table (as of a Delta ``version``), cells shortened to read (a pandas
    DataFrame). For the full rows use ``tokens2policy.lakehouse.read_table``."""
    from tokens2policy.overview import table_head

    cfg = resolve_config(config, overrides)
    return table_head(session(cfg, spark), cfg, table, limit=limit, version=version)


def score(input: Optional[str] = None, config: ConfigLike = None, overrides: Sequence[str] = (), spark=None,
          model_uri: Optional[str] = None, kind: Optional[str] = None, experiment_id: Optional[str] = None,
          outcome: Optional[str] = None) -> Dict[str, Any]:
    """Score new units with the registered policy into the ``scores`` Delta table, as ``t2p score`` does
    (docs/score.md): ``input`` a path/URI/glob of delta/parquet/csv/json files, a catalog table, or (``kind=
    "query"``) a Spark SQL query; ``model_uri`` default: the version the last successful policy stage run
    registered for each experiment/outcome. The keyword arguments set the ``score`` config section (None keeps
    the config's value). Returns counts (``rows_in``, ``scored``, ``quarantined`` with ``reasons``, ``inserted``,
    ``updated``), the model URI used per ``experiment/outcome`` and the ``scores`` table version. Errors: one-line
    :class:`ConfigError` (no input, unreadable input, unmappable columns, no model)."""
    from tokens2policy.config import ScoreConfig
    from tokens2policy.logs import ensure_console_logging
    from tokens2policy.score.job import run as run_score

    ensure_console_logging()
    cfg = resolve_config(config, overrides)
    given = {"input": input, "model_uri": model_uri, "kind": kind, "experiment_id": experiment_id,
             "outcome": outcome}
    try:
        section = ScoreConfig.model_validate({**cfg.score.model_dump(),
                                              **{k: v for k, v in given.items() if v is not None}})
    except ValueError as err:  # pydantic's ValidationError: a bad kind
        raise ConfigError(f"score: {str(err).splitlines()[-1].strip()}") from None
    cfg = cfg.model_copy(update={"score": section})
    return run_score(session(cfg, spark), cfg)


def report_path(results: Sequence[Dict[str, Any]]) -> Optional[str]:
    """The HTML report a run wrote (None when its report stage did not run)."""
    return next((r["report_path"] for r in results if r.get("stage") == "report" and r.get("report_path")), None)
