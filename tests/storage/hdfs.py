"""A real HDFS on loopback for the test suite: Hadoop's MiniDFSCluster (NameNode + DataNodes) from the
``hadoop-client-minicluster`` jars that ``t2p setup --test-jars`` cached (the version of the Hadoop client pyspark
ships), driven by the tiny Java launcher ``T2pMiniDfs.java`` compiled here with the installed JDK.

The JVM runs in its own process group, gets SIGTERM if the test process dies (prctl PR_SET_PDEATHSIG), shuts the
cluster down when its stdin closes, and is killed on exit otherwise, so no daemon outlives the tests.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Optional

from .processes import die_with_parent, stop_process_group

HERE = Path(__file__).resolve().parent


def unavailable_reason() -> Optional[str]:
    """Why no HDFS can be started here (one line), or None."""
    from tokens2policy.lakehouse.jars import cached_minicluster_jars, minicluster_coordinates

    if shutil.which("java") is None or shutil.which("javac") is None:
        return "no JDK (java and javac) on PATH: the test HDFS runs Hadoop's MiniDFSCluster in a JVM"
    if not cached_minicluster_jars():
        return f"{minicluster_coordinates()} is not cached: run `t2p setup --test-jars` (make setup does)"
    return None


class MiniHdfs:
    def __init__(self, work: Path, datanodes: int = 1, start_timeout: float = 240.0):
        self.work, self.datanodes, self.start_timeout = Path(work), datanodes, start_timeout
        self.proc: Optional[subprocess.Popen] = None
        self.uri: Optional[str] = None

    def _classpath(self) -> str:
        from tokens2policy.lakehouse.jars import cached_minicluster_jars

        classes = self.work / "classes"
        classes.mkdir(parents=True, exist_ok=True)
        jars = os.pathsep.join(cached_minicluster_jars())
        subprocess.run(["javac", "-cp", jars, "-d", str(classes), str(HERE / "T2pMiniDfs.java")], check=True,
                       capture_output=True, text=True)
        return jars + os.pathsep + str(classes)

    def start(self) -> "MiniHdfs":
        cp = self._classpath()
        log = open(self.work / "hdfs.log", "wb")
        self.proc = subprocess.Popen(
            ["java", "-Xmx768m", "-cp", cp, "T2pMiniDfs", str(self.work / "base"), str(self.datanodes)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, cwd=self.work, start_new_session=True,
            preexec_fn=die_with_parent())
        found: list = []

        def read():
            for raw in self.proc.stdout:
                line = raw.decode(errors="replace").strip()
                if line.startswith("T2P_HDFS_URI "):
                    found.append(line.split(" ", 1)[1])
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(self.start_timeout)
        if not found:
            self.stop()
            tail = (self.work / "hdfs.log").read_text(errors="replace").splitlines()[-20:]
            raise RuntimeError("MiniDFSCluster did not come up:\n" + "\n".join(tail))
        self.uri = found[0]
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        # closing its stdin makes the launcher shut the cluster down cleanly
        stop_process_group(self.proc, lambda proc: proc.stdin.close(), timeout=30)
        self.proc = None

    def __enter__(self) -> "MiniHdfs":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
