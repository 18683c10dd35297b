"""The selection/estimation split (tokens2policy.honesty): the Spark and numpy twins agree on every unit, the roles
are stable (rerun, other batches, other row order) and split the units by the configured share."""
import hashlib

import numpy as np
import pytest
from scipy import stats

from tokens2policy.config import HonestyConfig
from tokens2policy.honesty import (
    BOTH, ESTIMATION, SELECTION, estimated_on, estimates, role_column, selection_filter, selects, stable_uniform,
    unit_roles,
)

HOSTILE = ["u1", "O'Brien", "a\u001fb", "", " ", "ünï©ødé", "x'; DROP TABLE units; --", "\\", "%_", "12345",
           "multi\nline", "tab\there", "😀"]


def test_spark_role_column_equals_numpy_twin_on_hostile_ids(spark):
    from pyspark.sql import functions as F

    params = HonestyConfig(selection_share=0.37, seed=5)
    exps = ["exp'1", "e\u001fx"]
    rows = [(e, u) for e in exps for u in HOSTILE + [f"n{i}" for i in range(300)]]
    df = spark.createDataFrame(rows, "experiment_id string, unit_id string")
    got = df.select("experiment_id", "unit_id", role_column(params).alias("role"),
                    selection_filter(params).alias("selects")).collect()
    spark_roles = {(r.experiment_id, r.unit_id): r.role for r in got}
    numpy_roles = unit_roles([e for e, _ in rows], [u for _, u in rows], params)
    assert [spark_roles[k] for k in rows] == list(numpy_roles)
    assert all(r.selects == (r.role == SELECTION) for r in got)
    # an integer id hashes as its decimal digits in both twins
    ints = spark.createDataFrame([("e", i) for i in range(50)], "experiment_id string, unit_id long")
    assert [r.role for r in ints.select(role_column(params).alias("role")).collect()] == \
        list(unit_roles("e", range(50), params))


def test_role_is_the_documented_hash_and_share_is_binomial():
    params = HonestyConfig(selection_share=0.3, seed=11)
    ids = [f"u{i}" for i in range(4000)]
    roles = unit_roles("exp", ids, params)
    # independent straightforward implementation of the documented rule
    for u, role in zip(ids[:200], roles[:200]):
        key = int(hashlib.sha256(f"honesty\u001fexp\u001f{u}\u001f11".encode()).hexdigest()[:15], 16)
        assert role == (SELECTION if key < 0.3 * 2**60 else ESTIMATION)
    k = int((roles == SELECTION).sum())
    assert stats.binomtest(k, len(ids), 0.3).pvalue > 1e-3, k
    u = stable_uniform(((("exp", x)) for x in ids), 11)
    assert stats.kstest(u, "uniform").pvalue > 1e-3


def test_roles_are_stable_across_batches_order_and_reruns_and_depend_on_seed():
    params = HonestyConfig()
    ids = np.array([f"id{i}" for i in range(1000)])
    whole = dict(zip(ids, unit_roles("e", ids, params)))
    perm = np.random.default_rng(0).permutation(ids)
    for batch in np.array_split(perm, 7):  # incremental ingest batches, any order
        assert all(whole[u] == r for u, r in zip(batch, unit_roles("e", batch, params)))
    other = unit_roles("e", ids, HonestyConfig(seed=params.seed + 1))
    assert 0.3 < np.mean(other != np.array([whole[u] for u in ids])) < 0.7
    # the role is not the fold: the fold key hashes the same ids without the salt
    from tokens2policy.ingest.folds import fold_key_py

    fold_u = np.array([fold_key_py("e", u, params.seed) for u in ids]) / 2**60
    sel = np.array([whole[u] == SELECTION for u in ids])
    assert abs(np.corrcoef(fold_u, sel)[0, 1]) < 0.1


def test_mode_none_gives_every_unit_both_roles():
    params = HonestyConfig(mode="none")
    roles = unit_roles("e", ["a", "b"], params)
    assert list(roles) == [BOTH, BOTH] and selects(roles).all() and estimates(roles).all()
    assert estimated_on(params) == "all" and estimated_on(HonestyConfig()) == ESTIMATION
    split = unit_roles("e", [f"u{i}" for i in range(100)], HonestyConfig())
    assert not (selects(split) & estimates(split)).any() and (selects(split) | estimates(split)).all()


def test_config_rejects_degenerate_shares():
    from tokens2policy.config import ConfigError, load_config

    for bad in ("honesty.selection_share=0", "honesty.selection_share=1", "honesty.mode=half"):
        with pytest.raises(ConfigError, match="honesty"):
            load_config(None, [bad])
