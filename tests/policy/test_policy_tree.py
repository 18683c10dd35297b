"""Exact policy tree: equals brute-force enumeration on tiny data; recovers a planted rule from DR scores."""
import itertools

import numpy as np
import pytest

from tokens2policy.effects.learners import DRLearner, NuisanceParams
from tokens2policy.policy.tree import PolicyTree, candidate_thresholds


def all_trees(X, depth, min_leaf, rows):
    """Every tree (as a function row -> action) reachable with splits on the distinct values of each feature,
    written as plain recursion over explicit structures; yields (description, predict) pairs."""
    leaves = [("leaf", a) for a in (0, 1)]
    if depth == 0 or len(rows) < 2 * min_leaf:
        return leaves
    trees = list(leaves)
    for j in range(X.shape[1]):
        for c in np.unique(X[:, j])[:-1]:
            left = [i for i in rows if X[i, j] <= c]
            right = [i for i in rows if X[i, j] > c]
            if len(left) < min_leaf or len(right) < min_leaf:
                continue
            for lt in all_trees(X, depth - 1, min_leaf, left):
                for rt in all_trees(X, depth - 1, min_leaf, right):
                    trees.append(("split", j, c, lt, rt))
    return trees


def act(tree, x):
    while tree[0] == "split":
        tree = tree[3] if x[tree[1]] <= tree[2] else tree[4]
    return tree[1]


@pytest.mark.parametrize("depth,n,p,levels,min_leaf,seed", [
    (1, 30, 3, 6, 1, 0), (2, 20, 2, 4, 1, 1), (2, 24, 3, 3, 3, 2), (2, 16, 2, 5, 2, 3), (3, 12, 2, 3, 1, 4),
])
def test_exact_tree_equals_brute_force(depth, n, p, levels, min_leaf, seed):
    rng = np.random.default_rng(seed)
    X = rng.integers(0, levels, size=(n, p)).astype(float)
    R = rng.normal(size=(n, 2))
    tree = PolicyTree(depth=depth, min_leaf_size=min_leaf, max_candidates=None).fit(X, R)
    best = max(sum(R[i, act(t, X[i])] for i in range(n)) for t in all_trees(X, depth, min_leaf, list(range(n))))
    assert tree.reward_ == pytest.approx(best, abs=1e-9)
    assert R[np.arange(n), tree.predict(X)].sum() == pytest.approx(tree.reward_, abs=1e-9)
    sizes = np.bincount(tree.apply(X))
    assert sizes.min() >= min_leaf


def test_candidates_are_distinct_values_or_quantiles():
    x = np.r_[np.zeros(50), np.arange(1, 101)]
    assert candidate_thresholds(np.array([0.0, 0.0, 2.0, 1.0])).tolist() == [0.0, 1.0]
    c = candidate_thresholds(x, max_candidates=4)
    assert len(c) <= 4 and c.max() < 100 and set(c) <= set(x)
    assert candidate_thresholds(np.ones(5)).size == 0


def planted(n, seed):
    """Five sparse neurons; τ = +2 when n1 active and n3 inactive, else −1 (optimal rule: treat iff that)."""
    rng = np.random.default_rng(seed)
    active = rng.random((n, 5)) < [0.4, 0.3, 0.5, 0.3, 0.2]
    X = np.where(active, rng.exponential(size=(n, 5)), 0.0)
    cov = rng.normal(size=(n, 2))
    target = active[:, 0] & ~active[:, 2]
    tau = np.where(target, 2.0, -1.0)
    t = (rng.random(n) < 0.5).astype(int)
    y = cov[:, 0] + 0.5 * active[:, 1] + t * tau + rng.normal(size=n)
    return X, cov, t, y, target, rng.permutation(np.arange(n) % 5)


def test_tree_on_dr_scores_recovers_planted_rule():
    X, cov, t, y, target, folds = planted(3000, 0)
    Xind = (X > 0).astype(float)
    m = DRLearner(NuisanceParams("ridge")).fit(np.column_stack([Xind, cov]), t, y, folds, Z=Xind)
    names = [f"neuron_{j}" for j in range(5)]
    tree = PolicyTree(depth=2).fit(Xind, m.scores_, feature_names=names, feature_kinds=["sparse"] * 5)
    assert (tree.predict(Xind) == target).mean() == 1.0
    treat_rules = [leaf["conditions"] for leaf in tree.leaves() if leaf["action"] == 1]
    assert treat_rules == ["neuron_0 active AND neuron_2 inactive"] or \
        treat_rules == ["neuron_2 inactive AND neuron_0 active"], tree.leaves()


def test_tree_with_continuous_values_recovers_rule_within_candidate_resolution():
    X, cov, t, y, target, folds = planted(3000, 1)
    m = DRLearner(NuisanceParams("ridge")).fit(np.column_stack([X, cov]), t, y, folds, Z=(X > 0).astype(float))
    tree = PolicyTree(depth=2, max_candidates=16, min_leaf_size=20).fit(X, m.scores_)
    assert (tree.predict(X) == target).mean() > 0.97


def test_depth3_runs_fast_enough_on_binary_features_and_rule_strings():
    rng = np.random.default_rng(3)
    X = (rng.random((2000, 8)) < 0.5).astype(float)
    R = np.column_stack([np.zeros(2000), rng.normal(size=2000) + X[:, 0] - X[:, 1] * X[:, 2]])
    tree = PolicyTree(depth=3).fit(X, R, feature_kinds=["sparse"] * 8)
    leaves = tree.leaves()
    assert 2 <= len(leaves) <= 8
    assert all(r["rule"].startswith("IF ") and (" THEN treat" in r["rule"] or " THEN control" in r["rule"]) for r in leaves)
    assert sum(r["n"] for r in leaves) == 2000


def test_tree_validation():
    with pytest.raises(ValueError, match="depth"):
        PolicyTree(depth=4)
    with pytest.raises(ValueError, match="same n"):
        PolicyTree().fit(np.zeros((3, 1)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="not fitted"):
        PolicyTree().predict(np.zeros((3, 1)))


def test_splits_with_the_same_action_on_both_sides_are_merged():
    X = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    R = np.column_stack([np.zeros(4), [1.0, 2.0, -1.0, -2.0]])
    tree = PolicyTree(depth=2).fit(X, R)  # the children's x1 splits recommend one action on both sides
    assert [leaf["rule"] for leaf in tree.leaves()] == ["IF x0 <= 0 THEN treat", "IF x0 > 0 THEN control"]
    assert [leaf["n"] for leaf in tree.leaves()] == [2, 2]
    assert tree.reward_ == pytest.approx(3.0)
