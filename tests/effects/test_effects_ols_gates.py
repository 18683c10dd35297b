"""OLS covariances against independent formulas; GATE / joint-interaction CIs cover known truth (Monte Carlo)."""
import numpy as np
import pytest

from tokens2policy.effects.gates import gate, gates_table, infer_split_kind, joint_interaction, split_groups
from tokens2policy.effects.ols import mean_with_se, ols


def test_hc1_equals_neyman_difference_in_means_formula():
    rng = np.random.default_rng(1)
    n = 300
    t = (rng.random(n) < 0.4).astype(float)
    y = 2 + 1.5 * t + rng.normal(size=n) * (1 + t)
    res = ols(np.column_stack([np.ones(n), t]), y)
    y1, y0 = y[t == 1], y[t == 0]
    n1, n0 = y1.size, y0.size
    neyman = np.sqrt(n / (n - 2) * (y1.var() / n1 + y0.var() / n0))  # var() with ddof=0 is the HC0 building block
    assert res.coef[1] == pytest.approx(y1.mean() - y0.mean(), abs=1e-10)
    assert res.se[1] == pytest.approx(neyman, rel=1e-10)


def test_cr1s_with_singleton_clusters_equals_hc1_and_grows_with_cluster_shocks():
    rng = np.random.default_rng(2)
    n = 200
    X = np.column_stack([np.ones(n), rng.normal(size=n)])
    y = X @ [1.0, 2.0] + rng.normal(size=n)
    hc1 = ols(X, y)
    cr = ols(X, y, cluster=np.arange(n))
    np.testing.assert_allclose(cr.cov, hc1.cov, rtol=1e-10)
    assert cr.se_type == "CR1S" and cr.df == n - 1


def test_mean_with_se_is_sample_mean_and_sd_over_root_n():
    v = np.random.default_rng(3).normal(size=101)
    est, se, lo, hi, p = mean_with_se(v)
    assert est == pytest.approx(v.mean())
    assert se == pytest.approx(v.std(ddof=1) / np.sqrt(v.size), rel=1e-10)  # n/(n-1) * var_ddof0 / n
    assert lo < est < hi


def test_ols_rejects_bad_inputs():
    with pytest.raises(ValueError, match="more rows"):
        ols(np.ones((2, 3)), np.ones(2))
    with pytest.raises(ValueError, match="finite"):
        ols(np.array([[1.0], [np.nan], [1.0]]), np.ones(3))
    with pytest.raises(ValueError, match="binary"):
        gate(np.ones(10), np.arange(10), np.ones(10), "sparse")


def _draw(rng, n):
    active = rng.random(n) < 0.3
    neuron = np.where(active, rng.exponential(size=n), 0.0)
    x = rng.normal(size=n)
    t = (rng.random(n) < 0.5).astype(int)
    tau = 1.0 + 1.5 * active - 0.5 * (x > 0)
    y = x + 0.5 * neuron + t * tau + rng.normal(size=n) * (1 + 0.5 * active)
    return neuron, x, t, tau, y


def test_gate_point_estimates_are_group_difference_in_means():
    neuron, x, t, tau, y = _draw(np.random.default_rng(4), 800)
    rows = {r.group: r for r in gate(y, t, neuron, "sparse", feature="n1")}
    a = neuron > 0
    dm = lambda m: y[m & (t == 1)].mean() - y[m & (t == 0)].mean()
    assert rows["active"].estimate == pytest.approx(dm(a))
    assert rows["inactive"].estimate == pytest.approx(dm(~a))
    assert rows["active - inactive"].estimate == pytest.approx(dm(a) - dm(~a))
    assert rows["active"].n == a.sum() and rows["active"].n_treated == (a & (t == 1)).sum()


def test_gate_cis_cover_group_truth_monte_carlo():
    """95% CIs for the sparse (active/inactive, difference) and median-split GATEs: coverage must be in
    [0.90, 0.99] over 300 replications (binomial SD of the coverage ≈ 0.013)."""
    rng = np.random.default_rng(5)
    hits = {k: 0 for k in ("active", "inactive", "active - inactive", "> median", "> median - <= median")}
    reps = 300
    for _ in range(reps):
        neuron, x, t, tau, y = _draw(rng, 400)
        a = neuron > 0
        truth = {"active": tau[a].mean(), "inactive": tau[~a].mean()}
        truth["active - inactive"] = truth["active"] - truth["inactive"]
        hi_x = x > np.median(x)
        truth["> median"] = tau[hi_x].mean()
        truth["> median - <= median"] = tau[hi_x].mean() - tau[~hi_x].mean()
        rows = {r.group: r for r in gate(y, t, neuron, "sparse") + gate(y, t, x, "continuous")}
        for k in hits:
            hits[k] += rows[k].ci_low <= truth[k] <= rows[k].ci_high
    cover = {k: v / reps for k, v in hits.items()}
    assert all(0.90 <= c <= 0.99 for c in cover.values()), cover


