"""What the notebooks in ``notebooks/`` call: widgets for the config on Databricks, env vars / defaults elsewhere.

A notebook is a thin shell: it asks :func:`notebook_args` for the config path, the ``--set`` overrides and the
force flag (Databricks widgets when ``dbutils`` exists, else ``T2P_CONFIG`` / ``T2P_OVERRIDES`` / ``T2P_FORCE``
environment variables, else defaults), then calls :func:`run_notebook_stage`, which runs the stage through the
same runner as ``t2p run`` (skip rule, ``stage_runs`` record, MLflow run).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

from tokens2policy.config import REPO_ROOT, Config, load_config

WIDGETS = {
    "config": "path of the YAML profile (default: conf/databricks.yaml on Databricks, conf/local.yaml elsewhere)",
    "overrides": "config overrides key=value, separated by ';' or new lines (e.g. data_dir=/tmp/x; seed=1)",
    "force": "true to rerun the stage even when it is up to date",
}


@dataclass
class NotebookArgs:
    config_path: str
    overrides: List[str]
    force: bool

    def load(self) -> Config:
        return load_config(self.config_path, self.overrides)


def _default_config() -> str:
    name = "databricks.yaml" if "DATABRICKS_RUNTIME_VERSION" in os.environ else "local.yaml"
    if REPO_ROOT is not None:
        return str(REPO_ROOT / "conf" / name)
    return f"conf/{name}"  # installed: load_config finds the bundled profile inside the package


def split_overrides(text: Optional[str]) -> List[str]:
    """``"a=1; b.c=x\\n d=[1, 2]"`` → ``["a=1", "b.c=x", "d=[1, 2]"]`` (';' inside brackets is kept)."""
    if not text:
        return []
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch in ";\n" and depth <= 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def notebook_args(namespace: Optional[Dict[str, Any]] = None, defaults: Optional[Dict[str, str]] = None) -> NotebookArgs:
    """Read the notebook's parameters: widgets if ``dbutils`` is in ``namespace`` (the notebook's globals()),
    otherwise ``T2P_<NAME>`` environment variables, otherwise ``defaults`` / the built-in defaults."""
    defaults = {"config": _default_config(), "overrides": "", "force": "false", **(defaults or {})}
    dbutils = (namespace or {}).get("dbutils")
    values: Dict[str, str] = {}
    for name, help_text in WIDGETS.items():
        if dbutils is not None:
            dbutils.widgets.text(name, defaults[name], help_text[:40])
            values[name] = dbutils.widgets.get(name)
        else:
            values[name] = os.environ.get(f"T2P_{name.upper()}", defaults[name])
    config = values["config"] or defaults["config"]
    if not os.path.isabs(config) and not os.path.exists(config) and REPO_ROOT is not None \
            and (REPO_ROOT / config).exists():
        config = str(REPO_ROOT / config)
    return NotebookArgs(config, split_overrides(values["overrides"]),
                        str(values["force"]).strip().lower() in ("1", "true", "yes", "y"))


def run_notebook_stage(stages: Sequence[str] | str, args: NotebookArgs, spark=None) -> List[dict]:
    """Run stages (one name, a list, or "all") like ``t2p run``: reuse the active Spark session, skip up-to-date
    stages unless ``args.force``, and return the per-stage summaries (through :func:`tokens2policy.api.run`)."""
    from tokens2policy.api import run, stage_list

    force = (["all"] if stages == "all" else stage_list(stages)) if args.force else []
    return run(stages, config=args.load(), spark=spark, force=force)


def report_html(results: Sequence[dict]) -> Optional[str]:
    """The report page written by a run (for ``displayHTML`` on Databricks), or None."""
    for r in results:
        path = r.get("report_path")
        if path and os.path.exists(path):
            with open(path, encoding="utf-8") as fh:
                return fh.read()
    return None


def is_databricks_source(text: str) -> bool:
    return text.startswith("# Databricks notebook source\n") and bool(re.search(r"^# COMMAND ----------$", text,
                                                                                re.M))
