"""The report's reads that changed for speed give what the straightforward Spark query gives."""
from __future__ import annotations

import pandas as pd

from tokens2policy.report.load import _assignment_counts


def test_assignment_counts_are_spark_ordered(spark):
    """Counts per experiment/outcome/policy/recommended, sorted on the driver: equal (values, dtypes and row order,
    nulls first, strings by code point) to Spark's own ``groupBy().count().orderBy()``."""
    rows = [("e2", "y", "tree", 1), ("e1", "y", "tree", 0), ("e1", None, "tree", 1), ("e1", "y", "budget", None),
            ("e1", "y", "tree", 0), ("É", "y", "tree", 1), ("a", "y", "tree", 1), ("e1", "Y", "tree", 1)] * 3
    df = spark.createDataFrame(rows, "experiment_id string, outcome string, policy string, recommended int")
    keys = ["experiment_id", "outcome", "policy", "recommended"]
    want = df.groupBy(*keys).count().orderBy(*keys).toPandas()
    got = _assignment_counts(df)
    pd.testing.assert_frame_equal(got, want)
    assert got["count"].sum() == len(rows)
