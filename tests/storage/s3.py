"""A real S3-compatible server on loopback for the test suite: moto's standalone server (``moto_server``, from the
``moto[server]`` package of the dev extra) serving the S3 REST API over HTTP, which Spark reaches through Hadoop's
S3A connector (``hadoop-aws`` in pyspark's Hadoop version, cached by ``t2p setup --s3a``).

The server runs in its own process group on a free port, gets SIGTERM if the test process dies (prctl
PR_SET_PDEATHSIG), and is killed on exit, so it never outlives the tests. Its objects live in its memory.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, Optional

from .processes import die_with_parent, stop_process_group

ACCESS_KEY, SECRET_KEY, REGION = "t2p-test-access", "t2p-test-secret-3f9a", "us-east-1"


def moto_server_bin() -> Optional[str]:
    found = Path(sys.executable).with_name("moto_server")
    return str(found) if found.exists() else shutil.which("moto_server")


def unavailable_reason() -> Optional[str]:
    """Why no S3 run can happen here (one line), or None."""
    from tokens2policy.lakehouse.jars import cached_hadoop_jars, hadoop_coordinates

    if shutil.which("java") is None:
        return "no java on PATH: Spark needs a JVM"
    if moto_server_bin() is None:
        return "moto_server is not installed: pip install 'moto[server]' (the dev extra has it)"
    if not cached_hadoop_jars("s3a"):
        return f"{hadoop_coordinates('s3a')} is not cached: run `t2p setup --s3a` (make setup does)"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoS3:
    def __init__(self, work: Path, bucket: str = "t2p-lake", start_timeout: float = 60.0):
        self.work, self.bucket, self.start_timeout = Path(work), bucket, start_timeout
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: Optional[subprocess.Popen] = None

    def hadoop_conf(self) -> Dict[str, str]:
        """The Spark settings that point S3A at this server (path-style addressing, plain HTTP, static keys)."""
        return {
            "spark.hadoop.fs.s3a.endpoint": self.endpoint,
            "spark.hadoop.fs.s3a.endpoint.region": REGION,
            "spark.hadoop.fs.s3a.path.style.access": "true",
            "spark.hadoop.fs.s3a.connection.ssl.enabled": "false",
            "spark.hadoop.fs.s3a.access.key": ACCESS_KEY,
            "spark.hadoop.fs.s3a.secret.key": SECRET_KEY,
        }

    def client(self):
        """A boto3 S3 client on this server: an independent look at what landed in the bucket."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name=REGION)

    def keys(self, prefix: str = "") -> list:
        out, token = [], None
        while True:
            kw = {"Bucket": self.bucket, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
            page = self.client().list_objects_v2(**kw)
            out += [o["Key"] for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return out
            token = page["NextContinuationToken"]

    def start(self) -> "MotoS3":
        self.work.mkdir(parents=True, exist_ok=True)
        log = open(self.work / "moto.log", "wb")
        self.proc = subprocess.Popen([moto_server_bin(), "-H", "127.0.0.1", "-p", str(self.port)], stdout=log,
                                     stderr=subprocess.STDOUT, cwd=self.work, start_new_session=True,
                                     env={**os.environ, "MOTO_PORT": str(self.port)},
                                     preexec_fn=die_with_parent())
        deadline = time.time() + self.start_timeout
        while True:
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=2).close()
                break
            except urllib.error.HTTPError:
                break  # it answers
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    tail = (self.work / "moto.log").read_text(errors="replace").splitlines()[-20:]
                    raise RuntimeError("moto_server did not come up:\n" + "\n".join(tail))
                time.sleep(0.2)
        self.client().create_bucket(Bucket=self.bucket)
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        stop_process_group(self.proc, lambda proc: os.killpg(proc.pid, signal.SIGTERM), timeout=10)
        self.proc = None

    def __enter__(self) -> "MotoS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
