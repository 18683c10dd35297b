"""Fixtures for the storage tests: a real HDFS (Hadoop's MiniDFSCluster) for the module that asks for it."""
from __future__ import annotations

import pytest

from .hdfs import MiniHdfs, unavailable_reason


@pytest.fixture(scope="module")
def hdfs(tmp_path_factory):
    why = unavailable_reason()
    if why:
        pytest.skip(why)
    with MiniHdfs(tmp_path_factory.mktemp("hdfs")) as cluster:
        yield cluster.uri
