"""Starting and stopping a test service in its own process group (tests/storage/hdfs.py, tests/storage/s3.py)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Callable, Optional


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


def _die_with_parent() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def die_with_parent() -> Optional[Callable[[], None]]:
    """``preexec_fn`` for a service's Popen: on Linux the service gets SIGTERM when the test process dies, so a
    crashed test run leaves no service behind; None elsewhere."""
    return _die_with_parent if sys.platform.startswith("linux") else None
