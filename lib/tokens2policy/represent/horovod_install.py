"""Build and install Horovod (the optional ``horovod`` training backend) into the running interpreter's env.

``t2p setup --horovod`` / ``make setup-horovod`` call :func:`install_horovod`. Horovod 0.28.1 (the last
release) ships no wheels, so pip compiles it from the PyPI source; against a current PyTorch that needs
three workarounds, all applied here and nowhere else:

* **C++ standard**: Horovod's CMake pins ``-std=c++14``, but torch's headers need C++17 (torch 2.x) or C++20
  (torch >= 2.10: ``ATen.h`` says "C++20 or later compatible compiler is required"). A small compiler wrapper
  (written to a temp dir and passed as ``CXX``) rewrites ``-std=c++14``/``gnu++14`` to the standard the installed
  torch's headers ask for (:func:`torch_cxx_standard`) and execs the real ``g++``.
* **CMake >= 4** (pip's ``cmake`` wheel) refuses Horovod's ``cmake_minimum_required`` < 3.5:
  ``CMAKE_POLICY_VERSION_MINIMUM=3.5`` lets it configure. A ``cmake`` is pip-installed into the env when
  none is on ``PATH``.
* **No build isolation** (``--no-build-isolation``): Horovod's build imports the installed torch to find its
  headers and ABI; an isolated build env would fetch a different torch.

Only the ``pytorch`` extra of Horovod is installed, with Gloo (no MPI), without TensorFlow/MXNet.
``horovod[spark]`` is deliberately NOT installed: it pins ``pyarrow<11`` (and pulls ``petastorm``), which would
downgrade the pyarrow that pyspark 4.2 needs (>= 18; pip resolves it to 10.0.1). Those are only used by
Horovod's Spark *estimators* (``horovod.spark.torch``); ``horovod.spark.run`` and ``horovod.torch``, which the
backend uses, import without them.
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time

HOROVOD_VERSION = "0.28.1"
REQUIREMENT = f"horovod[pytorch]=={HOROVOD_VERSION}"

_WRAPPER = """#!/bin/sh
# Horovod {version} pins C++14; torch headers need C++{std} (written by tokens2policy.represent.horovod_install)
for a in "$@"; do
  case "$a" in
    -std=c++14) a=-std=c++{std} ;;
    -std=gnu++14) a=-std=gnu++{std} ;;
  esac
  set -- "$@" "$a"
  shift
done
exec {cxx} "$@"
"""

BUILD_ENV = {
    "HOROVOD_WITH_PYTORCH": "1",
    "HOROVOD_WITH_GLOO": "1",
    "HOROVOD_WITHOUT_MPI": "1",
    "HOROVOD_WITHOUT_TENSORFLOW": "1",
    "HOROVOD_WITHOUT_MXNET": "1",
    "CMAKE_POLICY_VERSION_MINIMUM": "3.5",
}


def torch_cxx_standard(python: str = sys.executable) -> str:
    """The C++ standard ("17" or "20") the installed torch's headers require, read from ``ATen/ATen.h``."""
    out = subprocess.run([python, "-c", "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "
                          "'include', 'ATen', 'ATen.h'))"], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError("building Horovod needs torch installed first (pip install torch)")
    try:
        with open(out.stdout.strip()) as f:
            header = f.read()
    except OSError:
        raise RuntimeError(f"torch is installed without its C++ headers ({out.stdout.strip()} missing)") from None
    return "20" if "C++20 or later" in header else "17"


def write_cxx_wrapper(directory: str, std: str = "17", cxx: str | None = None) -> str:
    """Write the compiler wrapper that turns C++14 into C++``std`` into ``directory``; returns its path."""
    real = cxx or shutil.which("g++") or shutil.which("c++")
    if not real:
        raise RuntimeError("building Horovod needs a C++ compiler (g++) on PATH")
    path = os.path.join(directory, f"cxx{std}")
    with open(path, "w") as f:
        f.write(_WRAPPER.format(version=HOROVOD_VERSION, cxx=real, std=std))
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def build_env(wrapper: str, base: dict | None = None) -> dict:
    """Environment for ``pip install horovod``: the Horovod switches, the CMake policy floor, the wrapper as CXX,
    and the interpreter's bin dir first on PATH (so a pip-installed cmake is found)."""
    env = dict(os.environ if base is None else base)
    env.update(BUILD_ENV)
    env["CXX"] = wrapper
    bindir = os.path.dirname(sys.executable)
    env["PATH"] = os.pathsep.join([bindir, env.get("PATH", "")])
    env.setdefault("MAKEFLAGS", f"-j{max(1, os.cpu_count() or 1)}")
    return env


def pip_command(python: str = sys.executable, requirement: str = REQUIREMENT) -> list[str]:
    return [python, "-m", "pip", "install", "--no-build-isolation", "--no-cache-dir", requirement]


def _has_cmake(env: dict) -> bool:
    return shutil.which("cmake", path=env.get("PATH")) is not None


def install_horovod(python: str = sys.executable, log=print, dry_run: bool = False) -> int:
    """Compile and pip-install Horovod into ``python``'s environment; returns pip's exit status.

    ``dry_run`` prints the commands and environment without running them.
    """
    tmp = tempfile.mkdtemp(prefix="t2p_horovod_")
    try:
        env = build_env(write_cxx_wrapper(tmp, std=torch_cxx_standard(python)))
        steps = []
        if not _has_cmake(env):
            steps.append([python, "-m", "pip", "install", "cmake"])
        steps.append(pip_command(python))
        log("[t2p] building Horovod " + HOROVOD_VERSION + " from source (a few minutes): "
            + " ".join(f"{k}={v}" for k, v in BUILD_ENV.items()) + f" CXX={env['CXX']}")
        for cmd in steps:
            log("[t2p] $ " + " ".join(cmd))
            if dry_run:
                continue
            t0 = time.perf_counter()
            rc = subprocess.call(cmd, env=env)
            log(f"[t2p] exit {rc} after {time.perf_counter() - t0:.0f} s")
            if rc != 0:
                return rc
        if dry_run:
            return 0
        check = subprocess.run([python, "-c", "import horovod.torch as h, horovod.spark; "
                                "print(h.gloo_built(), h.mpi_built())"], env=env, capture_output=True, text=True)
        if check.returncode != 0:
            last = (check.stderr.strip().splitlines() or ["?"])[-1]
            log(f"[t2p] horovod installed but does not import: {last}")
            return 1
        gloo, mpi = check.stdout.split()
        log(f"[t2p] horovod {HOROVOD_VERSION} ready (gloo={gloo}, mpi={mpi}); try: "
            "horovodrun -np 2 --gloo -H localhost:2 python -c 'import horovod.torch as h; h.init(); print(h.rank())'")
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
