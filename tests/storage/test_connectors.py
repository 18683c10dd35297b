"""``spark.hadoop_connectors``: which Hadoop file system connectors a session gets, and the one-line errors when
they cannot be had (the S3A run itself is tests/storage/test_s3a.py, slow)."""
from __future__ import annotations

import shutil

import pytest

from tokens2policy.config import ConfigError, load_config
from tokens2policy.lakehouse import get_spark
from tokens2policy.lakehouse.jars import cached_jars, delta_coordinates, hadoop_coordinates, hadoop_version, \
    jar_cache_dir


def test_an_unknown_connector_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="spark.hadoop_connectors"):
        load_config(None, [f"data_dir={tmp_path}", "spark.hadoop_connectors=[gcs]"])


def test_s3a_is_hadoop_aws_in_pysparks_hadoop_version():
    assert hadoop_coordinates("s3a") == f"org.apache.hadoop:hadoop-aws:{hadoop_version()}"


def test_an_uncached_connector_stops_before_spark_starts_with_the_setup_command(tmp_path, monkeypatch):
    """A jar cache that holds the Delta jars but not the S3A connector: one line naming `t2p setup --s3a`."""
    if not cached_jars():
        pytest.skip("the Delta jars are not cached (t2p setup)")
    marker = delta_coordinates()[0].replace(":", "_") + ".ok"
    shutil.copy(jar_cache_dir() / marker, tmp_path / marker)
    (tmp_path / "ivy").symlink_to(jar_cache_dir() / "ivy")
    monkeypatch.setenv("T2P_JAR_CACHE", str(tmp_path))
    assert cached_jars()  # Delta is there
    cfg = load_config(None, [f"data_dir={tmp_path / 'data'}", "spark.session=create",
                             "spark.hadoop_connectors=[s3a]"])
    with pytest.raises(ConfigError, match=r"s3a jars are not cached yet: run `t2p setup --s3a`"):
        get_spark(cfg)
