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


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A real S3-compatible server (moto's standalone server) on loopback with an empty bucket."""
    from .s3 import MotoS3, unavailable_reason as s3_unavailable

    why = s3_unavailable()
    if why:
        pytest.skip(why)
    with MotoS3(tmp_path_factory.mktemp("s3")) as server:
        yield server
