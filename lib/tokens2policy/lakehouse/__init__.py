"""Spark session, Delta jars and stage tables (see docs/tables.md for the table contracts)."""
from tokens2policy.lakehouse.jars import fetch_delta_jars
from tokens2policy.lakehouse.session import get_spark, on_databricks
from tokens2policy.lakehouse.tables import (
    MissingTableError,
    delta_table,
    experiment_filter,
    merge_table,
    read_table,
    table_exists,
    table_history,
    table_location,
    table_version,
    write_table,
)

__all__ = [
    "MissingTableError",
    "delta_table",
    "experiment_filter",
    "fetch_delta_jars",
    "get_spark",
    "merge_table",
    "on_databricks",
    "read_table",
    "table_exists",
    "table_history",
    "table_location",
    "table_version",
    "write_table",
]
