"""Shared fixtures: one real Delta-enabled SparkSession per test session, and a fresh Config per test."""
from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@pytest.fixture(scope="session")
def spark_data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("spark_session")


@pytest.fixture(scope="session")
def spark(spark_data_dir):
    from tokens2policy.config import load_config
    from tokens2policy.lakehouse import get_spark

    cfg = load_config(None, [f"data_dir={spark_data_dir}", "spark.driver_memory=3g", "spark.shuffle_partitions=2",
                             "spark.session=create"])
    session = get_spark(cfg)
    yield session
    session.stop()


@pytest.fixture
def cfg(tmp_path):
    """A Config on the embedded default whose data_dir (lakehouse, MLflow store, reports) is a fresh tmp dir."""
    from tokens2policy.config import load_config

    return load_config(None, [f"data_dir={tmp_path / 'data'}"])


@pytest.fixture
def make_cfg(tmp_path):
    """Build a Config with overrides (``make_cfg("demo.n_units=500", ...)``) on a fresh data_dir."""
    from tokens2policy.config import load_config

    def _make(*overrides):
        return load_config(None, [f"data_dir={tmp_path / 'data'}", *overrides])

    return _make
