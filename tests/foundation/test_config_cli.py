import subprocess
import sys
from pathlib import Path

import pytest

from tokens2policy.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]


def test_local_profile_loads_and_overrides_apply(tmp_path):
    cfg = load_config(REPO / "conf" / "local.yaml", [f"data_dir={tmp_path}", "identify.alpha=0.01",
                                                     "source.outcome_cols=[a, b]", "identify.adjust=null"])
    assert cfg.data_path == tmp_path.resolve()
    assert cfg.identify.alpha == 0.01
    assert cfg.source.outcome_cols == ["a", "b"]
    assert cfg.identify.adjust is None
    assert cfg.spark.master == "local[2]"


@pytest.mark.parametrize("profile", ["local.yaml", "cluster.yaml", "databricks.yaml"])
def test_every_profile_is_valid(profile):
    cfg = load_config(REPO / "conf" / profile)
    assert cfg.data_dir


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["identify.alhpa=0.1"], "unknown config key 'identify.alhpa'"),
        (["identify.alpha=abc"], "config key 'identify.alpha'"),
        (["spark.master"], "--set expects key=value"),
        (["identify.test=quadratic"], "config key 'identify.test'"),
        (["data_dir.x=1"], "'data_dir' is not a section"),
    ],
)
def test_config_errors_are_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("spark: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    unsafe = tmp_path / "unsafe.yaml"
    unsafe.write_text("data_dir: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError):
        load_config(unsafe)


def _t2p(*args):
    return subprocess.run([sys.executable, "-m", "tokens2policy.cli", *args], capture_output=True, text=True,
                          cwd=REPO)


def test_cli_help_lists_stages():
    out = _t2p("run", "--help")
    assert out.returncode == 0
    for stage in ["ingest", "embed", "represent", "identify", "effects", "policy", "report", "all"]:
        assert stage in out.stdout


def test_cli_user_error_is_one_line_without_traceback(tmp_path):
    out = _t2p("run", "ingest", "--set", f"data_dir={tmp_path}", "--set", "ingest.n_fold=3")
    assert out.returncode == 2
    assert out.stderr.strip() == "t2p: error: unknown config key 'ingest.n_fold'"


def test_force_accepts_every_stage_and_refuses_unknown_names():
    from tokens2policy.cli import check_force
    from tokens2policy.stages import EXTRA_STAGES, STAGE_NAMES

    check_force([*STAGE_NAMES, *(s.name for s in EXTRA_STAGES), "all"])  # validate included: no error
    with pytest.raises(ConfigError, match="--force embedd: unknown stage"):
        check_force(["embed", "embedd"])
