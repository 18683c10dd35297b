"""A Spark standalone cluster on loopback (1 master + N workers) started from the pyspark installation's
``spark-class``, for tests that ``spark-submit`` jobs the way a real cluster runs them.

Everything binds to 127.0.0.1 on free ports; each daemon runs in its own process group, which is killed on exit
(also when startup fails half-way), and gets SIGTERM from the kernel if the test process itself dies (timeout,
kill), so a test never leaves a JVM behind.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

REPO = Path(__file__).resolve().parents[2]


def spark_home() -> Path:
    import pyspark

    return Path(pyspark.__file__).resolve().parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the test process dies, however it dies (Linux prctl
    PR_SET_PDEATHSIG), so a killed test run leaves no daemon behind."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def daemon_env(work: Path) -> dict:
    env = dict(os.environ)
    env.update(
        SPARK_HOME=str(spark_home()),
        SPARK_LOCAL_IP="127.0.0.1",
        SPARK_LOCAL_HOSTNAME="localhost",
        SPARK_LOG_DIR=str(work / "logs"),
        SPARK_PID_DIR=str(work / "pids"),
        PYSPARK_PYTHON=sys.executable,
        PYSPARK_DRIVER_PYTHON=sys.executable,
        SPARK_NO_DAEMONIZE="1",
    )
    # Don't let a caller's submit arguments leak into the daemons.
    env.pop("PYSPARK_SUBMIT_ARGS", None)
    return env


@dataclass
class StandaloneCluster:
    work: Path
    n_workers: int = 2
    worker_cores: int = 1
    worker_memory: str = "1g"
    start_timeout: float = 120.0
    master_port: int = field(default_factory=free_port)
    master_ui_port: int = field(default_factory=free_port)
    procs: List[subprocess.Popen] = field(default_factory=list)
    logs: List[Path] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"spark://127.0.0.1:{self.master_port}"

    @property
    def ui(self) -> str:
        return f"http://127.0.0.1:{self.master_ui_port}"

    def _spawn(self, name: str, args: List[str]) -> None:
        log = self.work / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        self.logs.append(log)
        fh = open(log, "wb")
        cmd = [str(spark_home() / "bin" / "spark-class"), *args]
        # start_new_session: the daemon and anything it forks share one process group that stop() kills.
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=daemon_env(self.work),
                                cwd=self.work, start_new_session=True,
                                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        fh.close()
        self.procs.append(proc)

    def state(self) -> Optional[dict]:
        try:
            with urllib.request.urlopen(self.ui + "/json/", timeout=2) as resp:
                return json.loads(resp.read().decode())
        except (OSError, ValueError):
            return None

    def alive_workers(self) -> int:
        st = self.state() or {}
        return sum(1 for w in st.get("workers", []) if w.get("state") == "ALIVE")

    def log_tail(self, n: int = 30) -> str:
        out = []
        for log in self.logs:
            lines = log.read_text(errors="replace").splitlines() if log.exists() else []
            out.append(f"--- {log.name}\n" + "\n".join(lines[-n:]))
        return "\n".join(out)

    def start(self) -> "StandaloneCluster":
        (self.work / "pids").mkdir(parents=True, exist_ok=True)
        try:
            self._spawn("master", ["org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                                   "--port", str(self.master_port), "--webui-port", str(self.master_ui_port)])
            for i in range(self.n_workers):
                wdir = self.work / f"worker{i}"
                wdir.mkdir(parents=True, exist_ok=True)
                self._spawn(f"worker{i}", ["org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1",
                                           "--port", str(free_port()), "--webui-port", str(free_port()),
                                           "--cores", str(self.worker_cores), "--memory", self.worker_memory,
                                           "--work-dir", str(wdir), self.url])
            deadline = time.time() + self.start_timeout
            while self.alive_workers() < self.n_workers:
                dead = [p for p in self.procs if p.poll() is not None]
                if dead:
                    raise RuntimeError(f"a Spark daemon exited during startup (rc={dead[0].returncode})\n"
                                       + self.log_tail())
                if time.time() > deadline:
                    raise RuntimeError(f"{self.alive_workers()}/{self.n_workers} workers registered with "
                                       f"{self.url} after {self.start_timeout:.0f}s\n" + self.log_tail())
                time.sleep(0.5)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=10)
        self.procs.clear()

    def __enter__(self) -> "StandaloneCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def make_dist() -> dict:
    """Run ``make dist`` in the checkout (the command docs/deploy.md gives) with this test run's environment;
    return the wheel, the ``--py-files`` zip and the version they carry."""
    venv = Path(sys.prefix)
    proc = subprocess.run(["make", "-s", "-o", str(venv / ".t2p-setup-done"), "dist", f"VENV={venv}"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"make dist failed (rc={proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    wheels = sorted((REPO / "dist").glob("tokens2policy-*-py3-none-any.whl"))
    zips = sorted((REPO / "dist").glob("tokens2policy-*.zip"))
    assert len(wheels) == 1 and len(zips) == 1, (wheels, zips)
    version = wheels[0].name[len("tokens2policy-"):-len("-py3-none-any.whl")]
    return {"wheel": wheels[0], "zip": zips[0], "version": version}


def spark_submit(cluster: StandaloneCluster, job: Path, args: List[str], py_files: Path, extra_conf: dict,
                 cwd: Path, timeout: float = 300.0, jars: Optional[List[str]] = None) -> subprocess.CompletedProcess:
    """``spark-submit --master spark://127.0.0.1:PORT --py-files PKG JOB ARGS`` in client mode."""
    cmd = [str(spark_home() / "bin" / "spark-submit"), "--master", cluster.url, "--deploy-mode", "client",
           "--py-files", str(py_files), "--conf", "spark.executor.memory=768m", "--conf", "spark.cores.max=2",
           "--conf", "spark.executor.cores=1", "--conf", "spark.driver.host=127.0.0.1",
           "--conf", "spark.driver.bindAddress=127.0.0.1", "--conf", "spark.ui.enabled=false",
           "--conf", f"spark.pyspark.python={sys.executable}", "--conf", f"spark.pyspark.driver.python={sys.executable}"]
    if jars:
        cmd += ["--jars", ",".join(jars)]
    for k, v in extra_conf.items():
        cmd += ["--conf", f"{k}={v}"]
    cmd += [str(job), *args]
    env = daemon_env(cwd)
    env.pop("SPARK_NO_DAEMONIZE", None)
    # The driver must not find the package through the source tree: only the shipped zip (executors) and the
    # installed package (driver) count.
    env.pop("PYTHONPATH", None)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)

