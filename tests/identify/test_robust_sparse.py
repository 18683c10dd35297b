"""The hc2 sums of ``Block.robust`` on sparse Z (issue 16, "hc2 at 1M"): the rows where no selected feature is
non-zero in closed form, the candidates' stored entries one by one, the rest cell by cell — against the
straightforward dense evaluation of every (row, candidate) cell, kept here as the reference
(``_robust_dense_reference``: the loop ``Block.robust`` ran before this change). Speed: benchmarks/ and
docs/benchmarks.md ("hc2 at 1M"), not here.
"""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from tokens2policy.identify import nexis
from tokens2policy.identify import stats
from tokens2policy.identify.stats import Block, LEVERAGE_TOL

RTOL = 1e-9


def _robust_dense_reference(block, S, J, dy, pi, beta, bread, linv):
    """hc2 sums of every candidate, every (row, candidate) cell evaluated: the previous ``Block.robust`` loop."""
    J = np.asarray(J, dtype=np.int64)
    nJ, k = len(J), len(S)
    XS = block.columns(S)
    t = block.t
    D = np.column_stack([np.ones(block.n), t, XS, t[:, None] * XS])
    yres = block.y - D @ dy
    v, hD = block.arm_basis(S, linv)
    kk = k + 1
    arms = [np.nonzero(t == a)[0] for a in (0, 1)]
    out = {"meat": np.zeros(nJ), "a2h": np.zeros(nJ), "XAX": np.zeros((nJ, 3)),
           "XAV": np.zeros((nJ, 2, 2, kk)), "VAV": np.zeros((nJ, 2, kk * kk)), "n_lev": np.zeros(nJ)}
    vv = [(v[r][:, :, None] * v[r][:, None, :]).reshape(len(r), -1) for r in arms]
    step = max(1, stats.DENSE_CHUNK // max(1, block.n))
    for c in [np.arange(lo, min(nJ, lo + step)) for lo in range(0, nJ, step)]:
        X = block.columns(J[c])
        A1 = X - D @ pi[c, :, 0].T
        B1 = t[:, None] * X - D @ pi[c, :, 1].T
        E = yres[:, None] - A1 * beta[c, 0] - B1 * beta[c, 1]
        br = bread[c]
        a = A1 * br[:, 1, 0] + B1 * br[:, 1, 1]
        h = hD[:, None] + A1 * A1 * br[:, 0, 0] + 2 * A1 * B1 * br[:, 0, 1] + B1 * B1 * br[:, 1, 1]
        bad = h > 1.0 - LEVERAGE_TOL
        out["n_lev"][c] += bad.sum(0)
        with np.errstate(divide="ignore", invalid="ignore"):
            A = np.where(bad, 0.0, a * a / (1.0 - h))
        out["meat"][c] += np.einsum("ij,ij->j", A, E * E)
        out["a2h"][c] += np.einsum("ij,ij->j", A * A, 1.0 - 2.0 * h)
        AA1, AB1 = A * A1, A * B1
        out["XAX"][c] += np.column_stack([np.einsum("ij,ij->j", AA1, A1), np.einsum("ij,ij->j", AA1, B1),
                                          np.einsum("ij,ij->j", AB1, B1)])
        for arm, r in enumerate(arms):
            out["XAV"][c, 0, arm] += AA1[r].T @ v[r]
            out["XAV"][c, 1, arm] += AB1[r].T @ v[r]
            out["VAV"][c, arm] += (vv[arm].T @ A[r]).T
    return out


def _plan(F, y, t, S, J):
    """The arguments of ``Block.robust`` computed directly from dense F = [W, Z] (least squares on the design
    D = [1, t, X_S, t X_S], the arms' Cholesky factors of [1, X_S]): what the engine's driver algebra supplies."""
    XS = F[:, S]
    D = np.column_stack([np.ones(len(y)), t, XS, t[:, None] * XS])
    G = D.T @ D
    dy = np.linalg.solve(G, D.T @ y)
    X = F[:, J]
    pi = np.stack([np.linalg.solve(G, D.T @ X), np.linalg.solve(G, D.T @ (t[:, None] * X))], 2)  # p x |J| x 2
    pij = np.transpose(pi, (1, 0, 2))
    A1 = X - D @ pi[:, :, 0]
    B1 = t[:, None] * X - D @ pi[:, :, 1]
    XX = np.stack([np.stack([(A1 * A1).sum(0), (A1 * B1).sum(0)], 1),
                   np.stack([(A1 * B1).sum(0), (B1 * B1).sum(0)], 1)], 1)
    yres = y - D @ dy
    bread = np.linalg.inv(XX)
    beta = np.einsum("jab,jb->ja", bread, np.stack([A1.T @ yres, B1.T @ yres], 1))
    C = np.column_stack([np.ones(len(y)), XS])
    linv = [np.linalg.inv(np.linalg.cholesky(C[t == a].T @ C[t == a])) for a in (0, 1)]
    return dy, pij, beta, bread, linv


def _both_arms(F, t, cols):
    """The columns with non-zeros in both arms and not collinear with S (the engine tests no other)."""
    cols = np.asarray(cols, dtype=np.int64)
    return cols[((F[t == 0][:, cols] != 0).sum(0) >= 1) & ((F[t == 1][:, cols] != 0).sum(0) >= 1)]


def _assert_same(got, ref, rtol=RTOL):
    assert set(got) == set(ref)
    np.testing.assert_array_equal(got["n_lev"], ref["n_lev"])
    for name in ("meat", "a2h", "XAX", "XAV", "VAV"):
        g, r = got[name], ref[name]
        # relative to each candidate's scale of that sum (entries of XAV / VAV / XAX's cross term can be ~0)
        scale = np.abs(r).reshape(len(r), -1).max(1)
        err = np.abs(g - r).reshape(len(r), -1).max(1)
        assert np.all(err <= rtol * scale + 1e-300), (name, float((err / np.maximum(scale, 1e-300)).max()))


def _sae_codes(n, m, k_active, seed, explicit_zeros=0):
    """SAE-like codes: k_active of m neurons per row with non-negative values (popularity skewed), CSR; column 0
    active in one control and one treated row (leverage 1 on both), column 1 in two rows of each arm
    (high leverage); ``explicit_zeros`` stored zeros."""
    rng = np.random.default_rng(seed)
    t = (rng.random(n) < 0.5).astype(float)
    c0, c1 = np.flatnonzero(t == 0)[:3], np.flatnonzero(t == 1)[:3]
    pop = rng.zipf(1.6, m).astype(float)
    pop /= pop.sum()
    rows, cols = [], []
    for i in range(n):
        cols.append(rng.choice(m, size=k_active, replace=False, p=pop))
        rows.append(np.full(k_active, i))
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    keep = cols > 1
    rows, cols = rows[keep], cols[keep]
    rows = np.r_[rows, c0[0], c1[0], c0[1], c0[2], c1[1], c1[2]]
    cols = np.r_[cols, 0, 0, 1, 1, 1, 1]
    vals = rng.exponential(1.0, len(rows))
    if explicit_zeros:
        zi = rng.choice(n, explicit_zeros, replace=False)
        zc = rng.integers(2, m, explicit_zeros)
        rows, cols, vals = np.r_[rows, zi], np.r_[cols, zc], np.r_[vals, np.zeros(explicit_zeros)]
    Z = sp.coo_matrix((vals, (rows, cols)), shape=(n, m)).tocsr()  # duplicates summed
    Z.sort_indices()
    if explicit_zeros:  # the coo -> csr conversion keeps the stored zeros unless they met another entry
        assert (Z.data == 0).any()
    y = 0.3 * t + rng.normal(size=n) * (1 + 0.5 * t)
    return Z, t, y, rng


@pytest.mark.parametrize("k", [0, 1, 3, 5])
@pytest.mark.parametrize("explicit_zeros", [0, 40])
def test_hc2_sums_on_sparse_codes_equal_every_cell(k, explicit_zeros, monkeypatch):
    """Sparse SAE-like codes, |S| = 0, 1, 3, 5 (popular and rare features), every candidate: the same sums as the
    dense evaluation of every cell, n_lev exact (column 0 active in one row: leverage 1 in the treated or control
    arm; column 1 in two rows), explicit zeros stored in Z."""
    n, m = 1500, 60
    Z, t, y, rng = _sae_codes(n, m, 6, 10 + k, explicit_zeros)
    Zd = Z.toarray()
    order = np.argsort(-(Zd != 0).sum(0))
    S = [int(s) for s in order[2:2 + k]]                     # popular features: R_S a large share of the rows
    J = _both_arms(Zd, t, [j for j in range(m) if j not in S])
    args = _plan(Zd, y, t, S, J)
    ref = _robust_dense_reference(Block(y, t, None, Zd), S, J, *args)
    _assert_same(Block(y, t, None, Z).robust(S, J, *args, "hc2"), ref)
    monkeypatch.setattr(stats, "ROBUST_ROW_SHARE", 1.0)       # the split path even where R_S is most rows
    _assert_same(Block(y, t, None, Z).robust(S, J, *args, "hc2"), ref)
    monkeypatch.undo()
    assert ref["n_lev"][list(J).index(0)] == 2                 # the column of one row per arm
    assert ref["n_lev"].sum() == 2
    # rare conditioning features (R_S a few per cent): the split path proper
    S2 = [int(s) for s in order[-k - 8:-8]] if k else []
    J2 = _both_arms(Zd, t, [j for j in range(m) if j not in S2])
    args2 = _plan(Zd, y, t, S2, J2)
    got2 = Block(y, t, None, Z).robust(S2, J2, *args2, "hc2")
    _assert_same(got2, _robust_dense_reference(Block(y, t, None, Zd), S2, J2, *args2))


def test_hc2_split_path_is_taken_and_small_chunks_agree(monkeypatch):
    """The closed form runs (not the every-cell fallback) for rare S, and tiny entry chunks (candidates split across
    many chunks) give the same sums; covariate candidates W (dense) and a W feature in S are handled."""
    n, m = 2000, 50
    Z, t, y, rng = _sae_codes(n, m, 4, 3)
    W = rng.normal(size=(n, 2))
    F = np.hstack([W, Z.toarray()])
    nnz = (F[:, 2:] != 0).sum(0)
    S = [2 + int(np.argsort(nnz)[20])]
    J = _both_arms(F, t, [g for g in range(F.shape[1]) if g not in S])
    args = _plan(F, y, t, S, J)
    ref = _robust_dense_reference(Block(y, t, W, F[:, 2:]), S, J, *args)
    calls = []
    real = stats.Block._hc2_constant_rows
    monkeypatch.setattr(stats.Block, "_hc2_constant_rows", lambda self, *a: (calls.append(1), real(self, *a))[1])
    for chunk in (1 << 21, 5):
        monkeypatch.setattr(stats, "ENTRY_CHUNK", chunk)
        _assert_same(Block(y, t, W, Z).robust(S, J, *args, "hc2"), ref)
    assert len(calls) == 2
    # a dense covariate in S: every row is in R_S, the every-cell path
    S_w = [0, S[0]]
    J_w = np.array([g for g in J if g not in S_w], dtype=np.int64)
    args_w = _plan(F, y, t, S_w, J_w)
    _assert_same(Block(y, t, W, Z).robust(S_w, J_w, *args_w, "hc2"),
                 _robust_dense_reference(Block(y, t, W, F[:, 2:]), S_w, J_w, *args_w))
    assert len(calls) == 2


def test_hc2_sums_are_additive_over_row_blocks():
    """The Spark job sums the partitions' statistics: the split path on row blocks adds up to the whole."""
    n, m = 1800, 40
    Z, t, y, rng = _sae_codes(n, m, 5, 4)
    Zd = Z.toarray()
    S = [int(np.argsort((Zd != 0).sum(0))[25]), int(np.argsort((Zd != 0).sum(0))[30])]
    J = _both_arms(Zd, t, [j for j in range(m) if j not in S])
    args = _plan(Zd, y, t, S, J)
    whole = Block(y, t, None, Z).robust(S, J, *args, "hc2")
    parts = None
    for lo, hi in ((0, 500), (500, 1300), (1300, n)):
        parts = stats.combine(parts, Block(y[lo:hi], t[lo:hi], None, Z[lo:hi]).robust(S, J, *args, "hc2"))
    _assert_same(parts, whole, rtol=1e-11)


def _planted(seed, n=3000, m=200):
    rng = np.random.default_rng(seed)
    Z, t, _, rng = _sae_codes(n, m, 8, seed)
    Zd = Z.toarray()
    nnz = (Zd != 0).sum(0)
    planted = np.argsort(-nnz)[[3, 8, 15, 30]]
    y = 0.4 * t + 0.3 * Zd[:, planted].sum(1) + rng.normal(size=n)
    for j, eff in zip(planted, (0.8, -0.7, 0.9, 1.0)):
        y += t * eff * Zd[:, j]
    return y, t, Z, planted


@pytest.mark.parametrize("blocks", [1, 3])
def test_nexis_hc2_unchanged_against_the_dense_reference(monkeypatch, blocks):
    """The whole hc2 search on a planted sparse design: same trace, selections and p-values (1e-9) with the new
    ``Block.robust`` as with the dense reference patched in (on one block and on three)."""
    y, t, Z, planted = _planted(5)
    new = nexis(y, t, Z, test="hc2", min_active=5, _n_blocks=blocks)
    real = stats.Block.robust

    def dense(self, S, J, dy, pi, beta, bread, linv, kind, chol_bread=None):
        assert kind == "hc2"
        return _robust_dense_reference(self, S, J, dy, pi, beta, bread, linv)

    monkeypatch.setattr(stats.Block, "robust", dense)
    old = nexis(y, t, Z, test="hc2", min_active=5, _n_blocks=blocks)
    monkeypatch.setattr(stats.Block, "robust", real)
    assert set(planted) <= set(new.selected)
    np.testing.assert_array_equal(new.selected, old.selected)
    np.testing.assert_allclose(new.pvalues, old.pvalues, rtol=RTOL, atol=0)
    np.testing.assert_allclose(new.tstats, old.tstats, rtol=RTOL, atol=0)
    assert [(r["action"], r["feature"]) for r in new.trace] == [(r["action"], r["feature"]) for r in old.trace]
    for a, b in zip(new.trace, old.trace):
        for key in ("p", "t"):
            if key in a and a[key] is not None and np.isfinite(a[key]):
                assert a[key] == pytest.approx(b[key], rel=RTOL, abs=1e-300), (a, b)


@pytest.mark.parametrize("k", [0, 1, 3, 5])
def test_series_moments_equal_the_polynomial_summed_row_by_row(k):
    """``_series_sums`` (moment tensors of v up to degree 6, contracted per candidate) equals ``_series_terms``
    (the first-order series of each row's terms) summed over the rows: the same polynomial, another order."""
    rng = np.random.default_rng(40 + k)
    n, nJ, kk, p = 300, 7, k + 1, 2 + 2 * k
    V = rng.normal(size=(n, kk)) / np.sqrt(n)
    w = 1.0 / (1.0 - rng.uniform(0, 0.3, n))
    yres = rng.normal(size=n)
    pi = rng.normal(size=(nJ, p, 2))
    beta = rng.normal(size=(nJ, 2))
    M = rng.normal(size=(nJ, 2, 2))
    bread = np.einsum("jab,jcb->jac", M, M) + 0.1 * np.eye(2)
    linv = [np.linalg.inv(np.linalg.cholesky(np.cov(rng.normal(size=(kk, 3 * kk))) + np.eye(kk))) for _ in (0, 1)]
    for a in (0, 1):
        out = {"meat": np.zeros(nJ), "a2h": np.zeros(nJ), "XAX": np.zeros((nJ, 3)),
               "XAV": np.zeros((nJ, 2, 2, kk)), "VAV": np.zeros((nJ, 2, kk * kk))}
        pos = np.arange(nJ)
        stats._series_sums(out, pos, a, V, w, yres, pi, beta, bread, linv)
        U = stats._arm_u(pos, a, pi, linv)
        for j in range(nJ):
            z = V @ U[j]
            tr = stats._series_terms(z[:, 0], z[:, 1], yres, w, np.repeat(beta[j:j + 1], n, 0),
                                     np.repeat(bread[j:j + 1], n, 0))
            ref = {"meat": tr["meat"].sum(), "a2h": tr["a2h"].sum(),
                   "XAX": np.array([tr["xax0"].sum(), tr["xax1"].sum(), tr["xax2"].sum()]),
                   "XAV": np.stack([tr["sA1"] @ V, tr["sB1"] @ V]),
                   "VAV": ((V[:, :, None] * V[:, None, :]).reshape(n, -1).T @ tr["sA"])}
            for name, r in ref.items():
                g = out[name][j] if name not in ("XAV", "VAV") else out[name][j][:, a] if name == "XAV" \
                    else out[name][j][a]
                np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-12 * np.abs(r).max(), err_msg=name)
            other = 1 - a
            assert not out["XAV"][j][:, other].any() and not out["VAV"][j][other].any()


