"""Stopping a test service that runs in its own process group (tests/storage/hdfs.py, tests/storage/s3.py)."""
from __future__ import annotations

import os
import signal
import subprocess
from typing import Callable


def stop_process_group(proc: subprocess.Popen, ask: Callable[[subprocess.Popen], None], timeout: float) -> None:
    """``ask(proc)`` the service to stop and wait up to ``timeout`` s; then SIGKILL its whole process group (the
    launcher's children too), so that no service outlives the test that started it."""
    try:
        ask(proc)
        proc.wait(timeout=timeout)
    except (subprocess.TimeoutExpired, ProcessLookupError, OSError, ValueError):
        pass
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)
