"""Spark session, Delta jars, stage tables (docs/tables.md) and storage locations as URIs (``storage``)."""
from tokens2policy.lakehouse.jars import fetch_delta_jars
from tokens2policy.lakehouse.session import get_spark, on_databricks
from tokens2policy.lakehouse.tables import (
    MissingTableError,
    commit_metadata,
    delta_table,
    experiment_filter,
    experiments_predicate,
    last_commit,
    merge_table,
    read_table,
    sql_string_literal,
    table_exists,
    table_history,
    table_location,
    table_version,
    write_table,
)

__all__ = [
    "MissingTableError",
    "commit_metadata",
    "delta_table",
    "experiment_filter",
    "experiments_predicate",
    "fetch_delta_jars",
    "get_spark",
    "last_commit",
    "merge_table",
    "on_databricks",
    "read_table",
    "sql_string_literal",
    "table_exists",
    "table_history",
    "table_location",
    "table_version",
    "write_table",
]