@pytest.mark.parametrize("k", [1, 3, 5])
def test_series_error_within_its_certified_bound(monkeypatch, k):
    """Every candidate on the series (threshold lifted): each sum within 10ρ_j²/(1 - ρ_j)² of the every-cell
    reference, ρ_j the certification's bound (the dropped terms are ≤ 3ρ² of each term; XAV / VAV / the cross
    term of XAX are measured against the largest entry of their candidate). So at the default SERIES_RHO = 1e-6
    the series moves a sum by at most ~1e-11 of its scale."""
    n, m = 6000, 80
    Z, t, y, rng = _sae_codes(n, m, 5, 20 + k)
    Zd = Z.toarray()
    order = np.argsort(-(Zd != 0).sum(0))
    S = [int(s) for s in order[10:10 + k]]
    J = _both_arms(Zd, t, [j for j in range(m) if j not in S])
    args = _plan(Zd, y, t, S, J)
    ref = _robust_dense_reference(Block(y, t, None, Zd), S, J, *args)
    rhos = []
    real = stats._series_rho
    monkeypatch.setattr(stats, "_series_rho", lambda *a: (rhos.append(real(*a)), rhos[-1])[1])
    monkeypatch.setattr(stats, "SERIES_RHO", np.inf)
    got = Block(y, t, None, Z).robust(S, J, *args, "hc2")
    assert len(rhos) == 1 and np.isfinite(rhos[0]).all()
    rho = rhos[0]
    assert rho.max() > 1e-5                                     # the series' error is visible in this design
    bound = 10 * rho ** 2 / (1 - rho) ** 2 + 1e-11
    np.testing.assert_array_equal(got["n_lev"], ref["n_lev"])
    for name in ("meat", "a2h", "XAX", "XAV", "VAV"):
        scale = np.abs(ref[name]).reshape(len(J), -1).max(1)
        err = np.abs(got[name] - ref[name]).reshape(len(J), -1).max(1)
        assert np.all(err <= bound * scale), (name, float((err / scale / bound).max()))
    # a threshold of 1e-4 (100x the default): the candidates under it on the series, the others cell by cell —
    # the sums within 1e-9 of the reference all the same
    assert 0 < (rho <= 1e-4).sum() < len(J)
    monkeypatch.setattr(stats, "SERIES_RHO", 1e-4)
    _assert_same(Block(y, t, None, Z).robust(S, J, *args, "hc2"), ref)
