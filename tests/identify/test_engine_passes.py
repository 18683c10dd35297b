"""The streaming kernels of the in-memory engine (issue 16, "the engine at the memory-bandwidth limit") against
straightforward numpy on the same data: sparse cross-products from the rows of the feature alone, the sparse
moments' chunked squares / counts / explicit-zero handling, the dense row pass's non-zero counts capped at
``min_active``, and the closed-form 2 x 2 inverse. Speed is measured in benchmarks/bench_identify.py
(docs/benchmarks.md), not here.
"""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from tokens2policy.identify import nexis
from tokens2policy.identify import stats
from tokens2policy.identify.engine import _inv2, _prepare
from tokens2policy.identify.stats import Block, dense_row_pass


def sparse_codes(n, m, density, seed):
    rng = np.random.default_rng(seed)
    Z = np.where(rng.random((n, m)) < density, rng.exponential(1.0, (n, m)), 0.0)
    return Z, rng


def test_sparse_cross_products_read_only_the_features_rows():
    """F'x_s, F'(t x_s) of a sparse feature from its own rows (a few % of n) equal the full products, with W
    columns in front; several features at once; a W feature (dense: all rows) takes the full pass."""
    Z, rng = sparse_codes(3000, 40, 0.03, 1)
    W = rng.normal(size=(3000, 2))
    y, t = rng.normal(size=3000), (rng.random(3000) < 0.5).astype(float)
    b = Block(y, t, W, sp.csr_matrix(Z))
    F = np.hstack([W, Z])
    for S in ([5], [2, 17, 30], [0, 9], [1]):
        X = F[:, S]
        V = np.empty((3000, 2 * len(S)))
        V[:, 0::2], V[:, 1::2] = X, t[:, None] * X
        np.testing.assert_allclose(b.cross(S), F.T @ V, rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(b.columns(S), X)
    assert b._zc is None  # no column form was built for it


def test_dense_cross_products_on_a_sparse_column_use_its_rows():
    Z, rng = sparse_codes(2000, 30, 0.02, 2)
    Z[:, 3] = rng.normal(size=2000)  # one dense column: the full pass
    t = (rng.random(2000) < 0.5).astype(float)
    b = Block(rng.normal(size=2000), t, None, Z)
    for S in ([7], [3], [7, 12]):
        X = Z[:, S]
        V = np.empty((2000, 2 * len(S)))
        V[:, 0::2], V[:, 1::2] = X, t[:, None] * X
        np.testing.assert_allclose(b.cross(S), Z.T @ V, rtol=1e-12, atol=1e-12)


def test_sparse_moments_with_explicit_zeros_and_duplicates_equal_plain_numpy():
    """Stored zeros are not non-zeros (counts, ranges); duplicates are summed; the caller's matrix is unchanged;
    chunks much smaller than the matrix (SPARSE_CHUNK) give the same sums as one chunk."""
    Z, rng = sparse_codes(1200, 25, 0.2, 3)
    Z[:, 4] = 0.0
    y, t = rng.normal(size=1200), (rng.random(1200) < 0.5).astype(float)
    r, c = np.nonzero(Z)
    v = Z[r, c]
    k7 = np.flatnonzero(c == 7)[0]
    z2 = np.flatnonzero(Z[:, 2] == 0.0)[0]
    # raw CSR arrays: explicit zeros in columns 2 and 4 (4 has no non-zero), column 7's first entry split in two
    rows = np.r_[r, z2, 0, r[k7]]
    cols = np.r_[c, 2, 4, 7]
    vals = np.r_[v, 0.0, 0.0, 0.75 * v[k7]]
    vals[k7] = 0.25 * v[k7]
    order = np.lexsort((cols, rows))
    indptr = np.r_[0, np.cumsum(np.bincount(rows, minlength=Z.shape[0]))]
    Zd = sp.csr_matrix((vals[order], cols[order].astype(np.int32), indptr), shape=Z.shape)
    assert not Zd.has_canonical_format and (Zd.data == 0).sum() == 2
    before = Zd.data.copy()
    V4 = np.column_stack([np.ones(1200), t, y, t * y])
    ref_nnz = np.count_nonzero(Z, axis=0)
    masked = np.ma.masked_equal(Z, 0.0)
    for chunk in (7, 1 << 20):
        old, stats.SPARSE_CHUNK = stats.SPARSE_CHUNK, chunk
        try:
            mom = Block(y, t, None, Zd).moments(with_nnz=True, with_range=True)
        finally:
            stats.SPARSE_CHUNK = old
        np.testing.assert_allclose(mom["lin"], Z.T @ V4, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(mom["sq"], (Z * Z).T @ V4[:, :2], rtol=1e-12, atol=1e-12)
        assert mom["nnz"].tolist() == ref_nnz.tolist()
        keep = ref_nnz > 0
        assert mom["min_nz"][keep].tolist() == masked.min(0).data[keep].tolist()
        assert mom["max_nz"][keep].tolist() == masked.max(0).data[keep].tolist()
        assert mom["min_nz"][4] == np.inf and mom["max_nz"][4] == -np.inf
    np.testing.assert_array_equal(Zd.data, before)


def test_capped_counts_tell_the_rare_columns_exactly_over_any_partition():
    """with_nnz=k: exact below k, >= k otherwise, for each block and for their sum; the rare columns (fewer than
    min_active non-zeros) found by nexis on dense Z are those of exact counting (sparse input)."""
    rng = np.random.default_rng(5)
    n, m = 3000, 60
    Z = rng.normal(size=(n, m))
    for j, k in ((3, 0), (4, 5), (5, 19), (6, 20), (7, 21), (8, 400)):
        Z[:, j] = 0.0
        Z[rng.choice(n, k, replace=False), j] = rng.normal(size=k)
    exact = np.count_nonzero(Z, axis=0)
    below = exact < 20
    for rows in (slice(0, n), slice(0, 1000), slice(1000, n)):
        got = dense_row_pass(Z[rows], np.zeros((len(range(n)[rows]), 0)), with_nnz=20)["nnz"]
        ex = np.count_nonzero(Z[rows], axis=0)
        assert got[ex < 20].tolist() == ex[ex < 20].tolist()
        assert (got[ex >= 20] >= 20).all() and (got <= ex).all()
    parts = [dense_row_pass(Z[r], np.zeros((len(range(n)[r]), 0)), with_nnz=20)["nnz"]
             for r in (slice(0, 1000), slice(1000, n))]
    total = parts[0] + parts[1]
    assert total[below].tolist() == exact[below].tolist() and (total[~below] >= 20).all()
    y, t = rng.normal(size=n), (rng.random(n) < 0.5).astype(float)
    old = stats.SPARSE_CHUNK
    try:
        stats.SPARSE_CHUNK = 500  # sparse Z: counting stops once every column has 20 (here: never, 3-5 are rare)
        got = Block(y, t, None, sp.csr_matrix(Z)).moments(with_nnz=20, with_range=False)["nnz"]
        assert got.tolist() == exact.tolist()
        full = np.delete(Z, [3, 4, 5, 6, 7], axis=1)  # every column non-zero in every row: stops after a chunk
        got = Block(y, t, None, sp.csr_matrix(full)).moments(with_nnz=20, with_range=False)["nnz"]
        assert (got >= 20).all() and (got < n).all()
    finally:
        stats.SPARSE_CHUNK = old
    dense = nexis(y, t, Z, test="linear", min_active=20, _n_blocks=3)
    csr = nexis(y, t, sp.csr_matrix(Z), test="linear", min_active=20)
    assert dense.skipped == csr.skipped
    assert dense.skipped[3] == "constant"  # all zero
    assert {g for g, r in dense.skipped.items() if r == "rare"} == {4, 5}


def test_closed_form_2x2_inverse():
    rng = np.random.default_rng(7)
    A = rng.normal(size=(500, 2, 2))
    A = A @ np.transpose(A, (0, 2, 1)) + 1e-3 * np.eye(2)
    np.testing.assert_allclose(_inv2(A), np.linalg.inv(A), rtol=1e-10, atol=0)


@pytest.mark.parametrize("fmt", ["csr", "dense"])
def test_one_block_uses_the_callers_z_without_a_copy(fmt):
    Z, rng = sparse_codes(400, 12, 0.3, 8)
    z = sp.csr_matrix(Z) if fmt == "csr" else Z
    y, t = rng.normal(size=400), (rng.random(400) < 0.5).astype(float)
    src, *_ = _prepare(y, t, z, None, None, None, "linear", "FWER", 0.05, 0.5, 5, 20, "spline", 0)
    b = src.blocks[0]
    if fmt == "csr":
        assert np.shares_memory(b._zr.data, z.data) and np.shares_memory(b._zr.indices, z.indices)
    else:
        assert np.shares_memory(b._zd, z)
