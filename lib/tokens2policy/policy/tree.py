"""Exact policy tree of depth ≤ 3 on doubly-robust rewards (Athey & Wager 2021; Sverdrup et al. 2020, policytree).

Given a reward matrix Γ (n × A; for treatment choice Γᵢ = [Γᵢ(0), Γᵢ(1) − cost] from the AIPW scores), the tree
maximises Σᵢ Γᵢ(π(Xᵢ)) over ALL trees of the given depth whose splits are ``x_j <= c`` with c among each feature's
candidate thresholds. Athey & Wager show the regret of this empirical-welfare maximiser over a class of finite VC
dimension is O(√(VC/n)), which is why an exhaustive search over a small, interpretable class is preferred to a
greedy one.

Candidates: every distinct value but the largest when a feature has at most ``max_candidates + 1`` of them (binary
SAE-neuron indicators: one split), otherwise ``max_candidates`` quantiles (as policytree's ``split.step`` coarsens the
search). Each feature is binned once so a node's per-split reward sums come from one ``bincount`` + ``cumsum``;
depth-1 subtrees are solved for all features and thresholds at once, deeper levels recurse over every valid split,
pruned only by the exact bound Σᵢ maxₐ Γᵢₐ (which never drops an optimal tree). Ties go to the first split in
(feature, threshold) order and to the lower action index (control). Finally, splits whose two sides recommend the
same action are merged (same policy, shorter rules).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np


@dataclass
class Leaf:
    action: int
    n: int
    reward: float


@dataclass
class Split:
    feature: int
    threshold: float  # left branch: x[feature] <= threshold
    left: "Node"
    right: "Node"


Node = Union[Leaf, Split]


def _merge_same_action(node: Node) -> Node:
    """Collapse splits whose two sides recommend the same action (the policy is unchanged; the rules get shorter)."""
    if isinstance(node, Leaf):
        return node
    left, right = _merge_same_action(node.left), _merge_same_action(node.right)
    if isinstance(left, Leaf) and isinstance(right, Leaf) and left.action == right.action:
        return Leaf(left.action, left.n + right.n, left.reward + right.reward)
    return Split(node.feature, node.threshold, left, right)


def candidate_thresholds(x: np.ndarray, max_candidates: Optional[int] = 32, sparse: bool = False) -> np.ndarray:
    """Split values c (left: x <= c) of one feature; all distinct values but the largest, or quantiles of x.
    ``sparse``: always offer c = 0 (inactive vs active) when the feature has zeros."""
    u = np.unique(x)
    if u.size <= 1:
        return u[:0]
    if max_candidates is None or u.size - 1 <= max_candidates:
        return u[:-1]
    qs = np.quantile(x, np.arange(1, max_candidates + 1) / (max_candidates + 1), method="lower")
    if sparse and u[0] == 0:
        qs = np.r_[0.0, qs]
    return np.unique(qs[qs < u[-1]])


class PolicyTree:
    """Exhaustive depth-``depth`` policy tree over rewards. ``fit(X, rewards)`` → ``predict(X)`` → action indices.

    feature_kinds (for rule text only): ``sparse`` (x <= 0 reads "inactive"), ``indicator`` (0/1: "NOT name"),
    anything else prints the threshold.

    min_leaf_size: a split is valid only if both children keep at least this many training units.
    max_candidates: per-feature cap on candidate thresholds (None: all distinct values).
    """

    def __init__(self, depth: int = 2, min_leaf_size: int = 1, max_candidates: Optional[int] = 32,
                 action_names: Sequence[str] = ("control", "treat")):
        if depth not in (0, 1, 2, 3):
            raise ValueError(f"depth must be 0, 1, 2 or 3, got {depth}")
        if min_leaf_size < 1:
            raise ValueError(f"min_leaf_size must be >= 1, got {min_leaf_size}")
        if max_candidates is not None and max_candidates < 1:
            raise ValueError(f"max_candidates must be >= 1 or None, got {max_candidates}")
        self.depth = depth
        self.min_leaf_size = min_leaf_size
        self.max_candidates = max_candidates
        self.action_names = tuple(action_names)

    # ---------------------------------------------------------------- fit
    def fit(self, X, rewards, feature_names: Optional[Sequence[str]] = None,
            feature_kinds: Optional[Sequence[str]] = None) -> "PolicyTree":
        X = np.asarray(X, dtype=float)
        R = np.asarray(rewards, dtype=float)
        if X.ndim != 2 or R.ndim != 2 or X.shape[0] != R.shape[0]:
            raise ValueError(f"X must be (n, p) and rewards (n, A) with the same n; got {X.shape} and {R.shape}")
        if R.shape[1] != len(self.action_names):
            raise ValueError(f"rewards have {R.shape[1]} actions but action_names has {len(self.action_names)}")
        if not (np.isfinite(X).all() and np.isfinite(R).all()):
            raise ValueError("X and rewards must be finite")
        n, p = X.shape
        self.feature_names_ = list(feature_names) if feature_names is not None else [f"x{j}" for j in range(p)]
        self.feature_kinds_ = list(feature_kinds) if feature_kinds is not None else ["continuous"] * p
        if len(self.feature_names_) != p or len(self.feature_kinds_) != p:
            raise ValueError("feature_names and feature_kinds must have one entry per column of X")
        self.thresholds_ = [candidate_thresholds(X[:, j], self.max_candidates, self.feature_kinds_[j] == "sparse")
                            for j in range(p)]
        nbins = np.array([t.size + 1 for t in self.thresholds_])
        self._offsets = np.r_[0, np.cumsum(nbins)[:-1]]
        self._total_bins = int(nbins.sum())
        self._bins = np.column_stack(
            [np.searchsorted(self.thresholds_[j], X[:, j], side="left") for j in range(p)]
        ) if p else np.zeros((n, 0), dtype=int)
        # every (feature, threshold index) pair, as a position in the concatenated bin axis
        self._split_feat = np.concatenate([np.full(nb - 1, j) for j, nb in enumerate(nbins)]).astype(int) if p else np.zeros(0, int)
        self._split_idx = np.concatenate([np.arange(nb - 1) for nb in nbins]).astype(int) if p else np.zeros(0, int)
        self._split_pos = self._offsets[self._split_feat] + self._split_idx
        self._R = R
        self._row_max = R.max(axis=1)
        reward, tree = self._best(np.ones(n, dtype=bool), self.depth)
        self.tree_ = _merge_same_action(tree)
        self.reward_ = float(reward)
        self.n_features_in_ = p
        return self

    def _leaf(self, mask) -> Tuple[float, Leaf]:
        sums = self._R[mask].sum(axis=0)
        a = int(np.argmax(sums))
        return float(sums[a]), Leaf(a, int(mask.sum()), float(sums[a]))

    def _split_stats(self, mask):
        rows = np.flatnonzero(mask)
        p = self._bins.shape[1]
        flat = (self._bins[rows] + self._offsets).ravel()
        counts = np.bincount(flat, minlength=self._total_bins).astype(float)
        sums = np.column_stack([
            np.bincount(flat, weights=np.repeat(self._R[rows, a], p), minlength=self._total_bins)
            for a in range(self._R.shape[1])
        ])
        cum_c, cum_s = np.cumsum(counts), np.cumsum(sums, axis=0)
        base_c = np.r_[0.0, cum_c][self._offsets][self._split_feat]
        base_s = np.vstack([np.zeros((1, sums.shape[1])), cum_s])[self._offsets][self._split_feat]
        left_c = cum_c[self._split_pos] - base_c
        left_s = cum_s[self._split_pos] - base_s
        total_s = self._R[rows].sum(axis=0)
        return left_c, rows.size - left_c, left_s, total_s - left_s

    def _best(self, mask, depth) -> Tuple[float, Node]:
        m = int(mask.sum())
        if depth == 0 or m < 2 * self.min_leaf_size or self._split_pos.size == 0:
            return self._leaf(mask)
        left_c, right_c, left_s, right_s = self._split_stats(mask)
        valid = (left_c >= self.min_leaf_size) & (right_c >= self.min_leaf_size)
        if not valid.any():
            return self._leaf(mask)
        if depth == 1:
            val = np.where(valid, left_s.max(axis=1) + right_s.max(axis=1), -np.inf)
            s = int(np.argmax(val))
            j, thr = self._split(s)
            la, ra = int(np.argmax(left_s[s])), int(np.argmax(right_s[s]))
            return float(val[s]), Split(j, thr, Leaf(la, int(left_c[s]), float(left_s[s, la])),
                                        Leaf(ra, int(right_c[s]), float(right_s[s, ra])))
        best_val, best_node = -np.inf, None
        for s in np.flatnonzero(valid):
            j = self._split_feat[s]
            go_left = self._bins[:, j] <= self._split_idx[s]
            lmask, rmask = mask & go_left, mask & ~go_left
            bound = self._row_max[mask].sum()
            if bound <= best_val:  # nothing under this node can beat the incumbent
                break
            lval, lnode = self._best(lmask, depth - 1)
            if lval + self._row_max[rmask].sum() <= best_val:
                continue
            rval, rnode = self._best(rmask, depth - 1)
            if lval + rval > best_val:
                jj, thr = self._split(s)
                best_val, best_node = lval + rval, Split(jj, thr, lnode, rnode)
        return float(best_val), best_node

    def _split(self, s) -> Tuple[int, float]:
        j = int(self._split_feat[s])
        return j, float(self.thresholds_[j][self._split_idx[s]])

    # ---------------------------------------------------------------- use
    def _check_X(self, X) -> np.ndarray:
        if not hasattr(self, "tree_"):
            raise ValueError("PolicyTree is not fitted; call fit() first")
        X = np.asarray(X, dtype=float)
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise ValueError(f"X must be (n, {self.n_features_in_}), got {X.shape}")
        return X

    def apply(self, X) -> np.ndarray:
        """Leaf id (depth-first, left to right, as in :meth:`leaves`) of each row."""
        X = self._check_X(X)
        out = np.empty(X.shape[0], dtype=int)
        counter = [0]

        def walk(node, idx):
            if isinstance(node, Leaf):
                out[idx] = counter[0]
                counter[0] += 1
                return
            left = X[idx, node.feature] <= node.threshold
            walk(node.left, idx[left])
            walk(node.right, idx[~left])

        walk(self.tree_, np.arange(X.shape[0]))
        return out

    def predict(self, X) -> np.ndarray:
        """Recommended action index per row."""
        leaf_ids = self.apply(X)
        return np.array([leaf.action for leaf, _ in self._leaf_paths()])[leaf_ids]

    def _leaf_paths(self) -> List[Tuple[Leaf, List[Tuple[int, str, float]]]]:
        out = []

        def walk(node, path):
            if isinstance(node, Leaf):
                out.append((node, path))
                return
            walk(node.left, path + [(node.feature, "<=", node.threshold)])
            walk(node.right, path + [(node.feature, ">", node.threshold)])

        walk(self.tree_, [])
        return out

    def _condition(self, j, lo, hi) -> str:
        name, kind = self.feature_names_[j], self.feature_kinds_[j]
        if kind == "sparse" and lo is None and hi == 0:
            return f"{name} inactive"
        if kind == "sparse" and lo == 0 and hi is None:
            return f"{name} active"
        if kind == "indicator" and lo is None and hi == 0:
            return f"NOT {name}"
        if kind == "indicator" and lo == 0 and hi is None:
            return name
        if lo is not None and hi is not None:
            return f"{lo:.4g} < {name} <= {hi:.4g}"
        return f"{name} <= {hi:.4g}" if hi is not None else f"{name} > {lo:.4g}"

    def leaves(self) -> List[dict]:
        """One dict per leaf: ``leaf_id``, human-readable ``rule`` (``IF … THEN action``), ``conditions``,
        ``action``, ``action_name``, training ``n`` and summed ``reward``."""
        if not hasattr(self, "tree_"):
            raise ValueError("PolicyTree is not fitted; call fit() first")
        rows = []
        for leaf_id, (leaf, path) in enumerate(self._leaf_paths()):
            bounds = {}
            for j, op, thr in path:
                lo, hi = bounds.get(j, (None, None))
                if op == ">":
                    lo = thr if lo is None else max(lo, thr)
                else:
                    hi = thr if hi is None else min(hi, thr)
                bounds[j] = (lo, hi)
            conds = [self._condition(j, lo, hi) for j, (lo, hi) in bounds.items()]
            cond = " AND ".join(conds) if conds else "all units"
            name = self.action_names[leaf.action]
            rows.append(dict(leaf_id=leaf_id, rule=f"IF {cond} THEN {name}", conditions=cond, action=leaf.action,
                             action_name=name, n=leaf.n, reward=leaf.reward))
        return rows
