"""`t2p setup --horovod`: the compiler wrapper, the build environment and the CLI switch (the build itself takes
minutes and is not run here; docs/represent.md records it)."""
import shutil
import subprocess
import sys

import pytest

from tokens2policy.represent import horovod_install as hi

CXX20_ONLY = '#include <string_view>\nint main() { return std::string_view("ab").starts_with("a") ? 0 : 1; }\n'


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ on PATH")
def test_wrapper_turns_the_pinned_cxx14_into_the_standard_torch_needs(tmp_path):
    src = tmp_path / "probe.cc"
    src.write_text(CXX20_ONLY)
    plain = subprocess.run(["g++", "-std=c++14", "-fsyntax-only", str(src)], capture_output=True)
    assert plain.returncode != 0  # the probe really needs C++20
    wrapper = hi.write_cxx_wrapper(str(tmp_path), std="20")
    for flag in ("-std=c++14", "-std=gnu++14"):
        out = subprocess.run([wrapper, "-O0", flag, "-fsyntax-only", str(src)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr


def test_wrapper_keeps_every_other_argument_in_order(tmp_path):
    wrapper = hi.write_cxx_wrapper(str(tmp_path), std="17", cxx=shutil.which("echo"))
    args = ["-O2", "-std=c++14", "a file.cc", "-std=gnu++14", "-std=c++11", "-DX=1"]
    out = subprocess.run([wrapper, *args], capture_output=True, text=True).stdout.strip()
    assert out == "-O2 -std=c++17 a file.cc -std=gnu++17 -std=c++11 -DX=1"


def test_build_env_and_dry_run(tmp_path):
    env = hi.build_env("/x/cxx20", base={"PATH": "/usr/bin"})
    assert env["CXX"] == "/x/cxx20" and env["CMAKE_POLICY_VERSION_MINIMUM"] == "3.5"
    assert env["HOROVOD_WITH_PYTORCH"] == env["HOROVOD_WITH_GLOO"] == env["HOROVOD_WITHOUT_MPI"] == "1"
    assert env["PATH"].split(":")[0] == hi.os.path.dirname(sys.executable)
    lines = []
    assert hi.install_horovod(log=lines.append, dry_run=True) == 0
    cmd = lines[-1]
    assert "--no-build-isolation" in cmd and "horovod[pytorch]==0.28.1" in cmd and "spark" not in cmd
    assert hi.torch_cxx_standard() in ("17", "20")


def test_cli_setup_has_a_horovod_switch():
    from tokens2policy.cli import _parser

    assert _parser().parse_args(["setup", "--horovod"]).horovod is True
    assert _parser().parse_args(["setup"]).horovod is False
