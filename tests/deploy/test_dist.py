"""``make dist`` as docs/deploy.md uses it: a wheel whose version carries the commit and which carries the config
profiles (so ``t2p`` finds them wherever it is installed), and the .zip that ``spark-submit --py-files`` puts on the
executors' path — run on the loopback standalone cluster with a bundled profile name from a directory without
``conf/``.

Before: ``--py-files`` got a .whl (not put on the path), conf/ was not in the wheel and ``config.REPO_ROOT`` pointed
into site-packages (so ``t2p`` without ``--config`` ran on built-in defaults), and the version never changed."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .standalone import REPO, spark_submit

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def test_wheel_carries_commit_and_profiles(dist, tmp_path):
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=10", "HEAD"], capture_output=True,
                         text=True).stdout.strip()
    assert dist["version"].startswith(f"0.1.0+g{sha}")
    assert dist["zip"].read_bytes() == dist["wheel"].read_bytes()  # the same archive, named for --py-files
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                    str(dist["wheel"])], check=True, timeout=300)
    probe = ("import json, tokens2policy, tokens2policy.config as c; "
             "print(json.dumps({'file': tokens2policy.__file__, 'version': tokens2policy.__version__, "
             "'repo_root': str(c.REPO_ROOT), 'n_units': c.load_config(None).demo.n_units, "
             "'cluster_jars': c.load_config('cluster').spark.delta_jars, "
             "'dbx_mode': c.load_config('conf/databricks.yaml').lakehouse.mode}))")
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["file"].startswith(str(target)) and got["version"] == dist["version"]
    assert got["repo_root"] == "None"  # nothing is looked up next to site-packages
    assert (got["n_units"], got["cluster_jars"], got["dbx_mode"]) == (20000, "packages", "catalog")


def test_spark_submit_with_the_dist_zip_and_a_bundled_profile(standalone_cluster, dist, tmp_path):
    from tokens2policy.lakehouse.jars import cached_jars

    args = ["--config", "local", "--partitions", "4", "--set", f"data_dir={tmp_path / 'data'}",
            "--set", "spark.driver_memory=1g"]
    proc = spark_submit(standalone_cluster, REPO / "jobs" / "cluster_check.py", args, dist["zip"], extra_conf={},
                        cwd=tmp_path, jars=cached_jars())
    lines = [l for l in proc.stdout.splitlines() if l.startswith("T2P_CLUSTER_CHECK ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    summary = json.loads(lines[-1].split(" ", 1)[1])
    assert summary["ran_off_driver"] and all(dist["zip"].name in f or "/userFiles-" in f
                                             for f in summary["module_files"])
