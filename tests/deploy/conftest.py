"""Fixtures for deployment tests: a loopback Spark standalone cluster (stopped after the module, also on failure)."""
from __future__ import annotations

import shutil

import pytest

from .standalone import StandaloneCluster, make_dist


@pytest.fixture(scope="module")
def standalone_cluster(tmp_path_factory):
    if shutil.which("java") is None:
        pytest.skip("no java on PATH: a Spark standalone cluster needs a JVM")
    with StandaloneCluster(tmp_path_factory.mktemp("standalone"), n_workers=2) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def dist():
    """``make dist`` as docs/deploy.md runs it: {"wheel": Path, "zip": Path, "version": str}."""
    return make_dist()


@pytest.fixture(scope="module")
def package_py_files(dist):
    """The .zip that ``make dist`` builds for ``spark-submit --py-files``."""
    return dist["zip"]
