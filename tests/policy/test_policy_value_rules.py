"""AIPW policy value CIs cover the oracle value; comparisons and simple rules behave as defined."""
import numpy as np
import pytest

from tokens2policy.effects.learners import NuisanceParams, aipw_scores, cross_fit_nuisances
from tokens2policy.policy.rules import budget_policy, threshold_policy
from tokens2policy.policy.value import compare_policies, policy_value, value_summands


def draw(n, rng):
    x = rng.normal(size=(n, 2))
    mu0 = 1 + x[:, 0]
    tau = 0.5 + x[:, 1]
    t = (rng.random(n) < 0.5).astype(int)
    y = mu0 + t * tau + rng.normal(size=n)
    return x, t, y


def test_policy_value_ci_covers_oracle_value_monte_carlo():
    """π(x) = 1{x₂ > 0}, cost 0.2: V = E[μ₀] + E[(τ − c)·π] = 1 + E[(0.3 + x₂)·1{x₂>0}] = 1 + 0.15 + φ(0)."""
    truth = 1 + 0.3 * 0.5 + 1 / np.sqrt(2 * np.pi)
    rng = np.random.default_rng(0)
    reps, hits = 150, 0
    for _ in range(reps):
        x, t, y = draw(800, rng)
        folds = np.arange(800) % 2
        nu = cross_fit_nuisances(x, t, y, folds, NuisanceParams("ridge"))
        scores = aipw_scores(t, y, nu["mu0"], nu["mu1"], nu["e"])
        v = policy_value(scores, (x[:, 1] > 0).astype(int), cost=0.2)
        hits += v["ci_low"] <= truth <= v["ci_high"]
    assert 0.90 <= hits / reps <= 0.99, hits


def test_compare_policies_differences_are_paired_and_consistent():
    rng = np.random.default_rng(1)
    x, t, y = draw(1000, rng)
    scores = aipw_scores(t, y, 1 + x[:, 0], 1.5 + x[:, 0] + x[:, 1], np.full(1000, 0.5))
    pi = (x[:, 1] > 0).astype(int)
    df = compare_policies(scores, {"rule": pi}, cost=0.1).set_index(["policy", "comparison"])
    v = lambda name: df.loc[(name, "value"), "estimate"]
    assert df.loc[("rule", "minus treat_all"), "estimate"] == pytest.approx(v("rule") - v("treat_all"))
    assert df.loc[("rule", "minus treat_none"), "estimate"] == pytest.approx(v("rule") - v("treat_none"))
    share = pi.mean()
    random_value = share * v("treat_all") + (1 - share) * v("treat_none")
    assert df.loc[("rule", "minus random_same_budget"), "estimate"] == pytest.approx(v("rule") - random_value)
    # pairing: the difference's SE is smaller than the SE of either value
    assert df.loc[("rule", "minus random_same_budget"), "se"] < df.loc[("rule", "value"), "se"]
    assert df.loc[("rule", "minus random_same_budget"), "ci_low"] > 0  # targeting on the true modifier helps


def test_value_summands_and_validation():
    scores = np.array([[0.0, 1.0], [2.0, 1.0]])
    np.testing.assert_allclose(value_summands(scores, [1, 0], cost=0.5), [0.5, 2.0])
    with pytest.raises(ValueError, match="probabilities"):
        value_summands(scores, [2, 0])
    with pytest.raises(ValueError, match=r"\(n, 2\)"):
        value_summands(np.zeros(3), [0, 0, 0])


def test_threshold_and_budget_rules():
    cate = np.array([0.5, -1.0, 2.0, 0.1, 0.3])
    np.testing.assert_array_equal(threshold_policy(cate, cost=0.2), [1, 0, 1, 0, 1])
    np.testing.assert_array_equal(budget_policy(cate, 0.4), [1, 0, 1, 0, 0])
    np.testing.assert_array_equal(budget_policy(cate, 0.8, cost=0.2), [1, 0, 1, 0, 1])
    assert budget_policy(np.zeros(10), 0.25).sum() == 3  # ceil(2.5)
    with pytest.raises(ValueError, match="budget"):
        budget_policy(cate, 1.5)
