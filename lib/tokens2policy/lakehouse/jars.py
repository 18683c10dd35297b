"""Delta Lake jars (and the test suite's Hadoop minicluster jars): resolved once from Maven Central at setup, then
used from a local cache.

delta-spark's pip package holds only Python; its JVM half (``io.delta:delta-spark_<spark>_<scala>`` and
``io.delta:delta-storage``) lives on Maven Central. ``t2p setup`` resolves the coordinates that
:func:`delta.configure_spark_with_delta_pip` would ask for through Spark's own Ivy resolver into the cache, so
that no job or test downloads anything mid-run.

``t2p setup --test-jars`` (part of ``make setup``) likewise caches ``org.apache.hadoop:hadoop-client-minicluster``
in the version of the Hadoop client that pyspark ships (:func:`hadoop_version`): the test suite starts a real
HDFS (NameNode + DataNode, ``MiniDFSCluster``) from it (tests/storage/hdfs.py). ``t2p setup --s3a`` caches Hadoop's
S3A connector (``org.apache.hadoop:hadoop-aws`` of that version and its AWS SDK bundle), which
``spark.hadoop_connectors: [s3a]`` puts on the session's classpath.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List


def delta_coordinates() -> List[str]:
    """Maven coordinates matching the installed delta-spark and pyspark (same rule as configure_spark_with_delta_pip)."""
    from importlib.metadata import version

    import pyspark

    spark_mm = ".".join(pyspark.__version__.split(".")[:2])
    return [f"io.delta:delta-spark_{spark_mm}_2.13:{version('delta_spark')}"]


def jar_cache_dir() -> Path:
    return Path(os.environ.get("T2P_JAR_CACHE", Path.home() / ".cache" / "tokens2policy" / "jars"))


def _ivy_dir() -> Path:
    return jar_cache_dir() / "ivy"


def _artifact(jar_path: str) -> str:
    """``org.apache.parquet_parquet-column-1.16.0.jar`` → ``parquet-column``."""
    name = os.path.basename(jar_path).rsplit(".jar", 1)[0].split("_", 1)[-1]
    parts = name.split("-")
    while parts and parts[-1][:1].isdigit():
        parts.pop()
    return "-".join(parts)


def _spark_provided_artifacts() -> set:
    import pyspark

    return {_artifact(j) for j in glob.glob(os.path.join(os.path.dirname(pyspark.__file__), "jars", "*.jar"))}


def cached_jars() -> List[str]:
    """Cached jars for the installed Delta version that Spark does not already ship ([] before setup).

    Ivy also resolves Delta's transitive dependencies (parquet, hadoop, jackson, ...) that pyspark already holds
    in newer versions; adding the older copies would shadow Spark's own classes, so only the rest is used.
    """
    marker = jar_cache_dir() / (delta_coordinates()[0].replace(":", "_") + ".ok")
    if not marker.exists():
        return []
    provided = _spark_provided_artifacts()
    return sorted(j for j in glob.glob(str(_ivy_dir() / "jars" / "*.jar")) if _artifact(j) not in provided)


_RESOLVE_SCRIPT = """
import sys
from pyspark.sql import SparkSession
s = (SparkSession.builder.master("local[1]").appName("t2p-fetch-delta-jars")
     .config("spark.jars.packages", sys.argv[1]).config("spark.jars.ivy", sys.argv[2])
     .config("spark.ui.enabled", "false").getOrCreate())
s.stop()
"""


def _resolve(coords: str, ivy: Path, expect: str) -> List[str]:
    """Resolve Maven coordinates with Spark's Ivy into ``ivy``; return the jars (RuntimeError in one line)."""
    ivy.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-c", _RESOLVE_SCRIPT, coords, str(ivy)], capture_output=True, text=True
    )
    found = sorted(glob.glob(str(ivy / "jars" / "*.jar")))
    if proc.returncode != 0 or not any(expect in os.path.basename(j) for j in found):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"could not resolve {coords} from Maven Central: " + " | ".join(tail))
    return found


