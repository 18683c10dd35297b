"""Bad input: a clear ValueError, or a documented skip recorded in the trace — never a silent wrong answer."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from tokens2policy.identify import marginal, nexis
from tokens2policy.identify.stats import Block


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    n, m = 300, 8
    Z = rng.normal(size=(n, m))
    t = (rng.random(n) < 0.5).astype(float)
    y = t * 1.2 * Z[:, 0] + rng.normal(size=n)
    return y, t, Z


@pytest.mark.parametrize("mutate, msg", [
    (lambda y, t, Z: (y[:-1], t, Z), "rows"),
    (lambda y, t, Z: (y, t[:-1], Z), "rows"),
    (lambda y, t, Z: (np.where(np.arange(len(y)) == 3, np.nan, y), t, Z), "NaN"),
    (lambda y, t, Z: (y, t, np.where(np.arange(Z.size).reshape(Z.shape) == 5, np.nan, Z)), "NaN"),
    (lambda y, t, Z: (y, np.ones_like(t), Z), "single treatment arm"),
    (lambda y, t, Z: (y, t * 2, Z), "0/1"),
    (lambda y, t, Z: (y[:6], t[:6], Z[:6]), "n too small"),
    (lambda y, t, Z: (y, t, Z[:, 0]), "2-d"),
])
def test_bad_input_raises(data, mutate, msg):
    y, t, Z = mutate(*data)
    with pytest.raises(ValueError, match=msg):
        nexis(y, t, Z)


def test_bad_options_raise(data):
    y, t, Z = data
    for kw, msg in [(dict(test="ols"), "test"), (dict(adjust="holm"), "adjust"), (dict(alpha=1.5), "alpha"),
                    (dict(test="cluster"), "cluster ids"), (dict(test="cluster", cluster=np.zeros(len(y))), "2 clusters"),
                    (dict(test="gcm", folds=np.zeros(len(y))), "2 folds"), (dict(nuisance="rf"), "nuisance"),
                    (dict(max_rounds=0), "max_rounds"), (dict(rho=-1), "rho"), (dict(test="hc1"), "hc2"),
                    (dict(z_nuisance="rf"), "z_nuisance"),
                    (dict(test="linear", cluster=np.arange(len(y)) % 5), "independent units")]:
        with pytest.raises(ValueError, match=msg):
            nexis(y, t, Z, **kw)


def test_sparse_nan_raises(data):
    y, t, Z = data
    Zs = sp.csr_matrix(Z)
    Zs.data[4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        nexis(y, t, Zs)


@pytest.mark.parametrize("test", ["linear", "hc2", "gcm"])
def test_constant_zero_and_collinear_columns_are_skipped_and_recorded(data, test):
    y, t, Z = data
    Z = np.column_stack([Z, np.zeros(len(y)), np.full(len(y), 3.0), Z[:, 0]])  # 8: zero, 9: constant, 10: copy of 0
    r = nexis(y, t, Z, test=test)
    assert r.skipped == {8: "constant", 9: "constant"}
    assert r.selected.tolist() == [0]
    # the copy of 0 is tested before 0 enters (tie: the smaller index wins) and is collinear afterwards
    after = [x for x in r.trace if x["step"] == "forward" and x["action"] != "add"][-1]
    assert 10 in after["collinear"]
    mg = marginal(y, t, Z, test=test)
    assert np.isnan(mg.pvalues[8]) and np.isnan(mg.pvalues[9]) and np.isfinite(mg.pvalues[10])


def test_single_arm_support_is_skipped(data):
    y, t, Z = data
    Z = Z.copy()
    Z[:, 3] = np.where(t == 1, Z[:, 3], 0.0)   # active only among the treated: Z_j == T·Z_j, not identified
    r = nexis(y, t, Z, test="linear")
    assert r.skipped == {3: "constant"}


def test_min_active_skips_rare_neurons(data):
    y, t, Z = data
    Z = Z.copy()
    Z[5:, 2] = 0.0
    r = nexis(y, t, sp.csc_matrix(Z), min_active=20)
    assert r.skipped == {2: "rare"}


def test_df_exhaustion_is_recorded():
    rng = np.random.default_rng(1)
    n = 12
    Z = rng.normal(size=(n, 6))
    t = np.array([0, 1] * 6, float)
    y = t * (3 * Z[:, 0] + 3 * Z[:, 1] + 3 * Z[:, 2]) + 0.01 * rng.normal(size=n)
    r = nexis(y, t, Z, alpha=0.5, adjust=None, rho=None, backward=False, test="linear", min_active=0)
    actions = [x["action"] for x in r.trace if x["step"] == "forward"]
    assert actions[-1] in ("stop_df", "stop_empty", "stop_gate1")
    assert len(r.selected) <= (n - 4) // 2


def test_sparse_input_stays_sparse():
    rng = np.random.default_rng(0)
    Z = sp.random(100, 50, density=0.1, format="csr", random_state=1)
    b = Block(rng.normal(size=100), (rng.random(100) < .5).astype(float), None, Z)
    assert sp.issparse(b.Z) and b.Z.nnz == Z.nnz


def test_nan_in_covariates_and_list_input(data):
    y, t, Z = data
    W = np.ones((len(y), 2))
    W[:, 1] = np.arange(len(y))
    W[7, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        nexis(y, t, Z, w=W)
    r = nexis(list(y), list(t), Z.tolist(), test="linear")   # plain lists are accepted like arrays
    assert r.selected.tolist() == nexis(y, t, Z, test="linear").selected.tolist() == [0]


def test_the_stage_refuses_the_linear_test_on_clustered_units():
    """As ``nexis(test="linear", cluster=...)``: the identify stage refuses identify.test=linear when units carry a
    cluster column (the homoskedastic test's null FWER is 0.108 on clustered units, docs/validation.md); the
    cluster-robust test, hc2 and the GCM run."""
    from tokens2policy.config import IdentifyConfig
    from tokens2policy.identify.job import _validate_spark_options

    with pytest.raises(ValueError, match="independent units"):
        _validate_spark_options(IdentifyConfig(test="linear"), True, True)
    _validate_spark_options(IdentifyConfig(test="linear"), True, False)
    for test in ("cluster", "hc2", "gcm"):
        _validate_spark_options(IdentifyConfig(test=test), True, True)
