"""The one place a SparkSession is made (or reused)."""
from __future__ import annotations

import os
import sys

from pyspark.sql import SparkSession

from tokens2policy.config import Config, ConfigError
from tokens2policy.lakehouse import storage
from tokens2policy.lakehouse.jars import cached_hadoop_jars, cached_jars, delta_coordinates, hadoop_coordinates

_DELTA_CONF = {
    "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
    "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
}


def on_databricks() -> bool:
    return "DATABRICKS_RUNTIME_VERSION" in os.environ


def _launcher_conf() -> dict:
    """Spark properties given by spark-submit (empty for a plain Python launch)."""
    if "PYSPARK_GATEWAY_PORT" not in os.environ:
        return {}
    from pyspark import SparkConf, SparkContext

    SparkContext._ensure_initialized()
    return dict(SparkConf().getAll())


def get_spark(config: Config) -> SparkSession:
    """A Delta-enabled SparkSession for this config.

    On Databricks, or whenever a session is already active and ``spark.session`` is ``auto``/``existing``, the active
    session is reused — never a second one. Otherwise a session is built for ``spark.master`` (``local[2]`` by
    default) with the Delta jars from the setup cache, a warehouse under ``data_dir`` (any URI), the embedded
    Derby metastore's files under a local ``data_dir`` and Arrow enabled.
    """
    sc = config.spark
    active = SparkSession.getActiveSession()
    if active is not None and (sc.session != "create" or on_databricks()):
        return active
    if sc.session == "existing" or on_databricks():
        if active is None:
            if on_databricks():
                return SparkSession.builder.getOrCreate()  # the runtime's own session, never a second one
            raise ConfigError("spark.session=existing but there is no active Spark session; use spark.session=auto")
        return active

    # Python workers must run the same interpreter (the project's venv) as the driver.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    launched = _launcher_conf()
    builder = SparkSession.builder.appName(sc.app_name)
    # spark-submit's --master wins over the profile; a profile's master applies to a plain `python`/`t2p` launch.
    if sc.master and "spark.master" not in launched:
        builder = builder.master(sc.master)
    builder = (
        builder
        .config("spark.sql.warehouse.dir", storage.join(config.data_uri, "warehouse"))
        .config("spark.sql.shuffle.partitions", str(sc.shuffle_partitions))
        .config("spark.driver.memory", sc.driver_memory)
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.databricks.delta.schema.autoMerge.enabled", "false")
    )
    if config.data_is_local:  # the embedded Derby metastore (catalogImplementation=hive) keeps its files here
        derby = storage.join(storage.local_path(config.data_uri), "derby")
        builder = builder.config("spark.driver.extraJavaOptions", f"-Dderby.system.home={derby}")
    for key, value in _DELTA_CONF.items():
        builder = builder.config(key, value)
    if (sc.master or "").startswith("local") and "spark.master" not in launched:
        # Delta replays its log with 50 tasks by default: right for clusters, pure overhead on a laptop's cores.
        builder = builder.config("spark.databricks.delta.snapshotPartitions", "2")
    if sc.delta_jars == "cache":
        jars = cached_jars()
        if not jars:
            raise ConfigError(
                "Delta jars are not cached yet: run `t2p setup` (or `make setup`) once with access to Maven Central"
            )
        for connector in sc.hadoop_connectors:
            found = cached_hadoop_jars(connector)
            if not found:
                raise ConfigError(f"spark.hadoop_connectors: {connector} jars are not cached yet: run "
                                  f"`t2p setup --{connector}` once with access to Maven Central")
            jars = jars + found
        given = [j for j in launched.get("spark.jars", "").split(",") if j]
        builder = builder.config("spark.jars", ",".join(given + [j for j in jars if j not in given]))
    elif sc.delta_jars == "packages":
        coords = delta_coordinates() + [hadoop_coordinates(c) for c in sc.hadoop_connectors]
        builder = builder.config("spark.jars.packages", ",".join(coords))
    for key, value in sc.conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark
