"""tokens2policy: causal, interpretable heterogeneous treatment effects from text, as Spark jobs on Delta.

Stages (one subpackage each): ingest → embed → represent → identify (NEXIS) → effects → policy → report.
"""


def __getattr__(name):  # ``__version__`` on first use (a git call in a source checkout; docs: _version.py)
    if name == "__version__":
        from tokens2policy._version import version

        return version()
    raise AttributeError(f"module 'tokens2policy' has no attribute {name!r}")