def test_cluster_robust_gate_covers_where_hc1_undercovers():
    """Cluster-randomized design with cluster shocks: CR1S coverage stays near 95%, HC1 falls well below."""
    rng = np.random.default_rng(6)
    reps, g, m = 200, 40, 15
    cover = {"CR1S": 0, "HC1": 0}
    for _ in range(reps):
        cl = np.repeat(np.arange(g), m)
        t = np.repeat((rng.permutation(g) < g // 2).astype(int), m)
        z = np.repeat(rng.random(g) < 0.5, m) | (rng.random(g * m) < 0.2)
        shock = np.repeat(rng.normal(size=g), m) * 1.5
        tau = 1 + z
        y = shock + t * tau + rng.normal(size=g * m)
        truth = tau[z].mean() - tau[~z].mean()
        for key, c in (("CR1S", cl), ("HC1", None)):
            r = {x.group: x for x in gate(y, t, z.astype(float), "sparse", cluster=c)}["active - inactive"]
            cover[key] += r.ci_low <= truth <= r.ci_high
    assert cover["CR1S"] / reps >= 0.89, cover
    assert cover["HC1"] / reps <= 0.85, cover


def test_categorical_gates_and_contrasts():
    rng = np.random.default_rng(7)
    n = 3000
    level = rng.choice(["a", "b", "c"], size=n, p=[0.5, 0.3, 0.2])
    t = (rng.random(n) < 0.5).astype(int)
    effect = {"a": 0.0, "b": 1.0, "c": -1.0}
    y = rng.normal(size=n) + t * np.vectorize(effect.get)(level)
    rows = {r.group: r for r in gate(y, t, level, "categorical", feature="lvl")}
    assert set(rows) == {"level=a", "level=b", "level=c", "level=b - level=a", "level=c - level=a"}
    for lv, eff in effect.items():
        assert rows[f"level={lv}"].ci_low < eff < rows[f"level={lv}"].ci_high
    assert rows["level=c - level=a"].ci_high < 0 < rows["level=b - level=a"].ci_low


def test_group_without_both_arms_gives_nan_row_not_crash():
    y = np.arange(20.0)
    t = np.r_[np.zeros(10), np.ones(10)].astype(int)
    v = np.r_[np.zeros(15), np.ones(5)]  # all 5 active units are treated
    rows = {r.group: r for r in gate(y, t, v, "sparse")}
    assert np.isnan(rows["active"].estimate) and rows["active"].n == 5
    assert np.isfinite(rows["inactive"].estimate) and np.isnan(rows["active - inactive"].estimate)


def test_joint_interaction_covers_true_coefficients_monte_carlo():
    rng = np.random.default_rng(8)
    reps, n = 200, 600
    beta = {"n1": 1.5, "n2": -1.0, "x": 0.0}
    hits = {k: 0 for k in beta}
    for _ in range(reps):
        M = np.column_stack([rng.random(n) < 0.3, rng.random(n) < 0.5, rng.normal(size=n)]).astype(float)
        t = (rng.random(n) < 0.5).astype(int)
        y = M @ [0.5, 0.2, 1.0] + t * (1 + M @ list(beta.values())) + rng.normal(size=n)
        rows = {r.feature: r for r in joint_interaction(y, t, M, list(beta))}
        for k, b in beta.items():
            hits[k] += rows[k].ci_low <= b <= rows[k].ci_high
    assert all(0.90 <= h / reps <= 0.99 for h in hits.values()), hits


def test_gates_table_columns_kinds_and_joint_rows():
    neuron, x, t, tau, y = _draw(np.random.default_rng(9), 500)
    df = gates_table(y, t, {"n1": neuron, "x": x, "lvl": (x > 1).astype(int)}, {"n1": "sparse"})
    assert list(df["split"].unique()) == ["sparse", "continuous", "categorical", "joint"]
    assert (df.loc[df.split == "joint", "group"] == ["T at mean modifiers", "T x n1", "T x x", "T x lvl[level=1]"]).all()
    assert infer_split_kind(neuron, "neuron") == "sparse" and infer_split_kind(x, "covariate") == "continuous"
    with pytest.raises(ValueError, match="split kind"):
        split_groups(x, "quantile")
