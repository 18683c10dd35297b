"""The execution choice (tokens2policy.execution): by size under the configured bounds, forced globally or per
stage, and outside the stages' config hash (both paths write the same tables: tests/identify, tests/effects)."""
from __future__ import annotations

import pytest

from tokens2policy.config import ConfigError, load_config
from tokens2policy.execution import choose, frame_bytes
from tokens2policy.stages import config_fingerprint, get_stage


def test_auto_runs_in_memory_within_both_bounds_and_on_spark_above_either():
    cfg = load_config(None, ["execution.max_entries=1000", "execution.max_bytes=100000"])
    small = choose(cfg.execution, "identify", n_rows=100, n_columns=4, nnz=500)  # 400 + 500 entries
    assert small.mode == "memory" and small.entries == 900 and small.reason.startswith("auto:")
    assert small.bytes == frame_bytes(100, 4, 500) == 100 * (32 + 224) + 6000
    many = choose(cfg.execution, "identify", n_rows=100, n_columns=4, nnz=601)  # 1001 entries
    assert many.mode == "spark" and "max_entries" in many.reason and "max_bytes" not in many.reason
    wide = choose(load_config(None, ["execution.max_bytes=1000"]).execution, "effects", 10, 2, 10)
    assert wide.mode == "spark" and "max_bytes" in wide.reason and wide.scope == "effects"


def test_forced_modes_and_per_stage_override():
    cfg = load_config(None, ["execution.mode=spark", "execution.stages={identify: memory}",
                             "execution.max_entries=0"])
    got = choose(cfg.execution, "identify", 10**9, 10, 10**9)
    assert got.mode == "memory" and got.reason.startswith("execution.stages.identify=memory")
    eff = choose(cfg.execution, "effects", 1, 1, 0)
    assert eff.mode == "spark" and eff.reason.startswith("execution.mode=spark")
    with pytest.raises(ConfigError):
        load_config(None, ["execution.mode=gpu"])
    with pytest.raises(ConfigError):
        load_config(None, ["execution.stages={policy: spark}"])  # policy has one (in-memory) core


@pytest.mark.parametrize("stage", ["identify", "effects", "represent"])
def test_execution_settings_do_not_make_a_stage_stale_but_its_sections_do(stage):
    """Same tables either way, so how a stage runs is not in its config hash (Stage.runtime); what it computes is."""
    base = load_config(None, [])
    st = get_stage(stage)
    assert "execution" in st.readable and "execution" not in st.sections
    same = config_fingerprint(base, st)
    for override in ("execution.mode=spark", "execution.mode=memory", "execution.max_entries=7",
                     f"execution.stages={{{stage}: spark}}"):
        assert config_fingerprint(load_config(None, [override]), st) == same, override
    other = {"identify": "identify.alpha=0.01", "effects": "effects.n_bootstrap=7", "represent": "represent.k=7"}[stage]
    assert config_fingerprint(load_config(None, [other]), st) != same


def test_a_stage_reads_execution_only_where_it_declares_it():
    from tokens2policy.context import ConfigView, UndeclaredAccessError

    cfg = load_config(None, [])
    assert ConfigView(cfg, get_stage("identify").readable, "identify").execution.mode == "auto"
    with pytest.raises(UndeclaredAccessError):
        ConfigView(cfg, get_stage("report").readable, "report").execution
