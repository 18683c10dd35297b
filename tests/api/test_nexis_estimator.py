"""`tokens2policy.Nexis`: the in-memory NEXIS engine as a scikit-learn style estimator (no Spark)."""
import inspect

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp


def _design(n=1500, m=12, seed=0):
    """Known truth: the effect of t is 1 + 2 z0 - 1.5 z3; z1 is a proxy of z0 (correlated, no own effect)."""
    rng = np.random.default_rng(seed)
    z = rng.binomial(1, 0.3, (n, m)).astype(float)
    z[:, 1] = np.where(rng.random(n) < 0.85, z[:, 0], 1 - z[:, 0])
    t = rng.permutation(np.arange(n) % 2)
    y = z @ rng.normal(0, 0.3, m) + t * (1 + 2 * z[:, 0] - 1.5 * z[:, 3]) + rng.normal(0, 1, n)
    return y, t, z


def test_defaults_are_the_engines():
    """The estimator's settings are exactly nexis()'s keyword arguments (besides the data), with its defaults."""
    from tokens2policy import Nexis
    from tokens2policy.identify import nexis
    from tokens2policy.nexis import DATA_ARGUMENTS

    engine = {k: p.default for k, p in inspect.signature(nexis).parameters.items()
              if k not in DATA_ARGUMENTS and not k.startswith("_")}
    assert Nexis().get_params() == engine
    assert set(DATA_ARGUMENTS) <= set(inspect.signature(nexis).parameters)


def test_fit_finds_the_true_modifiers_and_equals_the_engine():
    from tokens2policy import Nexis
    from tokens2policy.identify import nexis

    y, t, z = _design()
    est = Nexis(alpha=0.05, test="hc2").fit(y, t, z)
    assert sorted(est.selected_.tolist()) == [0, 3]  # the truth; the proxy z1 is not selected
    ref = nexis(y, t, z, alpha=0.05, test="hc2")
    np.testing.assert_array_equal(est.selected_, ref.selected)
    np.testing.assert_allclose(est.pvalues_, ref.pvalues, rtol=0, atol=0)
    np.testing.assert_allclose(est.tstats_, ref.tstats, rtol=0, atol=0)
    assert est.trace_ == ref.trace and est.converged_ is True
    assert est.n_features_in_ == z.shape[1] and est.selected_w_.size == 0
    assert est.get_support().tolist() == [j in (0, 3) for j in range(z.shape[1])]
    np.testing.assert_array_equal(est.transform(z), z[:, est.selected_])
    assert [r["feature"] for r in est.summary()] == est.selected_.tolist()


def test_dataframes_sparse_covariates_and_set_params():
    from sklearn.base import clone

    from tokens2policy import Nexis

    y, t, z = _design(seed=1)
    frame = pd.DataFrame(z, columns=[f"n{j}" for j in range(z.shape[1])])
    rng = np.random.default_rng(5)
    w = pd.DataFrame({"age": rng.normal(size=len(y)), "tenure": rng.normal(size=len(y))})
    est = Nexis().fit(pd.Series(y), pd.Series(t), frame, w)
    assert sorted(est.selected_names_) == ["n0", "n3"] and est.feature_names_in_[0] == "n0"
    assert list(est.w_names_in_) == ["age", "tenure"]
    assert list(est.transform(frame).columns) == est.selected_names_
    sparse = Nexis().fit(y, t, sp.csr_matrix(z), w.to_numpy())
    np.testing.assert_array_equal(sparse.selected_, est.selected_)
    np.testing.assert_allclose(sparse.pvalues_, est.pvalues_, rtol=1e-10)
    # sklearn's clone/set_params work from the constructor signature; the new setting reaches the engine
    other = clone(est).set_params(test="linear", alpha=0.01)
    assert other.get_params()["test"] == "linear" and not hasattr(other, "selected_")
    assert other.fit(y, t, z).result_.params["test"] == "linear"
    assert "alpha=0.01" in repr(other)


def test_bad_inputs_fail_at_fit_with_the_engines_message():
    from tokens2policy import Nexis

    y, t, z = _design(n=200)
    est = Nexis(test="quadratic")  # the constructor only stores (scikit-learn's rule)
    with pytest.raises(ValueError, match="test must be one of"):
        est.fit(y, t, z)
    with pytest.raises(ValueError, match="t must be a 0/1 treatment"):
        Nexis().fit(y, t * 2, z)
    with pytest.raises(ValueError, match="not fitted yet"):
        Nexis().get_support()
    with pytest.raises(ValueError, match="z has 3 columns"):
        Nexis().fit(y, t, z).transform(z[:, :3])
