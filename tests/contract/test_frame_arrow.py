"""``ctx.frame`` of a long pandas frame goes through Arrow (issue 16: the row-by-row path cost ~30 s per 400,000
effects rows) and gives exactly the rows of the row path: NaN/NA as null, nullable integers and booleans, array
columns (one with a NaN element goes the row path, which keeps the NaN)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from tokens2policy import context


def _rows(df):
    def norm(v):
        if isinstance(v, float) and v != v:
            return "NaN"
        if isinstance(v, list):
            return tuple(norm(x) for x in v)
        return v
    return sorted((tuple(norm(v) for v in r) for r in df.collect()), key=repr)


def test_arrow_frame_equals_the_row_path(spark):
    from pyspark.sql import types as T

    schema = T.StructType([
        T.StructField("experiment_id", T.StringType()), T.StructField("unit_id", T.StringType()),
        T.StructField("cate", T.DoubleType()), T.StructField("fold", T.IntegerType()),
        T.StructField("n", T.LongType()), T.StructField("recommended", T.BooleanType()),
        T.StructField("scores", T.ArrayType(T.DoubleType()))])
    n = 50
    rng = np.random.default_rng(0)
    pdf = pd.DataFrame({
        "experiment_id": ["e1"] * n, "unit_id": [None if i == 3 else f"u{i}" for i in range(n)],
        "cate": np.where(np.arange(n) % 7 == 0, np.nan, rng.normal(size=n)),
        "fold": pd.array([None if i % 9 == 0 else i % 5 for i in range(n)], dtype="Int64"),  # NA -> null
        "n": np.arange(n, dtype=np.int64) * 10 ** 10,
        "recommended": [None if i == 5 else bool(i % 2) for i in range(n)],
        "scores": [None if i == 8 else [0.5, -1.0, float(i)] for i in range(n)]})
    fast = context.arrow_frame(spark, pdf, schema)
    assert fast is not None
    slow = spark.createDataFrame(pdf.astype(object).where(pdf.notna(), None).values.tolist(), schema)
    assert _rows(fast) == _rows(slow)
    got = {r.unit_id: r for r in fast.collect()}
    assert got["u7"].cate is None and got["u9"].fold is None and got["u5"].recommended is None
    assert got["u8"].scores is None and got["u10"].scores == [0.5, -1.0, 10.0]
    assert got["u1"].n == 10 ** 10
    # a NaN element inside an array: Arrow would store null, the row path keeps NaN -> declined
    pdf.at[10, "scores"] = [0.5, float("nan"), 10.0]
    assert context.arrow_frame(spark, pdf, schema) is None


def test_arrow_frame_declines_what_it_cannot_convert(spark):
    from pyspark.sql import types as T

    schema = T.StructType([T.StructField("m", T.MapType(T.StringType(), T.DoubleType()))])
    assert context.arrow_frame(spark, pd.DataFrame({"m": [{"a": 1.0}]}), schema) is None
    schema = T.StructType([T.StructField("k", T.IntegerType())])
    assert context.arrow_frame(spark, pd.DataFrame({"k": [1.5]}), schema) is None  # not an integer: row path
