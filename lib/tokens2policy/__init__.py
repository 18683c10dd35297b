"""tokens2policy: causal, interpretable heterogeneous treatment effects from text, as Spark jobs on Delta.

Stages (one subpackage each): ingest → embed → represent → identify (NEXIS) → effects → policy → report.

The public Python API (``docs/api.md``)::

    import tokens2policy as t2p
    results = t2p.run("all", config="conf/local.yaml", overrides=["data_dir=/tmp/run1"])
    t2p.status(config="conf/local.yaml")                 # each stage: up to date or stale, and why
    t2p.tables(config="conf/local.yaml"); t2p.show("modifiers", config="conf/local.yaml")
    est = t2p.Nexis(alpha=0.05, test="hc2").fit(y, t, z)  # NEXIS in memory, scikit-learn style
    est.selected_, est.pvalues_, est.trace_

Importing the package is cheap: the names below load their modules (and Spark, scikit-learn) on first use.
"""
from __future__ import annotations

import importlib
from typing import Any

# public name -> module that defines it (loaded on first access: `import tokens2policy` stays light)
_EXPORTS = {
    "run": "tokens2policy.api",
    "status": "tokens2policy.api",
    "tables": "tokens2policy.api",
    "show": "tokens2policy.api",
    "report_path": "tokens2policy.api",
    "load_config": "tokens2policy.config",
    "Config": "tokens2policy.config",
    "ConfigError": "tokens2policy.config",
    "configure_logging": "tokens2policy.logs",
    "Nexis": "tokens2policy.nexis",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name == "__version__":  # on first use (a git call in a source checkout; docs: _version.py)
        from tokens2policy._version import version

        return version()
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tokens2policy' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later accesses skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS) | {"__version__"})
