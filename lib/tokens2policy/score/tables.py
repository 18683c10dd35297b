"""The score stage's two tables, declared once: ``scores`` and ``score_quarantine`` (docs/score.md).

``scores``: one row per (experiment_id, unit_id, outcome) — the policy's recommendation for a unit with the model
version that made it. ``score_quarantine``: an input row that could not be scored, with the ingest reason code
(:data:`tokens2policy.ingest.REASONS`), a message and the original row as JSON; the same columns as ingest's
``quarantine`` so one reader serves both.
"""
from __future__ import annotations

from pyspark.sql import types as T

SCORES = "scores"
SCORE_QUARANTINE = "score_quarantine"

SCORES_KEYS = ("experiment_id", "unit_id", "outcome")
SCORES_SCHEMA = T.StructType([
    T.StructField("experiment_id", T.StringType(), False),
    T.StructField("unit_id", T.StringType(), False),
    T.StructField("outcome", T.StringType(), False),
    T.StructField("treat", T.IntegerType(), True),  # the recommendation: 1 treat, 0 control
    T.StructField("cate", T.DoubleType(), True),  # τ̂(z) of the linear final stage
    T.StructField("ci_low", T.DoubleType(), True),  # its CI (null when the model stores no covariance)
    T.StructField("ci_high", T.DoubleType(), True),
    T.StructField("rule", T.StringType(), True),  # the rule that fired (a tree leaf's rule, or the CATE cutoff)
    T.StructField("leaf_id", T.IntegerType(), True),  # tree rule: the leaf; -1 otherwise
    T.StructField("embed_status", T.StringType(), True),  # ok | empty | too_long ... | not_needed
    T.StructField("model_name", T.StringType(), True),  # registered name (null for a runs:/ or path URI)
    T.StructField("model_version", T.StringType(), True),
    T.StructField("model_uri", T.StringType(), False),  # pinned: models:/<name>/<version> when registered
    T.StructField("input_fingerprint", T.StringType(), False),  # SHA-256 of the input row as JSON
    T.StructField("source", T.StringType(), True),  # where the input came from (kind:location)
    T.StructField("scored_at", T.TimestampType(), False),  # when this (input row, model) was first scored
])
# a stored score is replaced only when its input row or its model changed (a rerun commits nothing)
SCORES_COMPARE = ("input_fingerprint", "model_uri")

QUARANTINE_KEYS = ("row_hash", "occurrence")
QUARANTINE_SCHEMA = T.StructType([
    T.StructField("experiment_id", T.StringType(), True),
    T.StructField("unit_id", T.StringType(), True),
    T.StructField("reason", T.StringType(), False),
    T.StructField("message", T.StringType(), True),
    T.StructField("raw_json", T.StringType(), False),
    T.StructField("row_hash", T.StringType(), False),
    T.StructField("occurrence", T.IntegerType(), False),
    T.StructField("source", T.StringType(), True),
])
