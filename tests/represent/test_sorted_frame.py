"""The represent stage sorts its collected frames (training vectors, labelling sample) on the driver instead of with
Spark's global sort: the row order must be exactly Spark's ``orderBy(...).toPandas()`` order."""
import pandas as pd


def test_driver_sort_matches_spark_orderby(spark):
    from tokens2policy.represent.job import _sorted_frame

    # strings whose order differs between code point / UTF-8 byte order (Spark, Python) and UTF-16 or locale
    # orders: upper vs lower case, accents, CJK, a character above the BMP (U+1F600) vs U+FFFF; a null key;
    # negative and positive positions (the training view's document row is position -1)
    exps = ["b", "a", None, "B", "é", "e", "\uffff", "\U0001F600", "日本", "z"]
    units = ["u10", "u2", "u1", "U1", "ü", "u", "x", "y", "u1", "u0"]
    rows = [(e, u, p, float(i)) for i, (e, u) in enumerate(zip(exps, units)) for p in (3, -1, 0)]
    df = spark.createDataFrame(pd.DataFrame(rows, columns=["experiment_id", "unit_id", "position", "v"]))
    keys = ("experiment_id", "unit_id", "position")

    want = df.orderBy(*keys).toPandas()
    got = _sorted_frame(df, keys)
    pd.testing.assert_frame_equal(got, want)
    assert list(got.columns) == list(df.columns)
