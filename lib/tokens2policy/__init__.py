"""tokens2policy: causal, interpretable heterogeneous treatment effects from text, as Spark jobs on Delta.

Stages (one subpackage each): ingest → embed → represent → identify (NEXIS) → effects → policy → report.
"""
__version__ = "0.1.0"
