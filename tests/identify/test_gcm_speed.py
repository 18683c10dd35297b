"""The GCM sums from the sparse basis blocks (``Block.basis_blocks``, issue 16: the demo's identify speed) equal a
straightforward dense implementation written here: the basis P built densely with ``basis_matrix``, every per-fold
Gram and cross-moment formed with numpy over all rows. Same numbers up to the order of floating-point sums; the
whole GCM search (selected set, trace, p-values) is unchanged when the Block's GCM methods are replaced by the
dense reference."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from tokens2policy.identify import engine
from tokens2policy.identify.engine import _prepare, nexis
from tokens2policy.identify.stats import Block, basis_matrix

K = 5


# ------------------------------------------------------------------ the dense reference (all rows, numpy)
def dense_basis(block, S, spec):
    return basis_matrix(block.columns(S), spec)


def dense_fold_grams_both(block, S, n_folds, spec, e):
    P = dense_basis(block, S, spec)
    c = (block.t - e) / (e * (1.0 - e))
    q = P.shape[1]
    out = {k: np.zeros((n_folds, q, q)) for k in ("A", "Ac")}
    out.update({k: np.zeros((n_folds, q)) for k in ("b", "bc")})
    for k in range(n_folds):
        r = block.folds == k
        Pk, ck, yk = P[r], c[r], block.y[r]
        out["A"][k] = Pk.T @ Pk
        out["Ac"][k] = Pk.T @ (ck[:, None] * Pk)
        out["b"][k] = Pk.T @ yk
        out["bc"][k] = Pk.T @ (ck * yk)
    return out


def dense_gcm_residual(block, S, spec, coef_m, coef_g, e):
    P = dense_basis(block, S, spec)
    m_hat = np.einsum("ij,ij->i", P, coef_m[block.folds])
    phi = (block.y - m_hat) * (block.t - e) / (e * (1.0 - e))
    return phi - np.einsum("ij,ij->i", P, coef_g[block.folds])


def dense_gcm_sums(block, S, f, zspec=("linear",), n_folds=0, cols=None):
    F = np.column_stack([block.W, block.Z.toarray() if sp.issparse(block.Z) else block.Z])
    if cols is not None:
        F = F[:, cols]
    f2 = f * f
    out = {"Sf": F.T @ f, "Sf2x2": (F * F).T @ f2}
    if zspec[0] == "linear":
        C = np.column_stack([np.ones(block.n), block.columns(S)])
        out.update(Sf2xC=F.T @ (f2[:, None] * C), Cf=C.T @ f, Cf2C=C.T @ (f2[:, None] * C))
        return out
    B = dense_basis(block, S, zspec)
    q = B.shape[1]
    out.update(SB=np.zeros((F.shape[1], n_folds, q)), SfB=np.zeros((F.shape[1], n_folds, q)),
               A=np.zeros((n_folds, q, q)), Bf=np.zeros((n_folds, q)), Bf2B=np.zeros((n_folds, q, q)))
    for k in range(n_folds):
        r = block.folds == k
        Bk, Fk, fk = B[r], F[r], f[r]
        out["SB"][:, k] = Fk.T @ Bk
        out["SfB"][:, k] = Fk.T @ (fk[:, None] ** 2 * Bk)
        out["A"][k] = Bk.T @ Bk
        out["Bf"][k] = Bk.T @ fk
        out["Bf2B"][k] = Bk.T @ (fk[:, None] ** 2 * Bk)
    return out


# ------------------------------------------------------------------ SAE-like data
def sae_like(n=900, m=24, k=3, mw=2, seed=0):
    """Top-k non-negative codes (k of m active per row, ≈ k/m dense), two dense covariates (one with zeros, one
    with negative values: its spline knots lie below 0, so its basis is not 0 at 0), a neuron active on a single
    row, an explicit stored zero, and fold ids."""
    rng = np.random.default_rng(seed)
    Z = np.zeros((n, m))
    for i in range(n):
        Z[i, rng.choice(m - 1, k, replace=False)] = rng.exponential(1.0, k)
    Z[:, m - 1] = 0.0
    Z[17, m - 1] = 2.5                       # active on one row
    Zs = sp.csr_matrix(Z)
    i0 = Zs.indptr[5]                         # an explicit zero in row 5
    Zs.data[i0] = 0.0
    Z[5, Zs.indices[i0]] = 0.0
    W = np.column_stack([np.where(rng.random(n) < 0.3, 0.0, rng.gamma(2.0, 1.0, n)), rng.normal(size=n)])[:, :mw]
    t = (rng.random(n) < 0.5).astype(float)
    y = t * (Z[:, 1] - 0.7 * Z[:, 4]) + 0.3 * Z[:, 2] + rng.normal(size=n)
    return y, t, W, Zs, Z, rng.permutation(np.arange(n) % K)


def _tester(z, W, y, t, folds):
    src, _, _, _ = _prepare(y, t, z, W, None, folds, "gcm", "FWER", 0.05, 0.5, K, 20, "spline", 0)
    return engine.Tester(src, "gcm", 0, K, "spline", 0, with_nnz=True)


def _close(a, b, rtol=1e-10):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    scale = max(1.0, float(np.abs(b).max())) if b.size else 1.0
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * scale)


SETS = {0: [], 1: [3], 3: [2, 0, 7], 6: [1, 5, 0, 9, 25, 14]}  # global ids: 0, 1 are W; 25 the one-row neuron


@pytest.mark.parametrize("dense_z", [False, True])
@pytest.mark.parametrize("kind", ["spline", "poly2"])
@pytest.mark.parametrize("size", sorted(SETS))
def test_block_gcm_sums_equal_the_dense_reference(kind, size, dense_z):
    y, t, W, Zs, Z, folds = sae_like()
    tester = _tester(Z if dense_z else Zs, W, y, t, folds)
    S = SETS[size]
    tester.ensure(S)
    spec = tester.basis_spec(S, kind)
    block = tester.src.blocks[0]
    got = block.fold_grams_both(S, K, spec, tester.e)
    want = dense_fold_grams_both(block, S, K, spec, tester.e)
    for key in want:
        _close(got[key], want[key])
    rng = np.random.default_rng(size)
    q = want["A"].shape[1]
    cm, cg = rng.normal(size=(K, q)), rng.normal(size=(K, q))
    f = block.gcm_residual(S, spec, cm, cg, tester.e)
    _close(f, dense_gcm_residual(block, S, spec, cm, cg, tester.e))
    for cols in (None, np.array([4]), np.array([1, 6, 25])):
        for zspec in (spec, ("linear",)):
            got = block.gcm_sums(S, f, zspec, K, cols)
            want = dense_gcm_sums(block, S, f, zspec, K, cols)
            assert set(got) == set(want)
            for key in want:
                _close(got[key], want[key])


def test_spline_blocks_are_zero_off_their_rows_and_reproduce_the_dense_basis():
    """The blocks put back together give ``basis_matrix`` exactly, a sparse neuron's block keeps its non-zero rows
    only, a covariate with knots below 0 keeps all rows."""
    y, t, W, Zs, Z, folds = sae_like()
    tester = _tester(Zs, W, y, t, folds)
    S = [1, 5, 25, 0]
    tester.ensure(S)
    spec = tester.basis_spec(S, "spline")
    block = tester.src.blocks[0]
    P = block.basis_blocks(S, spec, K)
    dense = basis_matrix(block.columns(S), spec)
    np.testing.assert_array_equal(P.dense(len(y)), dense)
    sizes = [len(part.rows) for part in P.parts]
    assert sizes[0] == len(y)                                   # W column 1 (normal): knots below 0
    assert sizes[1] == np.count_nonzero(Z[:, 3]) < len(y) / 4   # a neuron: its non-zero rows
    assert sizes[2] == 1                                       # the one-row neuron
    assert sizes[3] == np.count_nonzero(W[:, 0])               # W column 0: zeros, positive values


@pytest.fixture
def dense_reference(monkeypatch):
    def use():
        monkeypatch.setattr(Block, "fold_grams_both", dense_fold_grams_both)
        monkeypatch.setattr(Block, "gcm_residual", dense_gcm_residual)
        monkeypatch.setattr(Block, "gcm_sums", dense_gcm_sums)
    return use


@pytest.mark.parametrize("nuisance", ["spline", "poly2"])
def test_gcm_search_equals_the_dense_reference(dense_reference, nuisance):
    """The whole stepwise GCM search (forward steps, Gate-2 probes, the backward checks' batched given-rest tests,
    the final p-values) makes the same decisions with the same statistics as with the dense reference sums."""
    y, t, W, Zs, Z, folds = sae_like(n=1500, m=30, k=3, seed=3)
    y = y + t * (0.8 * Z[:, 7] + 0.6 * Z[:, 11] - 0.5 * Z[:, 20])
    kw = dict(w=W, test="gcm", nuisance=nuisance, z_nuisance=nuisance, folds=folds, min_active=1)
    new = nexis(y, t, Zs, **kw)
    dense_reference()
    ref = nexis(y, t, Zs, **kw)
    assert len(new.selected) >= 3
    assert [(r["action"], r["feature"]) for r in new.trace] == [(r["action"], r["feature"]) for r in ref.trace]
    assert new.selected.tolist() == ref.selected.tolist() and new.selected_w.tolist() == ref.selected_w.tolist()
    np.testing.assert_allclose(new.pvalues, ref.pvalues, rtol=1e-9)
    np.testing.assert_allclose(new.tstats, ref.tstats, rtol=1e-9)
    for a, b in zip(new.trace, ref.trace):
        for key in ("t", "p"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-300), (a, b)
