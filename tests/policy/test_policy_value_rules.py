"""AIPW policy value CIs cover the oracle value; comparisons and simple rules behave as defined."""
import numpy as np
import pytest

from tokens2policy.effects.learners import NuisanceParams, aipw_scores, cross_fit_nuisances
from tokens2policy.policy.rules import (
    budget_assign, budget_cutoff, budget_policy, budget_rule_text, threshold_policy, tie_draws,
)
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


def test_budget_rule_fills_the_budget_through_ties_deterministically_per_unit():
    """Ties at the cutoff (issue 13 finding 5): cutoff and tie share fill the budget exactly in expectation, and a
    unit's decision depends on its id only (batch, order and rerun invariant)."""
    cate = np.r_[np.full(100, 2.0), np.full(900, 0.5)]  # 10 % "active"
    ids = np.array([f"unit-{i}" for i in range(1000)])
    cutoff, share = budget_cutoff(cate, 0.3)
    assert cutoff == 0.5 and share == pytest.approx(200 / 900)
    treat = budget_assign(cate, cutoff, share, ids, seed=3)
    assert treat[:100].all()
    k = treat[100:].sum()  # Binomial(900, 2/9) draws
    assert abs(k - 200) <= 4 * np.sqrt(900 * share * (1 - share))
    perm = np.random.default_rng(0).permutation(1000)
    np.testing.assert_array_equal(budget_assign(cate[perm], cutoff, share, ids[perm], seed=3), treat[perm])
    np.testing.assert_array_equal(budget_assign(cate[:10], cutoff, share, ids[:10], seed=3), treat[:10])
    np.testing.assert_array_equal(treat[100:], (tie_draws(ids[100:], 3) < share).astype(int))
    assert not np.array_equal(budget_assign(cate, cutoff, share, ids, seed=4), treat)
    # last-bit differences of a recomputed CATE take the same branch
    np.testing.assert_array_equal(budget_assign(cate * (1 + 1e-13), cutoff, share, ids, seed=3), treat)
    # no ties: the exact top-k, tie share 1
    c2, s2 = budget_cutoff(np.arange(10.0), 0.3)
    assert (c2, s2) == (7.0, 1.0)
    np.testing.assert_array_equal(budget_assign(np.arange(10.0), c2, s2, ids[:10]), [0] * 7 + [1] * 3)
    assert budget_cutoff(cate, 0.0)[0] == np.inf and budget_assign(cate, np.inf, 0.0, ids).sum() == 0
    assert "probability 0.2222" in budget_rule_text(cutoff, share, 0.3)
    np.testing.assert_array_equal(budget_policy(cate, 0.3, unit_ids=ids, seed=3), treat)


def test_tie_draw_cache_gives_the_hashed_draws_on_overlapping_subsets():
    """The policy stage's TieDrawCache (each unit hashed once) gives budget_assign the draws hashing gives."""
    from tokens2policy.policy.rules import TieDrawCache

    rng = np.random.default_rng(4)
    cate = rng.choice([0.1, 0.5, 2.0], size=600)
    ids = np.array([f"u{i:04d}" for i in range(600)])
    cache = TieDrawCache(ids, seed=7)
    for rows in (rng.random(600) < 0.4, None, rng.permutation(600)[:250], rng.random(600) < 0.7):
        sel = slice(None) if rows is None else rows
        c, s = budget_cutoff(cate[sel], 0.3)
        np.testing.assert_array_equal(budget_assign(cate[sel], c, s, ids[sel], seed=7, draws=cache.on(rows)),
                                      budget_assign(cate[sel], c, s, ids[sel], seed=7))
    hashed = ~np.isnan(cache._draw)
    np.testing.assert_array_equal(cache._draw[hashed], tie_draws(ids[hashed], 7))