def fetch_delta_jars(verbose: bool = True) -> List[str]:
    """Resolve the Delta jars from Maven Central into the cache (idempotent); return their paths."""
    jars = cached_jars()
    if jars:
        return jars
    coords = ",".join(delta_coordinates())
    ivy = _ivy_dir()
    if verbose:
        print(f"fetching Delta jars {coords} from Maven Central into {ivy} ...", flush=True)
    found = _resolve(coords, ivy, "delta-spark")
    (jar_cache_dir() / (delta_coordinates()[0].replace(":", "_") + ".ok")).write_text("\n".join(found) + "\n")
    jars = cached_jars()
    if verbose:
        print(f"cached {len(jars)} jars: " + ", ".join(os.path.basename(j) for j in jars), flush=True)
    return jars


def hadoop_version() -> str:
    """The Hadoop client version pyspark ships (from its ``hadoop-client-api-<version>.jar``)."""
    import pyspark

    jars = glob.glob(os.path.join(os.path.dirname(pyspark.__file__), "jars", "hadoop-client-api-*.jar"))
    if not jars:
        raise RuntimeError("pyspark ships no hadoop-client-api jar: cannot tell its Hadoop version")
    return os.path.basename(jars[0])[len("hadoop-client-api-"):-len(".jar")]


def minicluster_coordinates() -> str:
    return f"org.apache.hadoop:hadoop-client-minicluster:{hadoop_version()}"


def s3a_coordinates() -> str:
    """Hadoop's S3A connector in the version of pyspark's Hadoop client (it pulls in its AWS SDK v2 bundle)."""
    return f"org.apache.hadoop:hadoop-aws:{hadoop_version()}"


# Hadoop artifacts cached beside the Delta jars, each resolved into an Ivy folder of its own: {key: (coordinates,
# folder, a jar name the resolution must contain)}. Connectors are put on a session's classpath by
# spark.hadoop_connectors; the minicluster only runs the test suite's HDFS.
def _hadoop_artifacts() -> dict:
    return {
        "minicluster": (minicluster_coordinates(), "hadoop-ivy", "hadoop-client-minicluster"),
        "s3a": (s3a_coordinates(), "s3a-ivy", "hadoop-aws"),
    }


def hadoop_coordinates(key: str) -> str:
    """Maven coordinates of a Hadoop artifact (``"minicluster"``, ``"s3a"``) in pyspark's Hadoop version."""
    return _hadoop_artifacts()[key][0]


def cached_hadoop_jars(key: str) -> List[str]:
    """The cached jars of a Hadoop artifact (``"minicluster"``, ``"s3a"``); [] before setup fetched it."""
    coords, folder, _ = _hadoop_artifacts()[key]
    if not (jar_cache_dir() / (coords.replace(":", "_") + ".ok")).exists():
        return []
    return sorted(glob.glob(str(jar_cache_dir() / folder / "jars" / "*.jar")))


def fetch_hadoop_jars(key: str, verbose: bool = True) -> List[str]:
    """Resolve a Hadoop artifact (matching pyspark's Hadoop) from Maven Central into the cache (idempotent)."""
    jars = cached_hadoop_jars(key)
    if jars:
        return jars
    coords, folder, expect = _hadoop_artifacts()[key]
    ivy = jar_cache_dir() / folder
    if verbose:
        print(f"fetching {coords} from Maven Central into {ivy} ...", flush=True)
    found = _resolve(coords, ivy, expect)
    # Ivy keeps a second copy of every jar in its download cache; the retrieved jars/ are what is used (the AWS
    # SDK bundle alone is ~690 MB)
    shutil.rmtree(ivy / "cache", ignore_errors=True)
    (jar_cache_dir() / (coords.replace(":", "_") + ".ok")).write_text("\n".join(found) + "\n")
    return cached_hadoop_jars(key)


def cached_minicluster_jars() -> List[str]:
    """The cached classpath of Hadoop's minicluster (MiniDFSCluster) for the test suite ([] before setup)."""
    return cached_hadoop_jars("minicluster")


def fetch_minicluster_jars(verbose: bool = True) -> List[str]:
    return fetch_hadoop_jars("minicluster", verbose)


if __name__ == "__main__":
    fetch_delta_jars()
