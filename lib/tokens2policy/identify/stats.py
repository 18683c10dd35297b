"""Partition statistics for NEXIS: every quantity the selection loop needs, as sums over rows.

A :class:`Block` holds the rows of one partition (y, t, dense covariates W, candidate neurons Z dense or
``scipy.sparse``; optional cluster codes and fold ids). Each public method returns numpy arrays that are
*additive over row partitions*: the statistic of the whole data set is the elementwise sum of the statistics
of its blocks. The driver (``engine.py``) therefore runs unchanged on one in-memory block or on the reduced
output of a Spark ``mapInPandas`` over many partitions.

Costs (n rows, M = mw + m candidate columns, nnz non-zeros of Z):

* ``moments``            one pass, O(nnz): Gram-type sums of every column with 1, t, y, ty and of its square.
* ``cross(S)``           O(nnz · |S|): F'x_s and F'(t x_s), the cross-products a newly selected feature adds.
* ``robust(...)``        HC2 / cluster variance sums and their Bell–McCaffrey degrees-of-freedom terms given
                         per-candidate coefficients: O(n · |J| · p) as a few matrix products and column sums over
                         cache-sized chunks of candidates (sparse columns are read densely one chunk at a time);
                         hc2 on sparse Z O(nnz(Z_J) + n · poly(|S|)) plus the cells of the rows where a selected
                         feature fires for the candidates whose series bound is not met (``Block._hc2``).
* ``cross_hist(S)``      ``cross(S)`` plus the histograms of X_S' non-zero values (the spline knots).
* ``fold_grams`` / ``gcm_residual`` / ``gcm_sums``   the basis ridge nuisances per fold (spline or poly2) and the
                         GCM sums, with each candidate residualized linearly or by a cross-fitted basis ridge.

Sparse Z is kept in CSR form for the passes (the CSC form only for bulk column reads) and never densified; dense Z
is read in cache-sized row blocks (``dense_row_pass``).
"""
from __future__ import annotations

import itertools
from collections import OrderedDict

import numpy as np
import scipy.sparse as sp

# cells per column chunk of the robust (HC2 / cluster) path: its n x chunk temporaries stay cache-resident
DENSE_CHUNK = 1 << 17
# hc2 on sparse Z: the rows where a conditioning feature is non-zero are evaluated cell by cell, the others in closed
# form (Block._hc2) — unless those rows are more than this share of the block (then every cell, as for dense Z)
ROBUST_ROW_SHARE = 0.5
# hc2 on sparse Z: stored entries of the candidates' columns per chunk of the closed form's one-by-one part
ENTRY_CHUNK = 1 << 21
# hc2 on sparse Z, rows where a selected feature is non-zero: 1/(1 - h_i) = w_i Σ_k (w_i q_i)^k (w_i = 1/(1 - h_D,i),
# q_i the candidate's share of the leverage) summed to first order by moments of v_i up to degree 6, for a candidate
# whose certified bound ρ ≥ max_i w_i q_i is at most SERIES_RHO (the dropped terms are ≤ 3ρ²/(1 - ρ)² of each
# sum's scale: ≤ 3e-12 here); otherwise, or for |S| + 1 > SERIES_MAX_KK, those rows are evaluated cell by cell
SERIES_RHO = 1e-6
SERIES_MAX_KK = 8
# ... the bound is taken over R_S without its rows of the largest h_D, this share of R_S, evaluated cell by cell
SERIES_TAIL = 1 / 64
# entries per chunk of the series' exact correction on the candidates' stored entries (n_ent x (|S|+1)² temporaries)
SERIES_ENTRY_CHUNK = 1 << 17
# a row whose leverage in the full regression exceeds 1 - LEVERAGE_TOL makes HC2's e_i²/(1 - h_i) a 0/0: the
# candidate is not tested (trace reason "leverage") — its coefficient rests on that one row
LEVERAGE_TOL = 1e-6
# GCM spline basis (basis_matrix): histogram resolution for the knots, at most SPLINE_KNOTS knots per feature and
# one knot per KNOT_SPACING non-zero values, scale-free ridge penalty (a fraction of each column's variance)
HIST_BINS = 1024
# 64 (was 32): a jump between knots biases both GCM residuals on the same units (T grows like √n); on the
# nonlinear null of issue 13 (n = 4000) the test of z_j | z_s at α/2 rejected in 7 % with 32, 3.7 % with 64
SPLINE_KNOTS = 64
SPLINE_BUDGET = 256
KNOT_SPACING = 25
SPLINE_RIDGE = 1e-3
RIDGE = 1.0  # the poly2 basis' penalty (raw scale)
# bytes of GCM basis parts, shared rows and pair Grams a Block keeps across passes (oldest dropped first)
GCM_CACHE_BYTES = 1 << 28


def poly2(XS):
    """[1, x_a, x_a x_b (a <= b)]: the degree-2 polynomial basis of the GCM ridge nuisance."""
    n, s = XS.shape
    cols = [np.ones((n, 1)), XS]
    if s:
        a, b = np.triu_indices(s)
        cols.append(XS[:, a] * XS[:, b])
    return np.hstack(cols)


def spline_knots(hist, lo, hi, max_knots=None):
    """Knots of one feature's spline basis: the quantiles at levels l/(K+1), l = 1..K, of its non-zero values,
    read off their histogram (``hist``: HIST_BINS counts over [lo, hi], linear within a bin); K = min(max_knots,
    #non-zero // KNOT_SPACING). Knots on or outside [lo, hi] and repeats are dropped. A pure function of additive
    counts, so every partitioning of the rows gives the same knots."""
    max_knots = SPLINE_KNOTS if max_knots is None else max_knots
    hist = np.asarray(hist, float)
    N = hist.sum()
    K = int(min(max_knots, N // KNOT_SPACING))
    if K < 1 or not hi > lo:
        return np.zeros(0)
    edges = np.linspace(lo, hi, len(hist) + 1)
    cum = np.cumsum(hist)
    target = N * np.arange(1, K + 1) / (K + 1)
    b = np.searchsorted(cum, target, side="left")
    prev = np.where(b > 0, cum[np.maximum(b - 1, 0)], 0.0)
    kn = edges[b] + (target - prev) / hist[b] * (edges[b + 1] - edges[b])
    kn = np.unique(kn)
    return kn[(kn > lo) & (kn < hi)]


def basis_matrix(XS, spec):
    """The GCM nuisance basis of the columns XS (n x |S|), ``spec`` a picklable description:

    * ``("poly2",)``: [1, x_a, x_a x_b (a <= b)], the degree-2 polynomial basis;
    * ``("spline", ((has_zeros, knots), ...))`` one entry per column: [1] and per column the zero indicator
      1{x ≠ 0} (when the column has zeros: sparse codes), x, the hinges (x - κ)₊ and the steps 1{x > κ} at its
      knots κ — an additive regression spline of degree 1 with jumps at the knots."""
    if spec[0] == "poly2":
        return poly2(XS)
    n = XS.shape[0]
    cols = [np.ones((n, 1))]
    for c, (has_zeros, knots) in enumerate(spec[1]):
        x = XS[:, c:c + 1]
        if has_zeros:
            cols.append((x != 0).astype(float))
        cols.append(x)
        if len(knots):
            kn = np.asarray(knots, float)[None, :]
            cols.append(np.maximum(x - kn, 0.0))
            cols.append((x > kn).astype(float))
    return np.hstack(cols)


def basis_penalty(spec, A_total):
    """Ridge penalty matrix of a basis, from the Gram over all rows (``A_total``; intercept unpenalized).
    poly2: RIDGE·I' (raw scale, as before). spline: SPLINE_RIDGE · n · Var(b) on the diagonal (scale-free)."""
    q = A_total.shape[0]
    if spec[0] == "poly2":
        pen = RIDGE * np.eye(q)
    else:
        n = A_total[0, 0]
        var = np.diag(A_total) / n - (A_total[0] / n) ** 2
        pen = np.diag(SPLINE_RIDGE * n * np.maximum(var, 1e-12 * np.maximum(np.diag(A_total) / n, 1e-300)))
    pen[0, 0] = 0.0
    return pen


def combine(a, b):
    """Sum of two partition statistics (arrays or dicts of arrays); dict entries named ``min*`` / ``max*`` combine
    by minimum / maximum. The one reduction rule of the in-memory Source and the Spark job."""
    if a is None:
        return b
    if isinstance(a, list):  # Block.many: one statistic per request
        return [combine(x, y) for x, y in zip(a, b)]
    if isinstance(a, dict):
        return {k: (np.minimum(a[k], b[k]) if k.startswith("min") else
                    np.maximum(a[k], b[k]) if k.startswith("max") else a[k] + b[k]) for k in a}
    return a + b


# sparse Z: up to this many columns are read from the row form (one scan each) rather than building the column form
FEW_COLUMNS = 8
# dense Z: rows per block of the single-pass sums (``dense_row_pass``), a block of about 512 KiB of float64
DENSE_ROW_CELLS = 1 << 16
# sparse Z: non-zeros per chunk of the element-wise work of the moments (squares, counts): a chunk (8 MiB of values,
# 4 MiB of int32 indices) is read from memory once and stays in cache for every operation on it
SPARSE_CHUNK = 1 << 20
# F'V reads only the rows where V has a non-zero (a sparse feature's cross-products: its ~nnz/m rows, not all n)
# when they are at most this share of the rows
ROW_SUBSET_SHARE = 0.25


def dense_row_pass(Z, V, with_nnz=False, with_range=False, Vsq=None):
    """One pass over a dense n x m Z in row blocks small enough to stay in cache, every sum from the same block:
    ``lin`` V'Z (k x m), ``sq`` Vsq'(Z∘Z) (Vsq defaults to V's first two columns when V has 4 — the moments —
    else none), ``nnz`` non-zeros per column, ``min_nz`` / ``max_nz`` the range of each column's non-zero values.
    ``with_nnz``: True counts exactly; an int k >= 1 counts a column only until it reaches k (``nnz`` is exact below
    k and >= k otherwise: what finding the columns with fewer than k non-zeros needs, ``min_active``), so a column
    of a dense code stops being counted after its first k non-zero rows instead of costing a comparison and an add
    per cell of the pass.

    NumPy's Z.T @ V with a narrow V (and einsum for the squares, a strided column walk for the ranges) streams Z
    from memory several times; here Z travels once, whatever is asked (bench_identify.py reports the time in
    units of one Z.T @ v). Sums over row blocks: the same values as one product up to the order of
    floating-point additions."""
    n, m = Z.shape
    r = max(1, DENSE_ROW_CELLS // max(1, m))
    Vt = np.ascontiguousarray(np.asarray(V, dtype=float).T)
    if Vsq is None and Vt.shape[0] == 4:
        Vsq = Vt[:2].T
    Vsqt = None if Vsq is None else np.ascontiguousarray(np.asarray(Vsq, dtype=float).reshape(n, -1).T)
    out = {"lin": np.zeros((Vt.shape[0], m))}
    if Vsqt is not None:
        out["sq"] = np.zeros((Vsqt.shape[0], m))
    cap = None if with_nnz is True or isinstance(with_nnz, (bool, np.bool_)) else int(with_nnz)
    if with_nnz:
        out["nnz"] = np.zeros(m)
        counting = np.arange(m)  # capped counts: the columns still below the cap
    if with_range:
        out["min_nz"], out["max_nz"] = np.full(m, np.inf), np.full(m, -np.inf)
    sqb = np.empty((r, m)) if Vsqt is not None else None
    for lo in range(0, n, r):
        Zb = Z[lo:lo + r]
        if Vt.shape[0]:
            out["lin"] += Vt[:, lo:lo + r] @ Zb
        if Vsqt is not None:
            out["sq"] += Vsqt[:, lo:lo + r] @ np.multiply(Zb, Zb, out=sqb[:len(Zb)])
        if with_nnz and cap is not None and len(counting):
            part = Zb if len(counting) == m else Zb[:, counting]
            out["nnz"][counting] += np.count_nonzero(part, axis=0)
            counting = counting[out["nnz"][counting] < cap]
        if (with_nnz and cap is None) or with_range:
            nz = Zb != 0
            if with_nnz and cap is None:
                out["nnz"] += nz.sum(0)
            if with_range:
                with np.errstate(invalid="ignore"):
                    np.minimum(out["min_nz"], np.where(nz, Zb, np.inf).min(0), out=out["min_nz"])
                    np.maximum(out["max_nz"], np.where(nz, Zb, -np.inf).max(0), out=out["max_nz"])
    return out


def _rowdot(A, B):
    return np.einsum("ij,ij->i", A, B)


def _hc2_terms(A1, B1, yres, hD, beta, br, raw=False):
    """Per-row terms of the hc2 sums from the residualized [x_j, t x_j] = (A1, B1) of each (row, candidate) entry
    (1-d arrays; ``beta``, ``br`` the candidate's rows of beta and bread): A = a²/(1 - h) (0 where the leverage is
    ≈ 1), and A e², A²(1 - 2h), the three X̃'AX̃ terms, A·A1, A·B1, A, the leverage flag. ``raw``: also E (e_i
    without ỹ_i, for rows where ỹ enters through its sums) and A."""
    E = yres - A1 * beta[:, 0] - B1 * beta[:, 1]
    a = A1 * br[:, 1, 0] + B1 * br[:, 1, 1]
    h = hD + A1 * A1 * br[:, 0, 0] + 2 * A1 * B1 * br[:, 0, 1] + B1 * B1 * br[:, 1, 1]
    bad = h > 1.0 - LEVERAGE_TOL
    with np.errstate(divide="ignore", invalid="ignore"):
        A = np.where(bad, 0.0, a * a / (1.0 - h))
    AA1, AB1 = A * A1, A * B1
    out = {"a2h": A * A * (1.0 - 2.0 * h), "xax0": AA1 * A1, "xax1": AA1 * B1, "xax2": AB1 * B1,
           "sA1": AA1, "sB1": AB1, "sA": A, "bad": bad.astype(float)}
    if raw:
        out.update(A=A, E=E)
    else:
        out["meat"] = A * E * E
    return out


def _series_terms(z0, z1, yres, w, beta, br):
    """The first-order series of ``_hc2_terms`` on a row where x_j = 0 (x̃ = -z, z = D_iπ_j), per entry: the
    polynomial in z that ``_series_sums`` sums by moments (no leverage flag: certified rows have h < 1/2 + ρ)."""
    s = z0 * br[:, 1, 0] + z1 * br[:, 1, 1]
    q = z0 * z0 * br[:, 0, 0] + 2 * z0 * z1 * br[:, 0, 1] + z1 * z1 * br[:, 1, 1]
    E = yres + z0 * beta[:, 0] + z1 * beta[:, 1]
    s2 = s * s
    A = s2 * (w + w * w * q)
    Az0, Az1 = A * z0, A * z1
    return {"meat": A * E * E, "a2h": s2 * s2 * ((2 * w - w * w) + q * (2 * w * w - 2 * w * w * w)),
            "xax0": Az0 * z0, "xax1": Az0 * z1, "xax2": Az1 * z1, "sA1": -Az0, "sB1": -Az1, "sA": A}


def _arm_u(pos, a, pi, linv):
    """U_j,a (|pos| x (k+1) x 2): D_iπ_j = v_i'U_j,a on the rows of arm a (v_i = L_a⁻¹[1, x_S,i], D_i = [1, a, x_S,
    a x_S]; π's rows in D's order)."""
    p = pi.shape[1]
    k = (p - 2) // 2
    ic = np.r_[0, 2:2 + k]
    it = np.r_[1, 2 + k:2 + 2 * k]
    theta = pi[pos][:, ic, :] + a * pi[pos][:, it, :]          # coefficients on [1, x_S] in arm a
    L = np.linalg.inv(np.asarray(linv[a], float))
    return np.einsum("lk,jlb->jkb", L, theta)                    # L'θ


def _series_certified(pos, t, XS, hD, pi, bread):
    """Which candidates J[pos] may use the series on these rows: ``_series_rho`` at most SERIES_RHO."""
    rho = _series_rho(pos, t, XS, hD, pi, bread)
    return np.isfinite(rho) & (rho <= SERIES_RHO)


def _series_rho(pos, t, XS, hD, pi, bread):
    """For each candidate J[pos], a bound ρ_j ≥ max_i w_i q_i over these rows (``XS`` their X_S, ``hD`` their
    leverages); +inf where the series is not offered. On the rows of arm a whose non-zero features of S are the
    set P, z_i = θ_0 + Σ_{s∈P} x_is θ_s (θ_j,a: D π_j's coefficients on [1, x_S] in arm a) is linear in x_P, which
    lies in the box of those rows' per-feature ranges, and q = z'Bz (B = bread_j) is convex: its maximum over the box is
    at one of the 2^|P| corners. ρ_j = max over arms and sets P of max_i w_i · max_corners q; +inf when a row has
    h_D > 1/2 or |S| + 1 > SERIES_MAX_KK."""
    n, k = XS.shape
    if k + 1 > SERIES_MAX_KK or not n or hD.max() > 0.5:
        return np.full(len(pos), np.inf)
    import itertools
    br = bread[pos]
    nz = XS != 0
    code = nz.astype(np.int64) @ (1 << np.arange(k))
    w = 1.0 / (1.0 - hD)
    ic, it = np.r_[0, 2:2 + k], np.r_[1, 2 + k:2 + 2 * k]
    rho = np.zeros(len(pos))
    for a in (0, 1):
        theta = pi[pos][:, ic, :] + a * pi[pos][:, it, :]           # (|pos|, k + 1, 2)
        arm = t == a
        for pat in np.unique(code[arm]):
            rows = arm & (code == pat)
            P = [s_ for s_ in range(k) if pat >> s_ & 1]
            X = XS[rows][:, P]
            lo, hi = X.min(0), X.max(0)
            corners = np.zeros((1 << len(P), k))
            for ci, bits in enumerate(itertools.product((0, 1), repeat=len(P))):
                corners[ci, P] = np.where(np.array(bits, bool), hi, lo)
            z = theta[:, None, 0, :] + np.einsum("cs,jsb->jcb", corners, theta[:, 1:, :])
            q = np.einsum("jcb,jbe,jce->jc", z, br, z).max(1)
            rho = np.maximum(rho, w[rows].max() * q)
    return rho


def _monomial_tables(kk, d):
    """Degree-d monomials of kk variables (sorted index tuples) and, for every full index (i_1..i_d), its
    monomial's number (a kk^d array)."""
    import itertools
    combos = list(itertools.combinations_with_replacement(range(kk), d))
    number = {cmb: i for i, cmb in enumerate(combos)}
    full = np.array([number[tuple(sorted(ix))] for ix in itertools.product(range(kk), repeat=d)], dtype=np.int64)
    return combos, full


def _moment_tensors(V, weights):
    """Full symmetric tensors Σ_i c_i v_i^⊗d ((kk,)*d) for each (name, c, d) in ``weights`` (d ≤ 6), each from one
    product of the rows' monomials of degrees ⌈d/2⌉ and ⌊d/2⌋ (|rows| x C(kk+2, 3) at most)."""
    n, kk = V.shape
    mono, full = {1: V}, {1: np.arange(kk)}
    for d in (2, 3):
        combos, full[d] = _monomial_tables(kk, d)
        prev = {cmb: i for i, cmb in enumerate(_monomial_tables(kk, d - 1)[0])}
        left = np.array([prev[cmb[:-1]] for cmb in combos], dtype=np.int64)
        right = np.array([cmb[-1] for cmb in combos], dtype=np.int64)
        mono[d] = mono[d - 1][:, left] * V[:, right]
    out = {}
    for name, c, d in weights:
        d1, d2 = (d + 1) // 2, d // 2
        G = (mono[d1] * c[:, None]).T @ mono[d2]
        out[name] = G[full[d1][:, None], full[d2][None, :]].reshape((kk,) * d)
    return out


def _series_sums(out, pos, a, V, w, yres, pi, beta, bread, linv):
    """Adds the series sums (``_series_terms`` summed over the rows) of arm a's rows V (v_i), w_i, ỹ_i to ``out``
    for the candidates J[pos], from the rows' moment tensors of v weighted by w ỹ², w ỹ, w, w² ỹ², w² ỹ, w², 2w - w²,
    2w² - 2w³ (degrees 2..6), each contracted per candidate with δ = U b (s = δ'v, b = bread_j[1]), Q = U B U'
    (q = v'Qv, B = bread_j), γ = U β_j (z'β_j = γ'v) and U itself (z = U'v)."""
    kk = V.shape[1]
    w2 = w * w
    T = _moment_tensors(V, [("m2", w * yres * yres, 2), ("m3", w * yres, 3), ("m4", w, 4),
                            ("n4", w2 * yres * yres, 4), ("n5", w2 * yres, 5), ("n6", w2, 6),
                            ("a4", 2 * w - w2, 4), ("a6", 2 * w2 - 2 * w2 * w, 6)])
    e = np.einsum
    step = max(1, (1 << 22) // kk ** 5)
    for lo in range(0, len(pos), step):
        c = pos[lo:lo + step]
        nc = len(c)
        U = _arm_u(c, a, pi, linv)                                   # (nc, kk, 2)
        br = bread[c]
        dl = e("jkb,jb->jk", U, br[:, 1, :])                         # δ
        gm = e("jkb,jb->jk", U, beta[c])                             # γ
        Q = e("jkb,jbc,jlc->jkl", U, br, U).reshape(nc, kk * kk)     # U B U'

        def first(name, vec=dl):                                     # the shared tensor's first axis with a vector
            return vec @ T[name].reshape(kk, -1)

        def by(X, vec):                                              # next axis with a per-candidate vector
            return e("jk,jkx->jx", vec, X.reshape(nc, vec.shape[1], -1))
        ss = {name: by(first(name), dl) for name in T}                # s² factor: (nc, kk^(d-2))
        v6 = by(ss["n6"], Q)                                         # Σ w² s² q v v'   (nc, kk²)
        v4 = ss["m4"]                                                # Σ w s² v v'
        vav = v4 + v6
        xav = e("jkl,jkb->jbl", vav.reshape(nc, kk, kk), U)          # Σ A z_b v
        xax = e("jbl,jlc->jbc", xav, U)                              # Σ A z_b z_c
        out["VAV"][c, a] += vav
        out["XAV"][c, :, a] -= xav
        out["XAX"][c] += np.stack([xax[:, 0, 0], xax[:, 0, 1], xax[:, 1, 1]], 1)
        out["meat"][c] += (ss["m2"][:, 0] + 2 * by(ss["m3"], gm)[:, 0] + by(by(v4, gm), gm)[:, 0]
                           + by(ss["n4"], Q)[:, 0] + 2 * by(by(ss["n5"], Q), gm)[:, 0] + by(by(v6, gm), gm)[:, 0])
        out["a2h"][c] += by(by(ss["a4"], dl), dl)[:, 0] + by(by(by(ss["a6"], dl), dl), Q)[:, 0]


def _hc2_cells(out, pos, cols, t, D, yres, v, hD, pi, beta, bread):
    """Adds to ``out`` the hc2 sums (``Block.robust``) of the candidates at positions ``pos`` over the rows given,
    evaluating every (row, candidate) cell: ``cols(c)`` the candidates' columns on these rows (rows x |c|), D, ỹ,
    v, h_D the rows' design, residual outcome, arm basis and leverage. Column chunks of DENSE_CHUNK cells."""
    n = len(t)
    arms = [np.nonzero(t == a)[0] for a in (0, 1)]
    vv = [(v[r][:, :, None] * v[r][:, None, :]).reshape(len(r), -1) for r in arms]
    step = max(1, DENSE_CHUNK // max(1, n))
    for lo in range(0, len(pos), step):
        c = pos[lo:lo + step]
        X = cols(c)                                              # n x |c|
        A1 = X - D @ pi[c, :, 0].T                               # residualized x_j
        B1 = t[:, None] * X - D @ pi[c, :, 1].T                  # residualized t x_j
        E = yres[:, None] - A1 * beta[c, 0] - B1 * beta[c, 1]    # full-regression residual
        br = bread[c]
        a = A1 * br[:, 1, 0] + B1 * br[:, 1, 1]                  # γ̂_j = Σ a_i y_i
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


class Block:
    """The rows of one partition, with additive statistics.

    Columns are addressed by a *global* index g in [0, mw + m): covariates W first, then neurons Z.
    """

    def __init__(self, y, t, W, Z, cluster_codes=None, folds=None):
        self.y = np.asarray(y, dtype=float)
        self.t = np.asarray(t, dtype=float)
        self.n = len(self.y)
        self.W = np.zeros((self.n, 0)) if W is None else np.asarray(W, dtype=float)
        self.Z = Z
        self.mw = self.W.shape[1]
        self.M = self.mw + (self._zr if self._zr is not None else self._zd).shape[1]
        self.codes = None if cluster_codes is None else np.asarray(cluster_codes, dtype=np.int64)
        self.folds = None if folds is None else np.asarray(folds, dtype=np.int64)

    # Sparse Z is kept in CSR form for the passes: Z'V streams the rows and scatters into m sums that stay in
    # cache (the CSC form gathers V at random rows: 2.6x slower for one vector, 3.4x for four, and converting a
    # 32M-non-zero CSR input to CSC costs 14 such passes). The CSC form is built only when columns are read in
    # bulk (robust tests, GCM spline knots); a few columns (a new feature's cross-products) come from the rows.
    @property
    def Z(self):
        if self._zr is not None and self._zc is None:
            self._zc = self._zr.tocsc()
            self._zc.sort_indices()
        return self._zc if self._zr is not None else self._zd

    @Z.setter
    def Z(self, Z):
        self._zc = self._zsq = self._zone = None
        if sp.issparse(Z):
            Zr = sp.csr_matrix(Z, dtype=float)
            if not Zr.has_canonical_format:  # duplicates summed on a copy: never change the caller's matrix
                Zr = Zr.copy()  # (csr_matrix(Z, dtype=float) may share Z's arrays without being Z's .data)
                Zr.sum_duplicates()
            # explicit zeros are found (and then removed) by ``moments``, the first statistic of every pass plan
            # and the only one they change (non-zero counts and ranges), in its pass over the values
            self._zr, self._zd = Zr, None
        else:
            self._zr, self._zd = None, np.asarray(Z, dtype=float)

    def _drop_explicit_zeros(self):
        Zr = self._zr.copy()
        Zr.eliminate_zeros()
        self._zr, self._zc, self._zsq = Zr, None, None

    def many(self, requests):
        """[statistic of each request]: ``requests`` a list of (method name, *args) — several statistics from one
        pass over the partition (one Spark job for all of them; ``combine`` sums the lists elementwise)."""
        return [getattr(self, r[0])(*r[1:]) for r in requests]

    def rows(self, idx):
        """The Block of the rows ``idx`` (ascending; y, t, W, Z — what ``rmatvec`` and ``columns`` read). Sparse Z:
        kept per row set (the folds' blocks are re-read at every GCM step); dense Z: a fresh copy each time."""
        cache = self.__dict__.setdefault("_row_blocks", {}) if self.sparse else {}
        key = (len(idx), int(idx[0]) if len(idx) else -1, int(idx[-1]) if len(idx) else -1)
        hit = cache.get(key)
        if hit is None or not np.array_equal(hit[0], idx):
            sub = Block.__new__(Block)
            sub.y, sub.t, sub.W = self.y[idx], self.t[idx], self.W[idx]
            sub.n, sub.mw, sub.M, sub.codes, sub.folds = len(idx), self.mw, self.M, None, None
            sub.Z = self._zr[idx] if self.sparse else self._zd[idx]
            hit = cache[key] = (np.array(idx), sub)
        return hit[1]

    # ------------------------------------------------------------------ column access
    @property
    def sparse(self):
        return self._zr is not None

    def columns(self, S):
        """Dense n x |S| matrix of the global columns S (O(n |S|), Z never densified as a whole)."""
        S = np.asarray(S, dtype=np.int64).ravel()
        if self.sparse and self._zc is None and len(S) <= FEW_COLUMNS:
            # a few columns from the row form: one scan of the column indices each (about a third of a pass)
            out = np.empty((self.n, len(S)))
            Zr = self._zr
            for c, g in enumerate(S):
                if g < self.mw:
                    out[:, c] = self.W[:, g]
                    continue
                pos = np.flatnonzero(Zr.indices == g - self.mw)
                out[:, c] = 0.0
                out[np.searchsorted(Zr.indptr, pos, side="right") - 1, c] = Zr.data[pos]
            return out
        if self.mw == 0 or (len(S) and S.min() >= self.mw):  # Z columns only: one slice
            if self.sparse:
                return self.Z[:, S - self.mw].toarray()
            return self.Z[:, S - self.mw]
        out = np.empty((self.n, len(S)))
        for c, g in enumerate(S):
            if g < self.mw:
                out[:, c] = self.W[:, g]
            elif self.sparse:
                j = g - self.mw
                lo, hi = self.Z.indptr[j], self.Z.indptr[j + 1]
                out[:, c] = 0.0
                out[self.Z.indices[lo:hi], c] = self.Z.data[lo:hi]
            else:
                out[:, c] = self.Z[:, g - self.mw]
        return out

    def rmatvec(self, V, square=False):
        """F'V (or (F∘F)'V): M x k for an n x k dense V, in O(nnz · k); dense Z is read once, in cache-sized row
        blocks, for all k columns (``dense_row_pass``). Only the rows where V has a non-zero are read when they are
        few (``ROW_SUBSET_SHARE``): a sparse feature's cross-products F'x_s, F'(t x_s) touch its own rows alone."""
        V = np.asarray(V, dtype=float).reshape(self.n, -1)
        if self.n and V.shape[1]:
            nz = V[:, 0] != 0
            for c in range(1, V.shape[1]):  # (V.any(axis=1) reduces along the short axis: much slower)
                nz |= V[:, c] != 0
            rows = np.flatnonzero(nz)
            if len(rows) <= ROW_SUBSET_SHARE * self.n:
                sub = Block.__new__(Block)
                sub.y = sub.t = None
                sub.W, sub.n, sub.mw, sub.M = self.W[rows], len(rows), self.mw, self.M
                sub._zr, sub._zd = (self._zr[rows], None) if self.sparse else (None, self._zd[rows])
                sub._zc = sub._zsq = None
                return sub._rmatvec_all(V[rows], square)
        return self._rmatvec_all(V, square)

    def _rmatvec_all(self, V, square):
        Wp = self.W * self.W if square else self.W
        top = Wp.T @ V
        if self.sparse:
            Z = self._zr
            if square:
                Z = self._squared()
            bottom = np.asarray(Z.T @ V)
        elif square:
            bottom = dense_row_pass(self.Z, np.zeros((self.n, 0)), False, False, V)["sq"].T
        elif V.shape[1] > 8:  # wide V (GCM sums): BLAS's own blocking is efficient
            bottom = self.Z.T @ V
        else:
            bottom = dense_row_pass(self.Z, V, False, False)["lin"].T
        return np.vstack([top, bottom])

    # ------------------------------------------------------------------ linear-family statistics
    def moments(self, with_nnz=True, with_range=True):
        """Column sums with 1, t, y, ty and square sums with 1, t; plus n, Σt, Σy, Σty, Σy², nnz per column and,
        when ``with_range`` (the GCM spline knots need it), the range of each column's non-zero values.
        Non-finite entries surface as non-finite sums. Dense Z counts its non-zeros only when ``with_nnz``; it is
        read once, in cache-sized row blocks that serve every sum (``dense_row_pass``)."""
        y, t = self.y, self.t
        V4 = np.column_stack([np.ones(self.n), t, y, t * y])
        Wsq = self.W * self.W
        A = [self.W.T @ V4]
        B = [Wsq.T @ V4[:, :2]]
        nnz = [(self.W != 0).sum(0).astype(float)]
        if self.sparse:
            cap = True if with_nnz is True or isinstance(with_nnz, (bool, np.bool_)) else max(1, int(with_nnz))
            counts = self._squared(with_counts=cap)  # squares, non-zero counts, explicit zeros: one read
            if counts is None:  # explicit zeros (now removed): their squares and counts again
                counts = self._squared(with_counts=cap)
            Zr = self._zr
            A.append(np.asarray(Zr.T @ V4))
            B.append(np.asarray(self._zsq.T @ V4[:, :2]))
            nnz.append(counts)
            lo, hi = self.nonzero_range() if with_range else (None, None)
        else:
            d = dense_row_pass(self.Z, V4, with_nnz, with_range)
            A.append(d["lin"].T)
            B.append(d["sq"].T)
            nnz.append(d["nnz"] if with_nnz else np.full(self.Z.shape[1], float(self.n)))
            if with_range:
                lo, hi = self.nonzero_range(dense_z=(d["min_nz"], d["max_nz"]))
        scal = np.array([self.n, t.sum(), y.sum(), (t * y).sum(), (y * y).sum()], dtype=float)
        out = {"scal": scal, "lin": np.vstack(A), "sq": np.vstack(B), "nnz": np.concatenate(nnz)}
        if with_range:
            out.update(min_nz=lo, max_nz=hi)
        return out

    def _squared(self, with_counts=False):
        """Sparse Z's element-wise squares (the CSR matrix Z∘Z, kept) and with ``with_counts`` the non-zeros per
        column, computed chunk by chunk (``SPARSE_CHUNK``) so that each chunk of values and indices is read from
        memory once for the squares, the zero test and the counts. ``with_counts`` an int k (not True): counting
        stops once every column has k non-zeros (exact below k, as ``dense_row_pass``). Returns None after
        removing explicit zeros when it finds any (a stored 0 is not a non-zero: counts and ranges must not see
        it); call it again."""
        Zr = self._zr
        if self._zsq is not None and not with_counts:
            return self._zsq
        d, ind, m = Zr.data, Zr.indices, Zr.shape[1]
        sq = np.empty_like(d)
        counts = np.zeros(m, dtype=np.int64) if with_counts else None
        zeros, counting = 0, True
        for lo in range(0, len(d), SPARSE_CHUNK):
            hi = lo + SPARSE_CHUNK
            np.multiply(d[lo:hi], d[lo:hi], out=sq[lo:hi])
            if with_counts:
                zeros += len(d[lo:hi]) - np.count_nonzero(d[lo:hi])
                if counting:
                    counts += np.bincount(ind[lo:hi], minlength=m)
                    counting = with_counts is True or bool(counts.size and counts.min() < with_counts)
        if zeros:
            self._drop_explicit_zeros()
            return None
        self._zsq = sp.csr_matrix((sq, ind, Zr.indptr), shape=Zr.shape)
        return counts.astype(float) if with_counts else self._zsq

    def nonzero_range(self, dense_z=None):
        """(min, max) of each column's non-zero values (+inf / -inf for a column without any): the range of the
        knot histograms (combined across partitions by min / max, see ``combine``). ``dense_z``: dense Z's part,
        already computed (``dense_row_pass``)."""
        M = self.M
        lo, hi = np.full(M, np.inf), np.full(M, -np.inf)
        with np.errstate(invalid="ignore"):
            if self.mw and self.n:
                nz = self.W != 0
                lo[:self.mw] = np.where(nz, self.W, np.inf).min(0)
                hi[:self.mw] = np.where(nz, self.W, -np.inf).max(0)
            if self.sparse:
                ind = self.Z.indptr
                has = np.diff(ind) > 0
                if has.any() and self.Z.data.size:
                    starts = ind[:-1][has]
                    lo[self.mw:][has] = np.minimum.reduceat(self.Z.data, starts)
                    hi[self.mw:][has] = np.maximum.reduceat(self.Z.data, starts)
            else:
                if dense_z is None:
                    d = dense_row_pass(self.Z, np.zeros((self.n, 0)), False, True)
                    dense_z = (d["min_nz"], d["max_nz"])
                lo[self.mw:], hi[self.mw:] = dense_z
        return lo, hi

    def cross(self, S):
        """M x 2|S|: columns F'x_s, F'(t x_s) for each s in S (interleaved)."""
        XS = self.columns(S)
        V = np.empty((self.n, 2 * len(S)))
        V[:, 0::2] = XS
        V[:, 1::2] = self.t[:, None] * XS
        return self.rmatvec(V)

    def arm_basis(self, S, linv):
        """(v, h_D): per row, v_i = L_a⁻¹[1, x_S,i] for the row's arm a (``linv[a]`` = L_a⁻¹ from the Cholesky factor
        of the arm's Gram of [1, X_S], computed by the driver), an orthonormal basis of the design D over each arm's
        rows — D = [1, T, X_S, T·X_S] spans the two arms' [1, X_S] separately — and the leverage h_D,i = |v_i|²."""
        C = np.column_stack([np.ones(self.n), self.columns(S)])
        v = np.empty_like(C)
        for a in (0, 1):
            rows = self.t == a
            v[rows] = C[rows] @ linv[a].T
        return v, np.einsum("ij,ij->i", v, v)

    def robust(self, S, J, dy, pi, beta, bread, linv, kind, chol_bread=None):
        """Additive sums of the leverage-aware robust variance of γ_j (the T·x_j coefficient) and of its
        Bell–McCaffrey degrees of freedom, for every candidate j in J (dict of arrays, first axis |J|).

        For candidate j the full regression of y on X = [D, x_j, t x_j] has, by Frisch–Waugh–Lovell, residual
        e = ỹ - x̃β (ỹ = y - D·dy, x̃ = [x_j, t x_j] - Dπ_j), leverage h_i = h_D,i + x̃_i'(X̃'X̃)⁻¹x̃_i and γ̂_j = Σ a_i y_i
        with a_i = [(X̃'X̃)⁻¹x̃_i]_2 (``bread`` = (X̃'X̃)⁻¹ per candidate). With Ω = σ²I as the reference, a variance
        V = e'MAMe-type quadratic form (M = I - H) is a weighted sum of χ²₁ with weights the eigenvalues of MAM,
        whose sum and sum of squares are tr(MA) and tr(MAMA) = Σ(A²)_ii - 2 tr(HA²) + tr(HAHA); H = H_D + H_X̃
        with H_D = Σ_arms V_a V_a' (``arm_basis``) and H_X̃ = X̃ (X̃'X̃)⁻¹ X̃'.

        * kind="hc2" (A = diag(a_i²/(1 - h_i))): ``meat`` Σ A_i e_i² (the HC2 variance), ``a2h`` Σ A_i²(1 - 2h_i),
          ``XAX`` X̃'AX̃ (3 entries 11, 12, 22), ``XAV`` X̃'AV_a per arm (2 x 2 x (k+1)), ``VAV`` V_a'AV_a per
          arm (2 x (k+1)²) and ``n_lev`` the rows with h_i > 1 - LEVERAGE_TOL (their A_i is set to 0; the driver
          skips such a candidate). Additive over any row partition.
        * kind="cluster" (A = Σ_g a_g a_g', the CR0 meat's form): with u_g = [V_0,g'a_g, V_1,g'a_g, L'X̃_g'a_g]
          (L L' = ``chol_bread`` per candidate, so that a_g'H_gh a_h = u_g'u_h), ``meat`` Σ_g (a_g'e_g)²,
          ``a4`` Σ_g |a_g|⁴, ``a2u2`` Σ_g |a_g|²|u_g|² and ``UU`` Σ_g u_g u_g' (d x d, d = 2k + 4). These are sums
          over clusters of functions of per-cluster sums: additive over row partitions that keep every cluster
          whole (the in-memory blocks and the Spark job's partitions are cut that way)."""
        J = np.asarray(J, dtype=np.int64)
        nJ, k = len(J), len(S)
        XS = self.columns(S)
        t = self.t
        D = np.column_stack([np.ones(self.n), t, XS, t[:, None] * XS])
        yres = self.y - D @ dy
        v, hD = self.arm_basis(S, linv)
        if kind == "hc2":
            return self._hc2(J, XS, D, yres, v, hD, pi, beta, bread, linv)
        kk = k + 1
        arms = [np.nonzero(t == a)[0] for a in (0, 1)]
        d = 2 * kk + 2
        out = {"meat": np.zeros(nJ), "a4": np.zeros(nJ), "a2u2": np.zeros(nJ), "UU": np.zeros((nJ, d, d))}
        codes, inv = np.unique(self.codes, return_inverse=True)
        onehot = sp.csr_matrix((np.ones(self.n), (inv, np.arange(self.n))), shape=(len(codes), self.n))
        step = max(1, DENSE_CHUNK // max(1, self.n))
        for lo in range(0, nJ, step):
            c = np.arange(lo, min(nJ, lo + step))
            X = self.columns(J[c])                                   # n x |c|
            A1 = X - D @ pi[c, :, 0].T                               # residualized x_j
            B1 = t[:, None] * X - D @ pi[c, :, 1].T                  # residualized t x_j
            E = yres[:, None] - A1 * beta[c, 0] - B1 * beta[c, 1]    # full-regression residual
            br = bread[c]
            a = A1 * br[:, 1, 0] + B1 * br[:, 1, 1]                  # γ̂_j = Σ a_i y_i
            out["meat"][c] += ((onehot @ (a * E)) ** 2).sum(0)
            a2g = onehot @ (a * a)                                # |a_g|²
            out["a4"][c] += (a2g * a2g).sum(0)
            U = np.empty((onehot.shape[0], len(c), 2 * kk + 2))
            for arm, r in enumerate(arms):
                U[:, :, arm * kk:(arm + 1) * kk] = np.stack(
                    [onehot[:, r] @ (a[r] * v[r, l:l + 1]) for l in range(kk)], axis=2)
            XA = np.stack([onehot @ (a * A1), onehot @ (a * B1)], axis=2)          # X̃_g'a_g
            U[:, :, 2 * kk:] = np.einsum("gjb,jba->gja", XA, chol_bread[c])          # L'X̃_g'a_g
            out["a2u2"][c] += (a2g * np.einsum("gjd,gjd->gj", U, U)).sum(0)
            out["UU"][c] += np.einsum("gjd,gje->jde", U, U)
        return out

    def _hc2(self, J, XS, D, yres, v, hD, pi, beta, bread, linv):
        """The hc2 sums of ``robust``. Dense Z, covariate candidates, or conditioning features non-zero on more
        than ROBUST_ROW_SHARE of the rows: every (row, candidate) cell (``_hc2_cells``). Otherwise (sparse Z), the
        rows split in two, the sums exact on both (the same terms, added in another order):

        * rows where some feature of S is non-zero (R_S): every cell, as above, on those rows only;
        * the others, where D_i = [1, t_i, 0, 0] and so v_i = L_a⁻¹e₁ is one vector per arm: on a row where x_j is
          0 as well, x̃_ij = -(π_j,0 + t_i π_j,1) and with it a_i, h_i, A_i are constants per (candidate, arm), and
          e_i = ỹ_i + c_j,a; each sum is then that constant times the arm's row count, Σ ỹ or Σ ỹ² over these
          rows. The rows where x_j is stored (its CSC entries outside R_S, explicit zeros included) are evaluated
          one by one and their count and Σ ỹ, Σ ỹ² taken out of the constant rows' totals.

        Cost O(nnz(Z_J) + |R_S| · |J| + n · (|S| + 1)) instead of O(n · |J|); the SAE-like codes' R_S is the few
        per cent of rows where one of the selected neurons fires."""
        nJ, kk, n = len(J), v.shape[1], self.n
        out = {"meat": np.zeros(nJ), "a2h": np.zeros(nJ), "XAX": np.zeros((nJ, 3)),
               "XAV": np.zeros((nJ, 2, 2, kk)), "VAV": np.zeros((nJ, 2, kk * kk)), "n_lev": np.zeros(nJ)}
        t = self.t
        on_rs = (XS != 0).any(1) if XS.shape[1] else np.zeros(n, bool)
        rs = np.flatnonzero(on_rs)
        pos = np.arange(nJ)
        if not self.sparse or len(rs) > ROBUST_ROW_SHARE * n:
            _hc2_cells(out, pos, lambda c: self.columns(J[c]), t, D, yres, v, hD, pi, beta, bread)
            return out
        zpos = np.flatnonzero(J >= self.mw)
        wpos = np.flatnonzero(J < self.mw)
        if len(wpos):  # dense covariate candidates: every cell
            _hc2_cells(out, wpos, lambda c: self.columns(J[c]), t, D, yres, v, hD, pi, beta, bread)
        if len(rs) and len(zpos):
            # R_S's rows of the largest h_D (a SERIES_TAIL share) are evaluated cell by cell for every candidate, the
            # others by the series for the candidates whose bound over them is met (cell by cell for the rest)
            order = np.argsort(hD[rs], kind="stable")
            cut = len(rs) - int(np.ceil(SERIES_TAIL * len(rs)))
            tail, body = np.sort(rs[order[cut:]]), np.sort(rs[order[:cut]])
            cert = _series_certified(zpos, t[body], XS[body], hD[body], pi, bread)

            def cells(rows, cand):
                sub = Block(self.y[rows], t[rows], None, self._zr[rows])
                sub.Z  # the column form once (a few columns at a time would each scan the row form)
                _hc2_cells(out, cand, lambda c: sub.columns(J[c] - self.mw), t[rows], D[rows], yres[rows], v[rows],
                           hD[rows], pi, beta, bread)
            if (~cert).any():
                cells(rs, zpos[~cert])
            if cert.any():
                cells(tail, zpos[cert])
                in_body = np.zeros(n, bool)
                in_body[body] = True
                self._hc2_series(out, zpos[cert], J, body, in_body, D, yres, v, hD, pi, beta, bread, linv)
        if len(zpos):
            self._hc2_constant_rows(out, zpos, J, ~on_rs, yres, linv, pi, beta, bread)
        return out

    def _candidate_entries(self, pos, J, chunk):
        """Chunks (c, owner, rows, x) of the stored entries of the neuron candidates J[pos] (CSC), about ``chunk``
        entries each: c the chunk's positions, owner each entry's index into c."""
        Zc = self.Z
        indptr = Zc.indptr
        jz = J[pos] - self.mw
        nnz_c = indptr[jz + 1] - indptr[jz]
        ends = np.cumsum(nnz_c)
        lo = 0
        while lo < len(pos):
            hi = max(lo + 1, int(np.searchsorted(ends, (ends[lo - 1] if lo else 0) + chunk, side="right")))
            hi = min(hi, len(pos))
            cnt = nnz_c[lo:hi]
            owner = np.repeat(np.arange(hi - lo), cnt)
            first = np.cumsum(cnt) - cnt
            offs = np.arange(int(cnt.sum())) - np.repeat(first - indptr[jz[lo:hi]], cnt)
            yield pos[lo:hi], owner, Zc.indices[offs], Zc.data[offs]
            lo = hi

    def _hc2_series(self, out, pos, J, rs, on_rs, D, yres, v, hD, pi, beta, bread, linv):
        """``_hc2``'s sums over the rows R_S (``rs``: a selected feature non-zero) for the certified candidates
        J[pos] (``_series_certified``). On a row where x_j = 0, x̃_ij = -z_i with z_i = D_iπ_j = U_j,a'v_i linear in
        v_i, and A_i = s_i² w_i/(1 - w_i q_i) (s_i = z_i'bread_j[1], q_i = z_i'bread_j z_i): its first-order series
        s²(w + w²q) — and A²(1 - 2h) = s⁴[2w/(1 - u) - w²/(1 - u)²] (u = wq) to first order, s⁴[(2w - w²) +
        q(2w² - 2w³)] — are polynomials of degree ≤ 6 in v_i, so their sums over all of R_S are the arms' weighted
        moment tensors of v contracted with U_j (``_series_sums``). On the candidate's stored entries in R_S the
        exact terms replace the polynomial ones (added, and the polynomial's value there subtracted)."""
        t = self.t
        kk = v.shape[1]
        arm_of = np.where(t == 1, 1, np.where(t == 0, 0, -1))
        w = 1.0 / (1.0 - hD)
        for a in (0, 1):
            r = rs[arm_of[rs] == a]
            if len(r):
                _series_sums(out, pos, a, v[r], w[r], yres[r], pi, beta, bread, linv)
        for c, owner, rows, x in self._candidate_entries(pos, J, SERIES_ENTRY_CHUNK):
            keep = on_rs[rows] & (arm_of[rows] >= 0)
            owner, rows, x = owner[keep], rows[keep], x[keep]
            if not len(rows):
                continue
            ci = c[owner]
            arm = arm_of[rows]
            Dr = D[rows]
            z0 = np.einsum("ip,ip->i", Dr, pi[ci, :, 0])
            z1 = np.einsum("ip,ip->i", Dr, pi[ci, :, 1])
            ex = _hc2_terms(x - z0, arm * x - z1, yres[rows], hD[rows], beta[ci], bread[ci])
            tr = _series_terms(z0, z1, yres[rows], w[rows], beta[ci], bread[ci])
            nc = len(c)
            for name, key in (("meat", "meat"), ("a2h", "a2h"), ("n_lev", "bad")):
                out[name][c] += np.bincount(owner, weights=ex[key] - tr.get(key, 0.0), minlength=nc)
            out["XAX"][c] += np.stack([np.bincount(owner, weights=ex[k_] - tr[k_], minlength=nc)
                                       for k_ in ("xax0", "xax1", "xax2")], 1)
            key = 2 * owner + arm
            n_ent = len(rows)
            vr = v[rows]

            def per_key(weights, F):
                sel = sp.csr_matrix((weights, (key, np.arange(n_ent))), shape=(2 * nc, n_ent))
                return np.asarray(sel @ F).reshape(nc, 2, F.shape[1])
            out["XAV"][c, 0] += per_key(ex["sA1"] - tr["sA1"], vr)
            out["XAV"][c, 1] += per_key(ex["sB1"] - tr["sB1"], vr)
            out["VAV"][c] += per_key(ex["sA"] - tr["sA"], (vr[:, :, None] * vr[:, None, :]).reshape(n_ent, -1))

    def _hc2_constant_rows(self, out, pos, J, base, yres, linv, pi, beta, bread):
        """``_hc2``'s sums over the rows ``base`` (no feature of S non-zero) for the candidates J[pos] (neurons)."""
        t = self.t
        v0 = [np.asarray(linv[a], float)[:, 0] for a in (0, 1)]           # v_i on these rows, per arm
        hD0 = np.array([v0[0] @ v0[0], v0[1] @ v0[1]])
        arm_of = np.where(t == 1, 1, np.where(t == 0, 0, -1))
        N0, Sy0, Syy0 = np.zeros(2), np.zeros(2), np.zeros(2)
        for a in (0, 1):
            r = base & (arm_of == a)
            N0[a], Sy0[a], Syy0[a] = r.sum(), yres[r].sum(), yres[r] @ yres[r]
        for c, owner, rows, x in self._candidate_entries(pos, J, ENTRY_CHUNK):
            keep = base[rows] & (arm_of[rows] >= 0)
            owner, rows, x = owner[keep], rows[keep], x[keep]
            nc = len(c)
            arm = arm_of[rows]
            key = 2 * owner + arm
            # per (candidate, arm): x̃ = (x - m0, a x - m1) with D_iπ_j = π_j,0 + a π_j,1 (= (m0, m1)) on these rows;
            # each entry's a_i, h_i, e_i are polynomials in its x with these coefficients
            ak = np.tile([0.0, 1.0], nc)
            m0 = (pi[c, 0, 0][:, None] + np.array([0.0, 1.0]) * pi[c, 1, 0][:, None]).ravel()
            m1 = (pi[c, 0, 1][:, None] + np.array([0.0, 1.0]) * pi[c, 1, 1][:, None]).ravel()
            br = np.repeat(bread[c], 2, axis=0)
            bt = np.repeat(beta[c], 2, axis=0)
            b00, b01, b10, b11 = br[:, 0, 0], br[:, 0, 1], br[:, 1, 0], br[:, 1, 1]
            ka, kb = b10 + ak * b11, -(m0 * b10 + m1 * b11)                   # a_i = ka x + kb
            # h_i = h_D + b00 A1² + 2 b01 A1 B1 + b11 B1²  =  h2 x² + h1 x + h0
            h2 = b00 + 2 * ak * b01 + ak * ak * b11
            h1 = -2 * (b00 * m0 + b01 * (m1 + ak * m0) + b11 * ak * m1)
            h0 = np.tile(hD0, nc) + b00 * m0 * m0 + 2 * b01 * m0 * m1 + b11 * m1 * m1
            e1, e0 = bt[:, 0] + ak * bt[:, 1], -(m0 * bt[:, 0] + m1 * bt[:, 1])  # e_i = ỹ_i - (e1 x + e0)
            yr = yres[rows]
            aa = ka[key] * x + kb[key]
            h = (h2[key] * x + h1[key]) * x + h0[key]
            bad = h > 1.0 - LEVERAGE_TOL
            with np.errstate(divide="ignore", invalid="ignore"):
                A = np.where(bad, 0.0, aa * aa / (1.0 - h))
            E = yr - (e1[key] * x + e0[key])
            nk = 2 * nc

            def bc(wt=None):
                return np.bincount(key, weights=wt, minlength=nk)
            Ax = A * x
            sA, sAx, sAx2 = bc(A), bc(Ax), bc(Ax * x)
            ent = {"meat": bc(A * E * E), "a2h": bc(A * A * (1.0 - 2.0 * h)),
                   "bad": bc(bad.astype(float)) if bad.any() else np.zeros(nk)}
            # Σ A x̃ x̃', Σ A x̃ from Σ A, Σ A x, Σ A x² (x̃ affine in x)
            ent["sA"] = sA
            ent["sA1"] = sAx - m0 * sA
            ent["sB1"] = ak * sAx - m1 * sA
            ent["xax0"] = sAx2 - 2 * m0 * sAx + m0 * m0 * sA
            ent["xax1"] = ak * sAx2 - (m1 + ak * m0) * sAx + m0 * m1 * sA
            ent["xax2"] = ak * ak * sAx2 - 2 * ak * m1 * sAx + m1 * m1 * sA
            cnt_a, sy_a, syy_a = bc().astype(float), bc(yr), bc(yr * yr)
            # the constant rows: x_j = 0, per (candidate, arm)
            with np.errstate(divide="ignore", invalid="ignore"):
                bad0 = h0 > 1.0 - LEVERAGE_TOL
                A0 = np.where(bad0, 0.0, kb * kb / (1.0 - h0))
            N, Sy, Syy = np.tile(N0, nc) - cnt_a, np.tile(Sy0, nc) - sy_a, np.tile(Syy0, nc) - syy_a
            ce = -e0                                                           # e_i = ỹ_i + ce on these rows
            tot = {"meat": A0 * (Syy + 2.0 * ce * Sy + ce * ce * N), "a2h": N * A0 * A0 * (1.0 - 2.0 * h0),
                   "bad": N * bad0, "sA": N * A0, "sA1": -N * A0 * m0, "sB1": -N * A0 * m1,
                   "xax0": N * A0 * m0 * m0, "xax1": N * A0 * m0 * m1, "xax2": N * A0 * m1 * m1}
            tot = {name: (tot[name] + ent[name]).reshape(nc, 2) for name in tot}
            out["meat"][c] += tot["meat"].sum(1)
            out["a2h"][c] += tot["a2h"].sum(1)
            out["n_lev"][c] += tot["bad"].sum(1)
            out["XAX"][c] += np.stack([tot["xax0"].sum(1), tot["xax1"].sum(1), tot["xax2"].sum(1)], 1)
            for a in (0, 1):
                out["XAV"][c, 0, a] += tot["sA1"][:, a, None] * v0[a]
                out["XAV"][c, 1, a] += tot["sB1"][:, a, None] * v0[a]
                out["VAV"][c, a] += tot["sA"][:, a, None] * np.outer(v0[a], v0[a]).ravel()

    # ------------------------------------------------------------------ GCM statistics
    def cross_hist(self, S, lo, hi):
        """``cross(S)`` and, in the same pass, the histograms (|S| x HIST_BINS counts over [lo_s, hi_s]) of each
        feature's non-zero values, from which the spline basis places its knots (``spline_knots``)."""
        XS = self.columns(S)
        hist = np.zeros((len(S), HIST_BINS))
        for c in range(len(S)):
            v = XS[:, c]
            hist[c] = np.histogram(v[v != 0], bins=HIST_BINS, range=(lo[c], hi[c]))[0]
        return {"cross": self.cross(S), "hist": hist}

    # The GCM nuisance basis P = [1, B_1, ..., B_b] of X_S (``basis_matrix``) is held in column blocks with their
    # supports (``BasisBlocks``): an SAE neuron is 0 on most rows, and there its spline columns are exactly 0
    # (every knot lies above its smallest non-zero value), so the per-fold Grams P_k'diag(w)P_k, the sums P_k'v
    # and the row products P_i'c read each block's own rows, and a pair of blocks the rows where both can be
    # non-zero. Blocks, the rows two blocks share and the unweighted Gram blocks of a pair are kept across passes
    # (``GCM_CACHE_BYTES``): the backward step's conditioning sets S∖{j} share all their blocks with each other.
    def _gcm_cached(self, key, make):
        cache = self.__dict__.setdefault("_gcm_entries", OrderedDict())
        hit = cache.get(key)
        if hit is not None:
            cache.move_to_end(key)
            return hit
        hit = cache[key] = make()
        self._gcm_bytes = getattr(self, "_gcm_bytes", 0) + _nbytes(hit)
        while self._gcm_bytes > GCM_CACHE_BYTES and len(cache) > 1:
            self._gcm_bytes -= _nbytes(cache.popitem(last=False)[1])
        return hit

    def _groups(self, n_folds):
        """(group of every row: 2·fold + t; each group's row count): the Grams' row groups (fold, arm)."""
        def make():
            grp = 2 * self.folds + (self.t > 0.5)
            return grp, np.bincount(grp, minlength=2 * n_folds)[:2 * n_folds].astype(float)
        return self._gcm_cached(("groups", n_folds), make)

    def _support(self, rkey, n_folds):
        """(rows in group order — group by group, ascending within a group —, group boundaries seg (2K + 1), the
        rows' sort keys group·n + row, their values): ``rkey`` ("x", g) the non-zero rows of global column g and
        its values there, ("all", g) every row and column g, ("xx", a, b) the rows where columns a and b are both
        non-zero and x_a x_b there."""
        def make():
            grp = self._groups(n_folds)[0]
            if rkey[0] == "xx":
                ra, _, _, xa = self._support(("x", rkey[1]), n_folds)
                rb, _, _, xb = self._support(("x", rkey[2]), n_folds)
                rows, ia, ib = np.intersect1d(ra, rb, assume_unique=True, return_indices=True)
                x = xa[ia] * xb[ib]
            else:
                x = self.columns([rkey[1]])[:, 0]
                rows = np.flatnonzero(x) if rkey[0] == "x" else np.arange(self.n)
                x = x[rows]
            keys = grp[rows] * self.n + rows
            order = np.argsort(keys, kind="stable")
            keys = keys[order]
            seg = np.searchsorted(keys, np.arange(2 * n_folds + 1) * self.n)
            return rows[order], seg, keys, x[order]
        if rkey[0] == "xx":  # the same pair of rows whatever the order of a and b
            rkey = ("xx",) + tuple(sorted(rkey[1:]))
        return self._gcm_cached(("support", rkey, n_folds), make)

    def _spline_part(self, g, feature_spec, n_folds):
        """One feature's spline columns (``basis_matrix`` without the intercept) on its non-zero rows — all rows when
        a knot lies at or below 0, where the basis is not 0 at x = 0."""
        def make():
            one = ("spline", (feature_spec,))
            zero_at_0 = not basis_matrix(np.zeros((1, 1)), one)[0, 1:].any()
            rkey = ("x" if zero_at_0 else "all", int(g))
            rows, seg, keys, x = self._support(rkey, n_folds)
            return _Part(next(_PART_IDS), rkey, rows, seg, keys, basis_matrix(x[:, None], one)[:, 1:])
        return self._gcm_cached(("spline", int(g), feature_spec, n_folds), make)

    def _poly2_part(self, a, b, n_folds):
        """poly2's [x_a, x_a²] (b None) or x_a x_b, on the rows where they can be non-zero."""
        def make():
            rkey = ("x", int(a)) if b is None else ("xx", int(a), int(b))
            rows, seg, keys, x = self._support(rkey, n_folds)
            V = np.column_stack([x, x * x]) if b is None else x[:, None]
            return _Part(next(_PART_IDS), rkey, rows, seg, keys, V)
        return self._gcm_cached(("poly2", int(a), None if b is None else int(b), n_folds), make)

    def basis_blocks(self, S, spec, n_folds):
        """The nuisance basis of X_S named by ``spec`` (``basis_matrix``: the same columns in the same order) as a
        :class:`BasisBlocks` of this partition's rows."""
        S = [int(s) for s in S]
        parts, cols = [], []
        if spec[0] == "poly2":
            s = len(S)
            pos = {ab: 1 + s + i for i, ab in enumerate(zip(*np.triu_indices(s)))}
            for a in range(s):
                parts.append(self._poly2_part(S[a], None, n_folds))
                cols.append(np.array([1 + a, pos[(a, a)]]))
                for b in range(a + 1, s):
                    parts.append(self._poly2_part(S[a], S[b], n_folds))
                    cols.append(np.array([pos[(a, b)]]))
            q = 1 + s + s * (s + 1) // 2
        else:
            q = 1
            for g, fs in zip(S, spec[1]):
                parts.append(self._spline_part(g, (bool(fs[0]), tuple(float(k) for k in fs[1])), n_folds))
                w = parts[-1].V.shape[1]
                cols.append(slice(q, q + w))
                q += w
        return BasisBlocks(q, parts, cols, n_folds)

    def _meet(self, pa, pb, n_folds):
        """(positions ia in pa's rows, ib in pb's rows of the rows the two parts share, in group order; group
        boundaries of the shared rows)."""
        if pa.rkey == pb.rkey:
            idx = np.arange(len(pa.rows))
            return idx, idx, pa.seg

        def make():
            _, ia, ib = np.intersect1d(pa.keys, pb.keys, assume_unique=True, return_indices=True)
            return ia, ib, np.searchsorted(pa.keys[ia], np.arange(2 * n_folds + 1) * self.n)
        return self._gcm_cached(("meet", pa.rkey, pb.rkey, n_folds), make)

    def _pair_sums(self, P, pairs, w=None):
        """{(a, b): Σ_{i in group} w_i V_a,i V_b,i'} over the rows parts a and b share, per row group (the 2K
        (fold, arm) groups unweighted; the K folds with ``w``), for the part pairs ``pairs`` (a <= b). Part a's
        rows are read once for all its b: the shared rows of every b gathered side by side, one product per
        group."""
        K = P.K
        ng = K if w is not None else 2 * K
        out = {}
        by_a = {}
        for a, b in pairs:
            by_a.setdefault(a, []).append(b)
        for a, bs in by_a.items():
            pa = P.parts[a]
            wa = pa.V.shape[1]
            widths = [P.parts[b].V.shape[1] for b in bs]
            offs = np.concatenate([[0], np.cumsum(widths)])
            DR = np.zeros((len(pa.rows), offs[-1]))
            for b, lo in zip(bs, offs):
                ia, ib, _ = self._meet(pa, P.parts[b], K)
                DR[ia, lo:lo + P.parts[b].V.shape[1]] = P.parts[b].V[ib]
            Va = pa.V if w is None else pa.V * w[pa.rows, None]
            res = np.zeros((ng, wa, offs[-1]))
            step = 1 if w is None else 2
            for gi in range(ng):
                lo, hi = pa.seg[gi * step], pa.seg[gi * step + step]
                if lo < hi:
                    res[gi] = Va[lo:hi].T @ DR[lo:hi]
            for b, lo, wb in zip(bs, offs, widths):
                out[(a, b)] = res[:, :, lo:lo + wb]
            out[a] = res  # the strip: (a, b) for its b side by side
        return out

    def _group_sums(self, part, V, step):
        """Σ over each row group of V_i ⊗ part's row (V: |rows| x r, in the part's row order): groups x w x r."""
        ng = (len(part.seg) - 1) // step
        out = np.zeros((ng, part.V.shape[1], V.shape[1]))
        for gi in range(ng):
            lo, hi = part.seg[gi * step], part.seg[gi * step + step]
            if lo < hi:
                out[gi] = part.V[lo:hi].T @ V[lo:hi]
        return out

    def basis_grams(self, P, w=None, arms=((1.0, 1.0),)):
        """Per fold k, Grams of the basis (K x q x q each): with a row weight ``w``, Σ_{i in k} w_i P_i P_i'; else one
        per (c0, c1) in ``arms``, Σ_{i in k} c_{t_i} P_i P_i' — a weight constant within each arm (1: the plain
        Gram P_k'P_k), from each (fold, arm) group's Gram, whose part-pair blocks are kept for later sets (the
        backward step's S∖{j} share them). With ``arms``, also the sums Σ_{i in k} c_{t_i} y_i P_i (K x q each)."""
        K, q, n = P.K, P.q, len(P.parts)
        all_pairs = [(a, b) for a in range(n) for b in range(a, n)]
        if w is not None:
            pairs = self._pair_sums(P, all_pairs, w)
            G = np.zeros((K, q, q))
            G[:, 0, 0] = np.bincount(self.folds, weights=w, minlength=K)[:K]
            for a, part in enumerate(P.parts):
                G[:, 0, P.cols[a]] = G[:, P.cols[a], 0] = self._group_sums(part, w[part.rows, None], 2)[:, :, 0]
            return self._fill(P, G, pairs, strips=True)
        arms = [(float(c0), float(c1)) for c0, c1 in arms]
        cache = self.__dict__.setdefault("_gcm_entries", OrderedDict())
        key = lambda a, b, c: ("pair", P.parts[a].key, P.parts[b].key, K, c)  # noqa: E731
        missing = {ab for ab in all_pairs if any(key(*ab, c) not in cache for c in arms)}
        vals = {(ab, c): self._gcm_cached(key(*ab, c), None)[0] for ab in all_pairs if ab not in missing
                for c in arms}  # read before anything new is kept (which may drop the oldest entries)
        new = self._pair_sums(P, sorted(missing))
        for ab in missing:  # (fold, arm) group sums, combined per arm weights
            raw = new[ab]
            for c in arms:
                vals[(ab, c)] = self._gcm_cached(key(*ab, c), lambda raw=raw, c=c: (
                    c[0] * raw[0::2] + c[1] * raw[1::2],))[0]
        grp, counts = self._groups(K)
        ysum = np.bincount(grp, weights=self.y, minlength=2 * K)[:2 * K]
        out = []
        for c in arms:
            G = np.zeros((K, q, q))
            v = np.zeros((K, q))
            G[:, 0, 0] = c[0] * counts[0::2] + c[1] * counts[1::2]
            v[:, 0] = c[0] * ysum[0::2] + c[1] * ysum[1::2]
            for a, part in enumerate(P.parts):
                one = self._gcm_cached(("p1", part.key, K), lambda part=part: (self._group_sums(
                    part, np.column_stack([np.ones(len(part.rows)), self.y[part.rows]]), 1),))[0]
                G[:, 0, P.cols[a]] = G[:, P.cols[a], 0] = c[0] * one[0::2, :, 0] + c[1] * one[1::2, :, 0]
                v[:, P.cols[a]] = c[0] * one[0::2, :, 1] + c[1] * one[1::2, :, 1]
            out.append((self._fill(P, G, {ab: vals[(ab, c)] for ab in all_pairs}), v))
        return out

    @staticmethod
    def _fill(P, G, pairs, strips=False):
        """Put the part-pair blocks ``pairs`` {(a, b), a <= b} into G and mirror them. Spline parts lie side by
        side in part order, so part a's blocks with b >= a form one strip of columns (``strips``: ``pairs[a]``
        holds it, as ``_pair_sums`` returns it for all b >= a in order)."""
        n = len(P.parts)
        if all(isinstance(c, slice) for c in P.cols):
            for a in range(n):
                ca = P.cols[a]
                wa = ca.stop - ca.start
                strip = pairs[a] if strips else (pairs[(a, a)] if a == n - 1 else np.concatenate(
                    [pairs[(a, b)] for b in range(a, n)], axis=2))
                G[:, ca, ca.start:] = strip
                G[:, ca.stop:, ca] = strip[:, :, wa:].transpose(0, 2, 1)
            return G
        for a in range(n):  # every pair once (a part's own block whole), and its mirror
            for b in range(a, n):
                val = pairs[(a, b)]
                G[P.cell(a, b)] = val
                if a != b:
                    G[P.cell(b, a)] = val.transpose(0, 2, 1)
        return G

    def basis_sums(self, P, V):
        """Per fold k, P_k'V_k for an n x r V: K x q x r."""
        V = np.asarray(V, dtype=float).reshape(self.n, -1)
        r, K = V.shape[1], P.K
        out = np.zeros((K, P.q, r))
        for j in range(r):
            out[:, 0, j] = np.bincount(self.folds, weights=V[:, j], minlength=K)[:K]
        for part, cols in zip(P.parts, P.cols):
            out[:, cols, :] = self._group_sums(part, V[part.rows], 2)
        return out

    def basis_dot(self, P, coef):
        """P_i'coef[k_i] for every row i, with coef one row per fold (K x q) and k_i the row's fold."""
        out = coef[self.folds, 0].astype(float)
        for part, cols in zip(P.parts, P.cols):
            for k in range(P.K):
                lo, hi = part.seg[2 * k], part.seg[2 * k + 2]
                if lo < hi:
                    out[part.rows[lo:hi]] += part.V[lo:hi] @ coef[k, cols]
        return out

    def fold_grams(self, S, n_folds, spec, coef_m=None, e=None):
        """Per-fold Gram P_k'P_k and P_k'target of the basis ``spec`` of X_S. target = y, or the pseudo-outcome φ
        when the (cross-fitted) outcome-model coefficients coef_m are given."""
        P = self.basis_blocks(S, spec, n_folds)
        target = self.y if coef_m is None else self.pseudo_outcome(P, coef_m, e)
        return {"A": self.basis_grams(P)[0][0], "b": self.basis_sums(P, target)[:, :, 0]}

    def fold_grams_both(self, S, n_folds, spec, e):
        """``fold_grams`` of y and, in the same pass, what the pseudo-outcome's Grams need once the outcome model is
        fit: per fold ``Ac`` Σ c_i P_i P_i' and ``bc`` Σ c_i y_i P_i with c_i = (t_i - e)/(e(1 - e)). Since φ_i =
        c_i (y_i - P_i'coef_m[k]) on fold k's rows, fold k's P_k'φ = bc_k - Ac_k coef_m[k] (``phi_grams``): both
        nuisances of a conditioning set from one pass over the rows instead of two. c takes one value per arm:
        both come from each (fold, arm) group's Gram (``basis_grams``)."""
        P = self.basis_blocks(S, spec, n_folds)
        c0, c1 = (0.0 - e) / (e * (1.0 - e)), (1.0 - e) / (e * (1.0 - e))
        (A, b), (Ac, bc) = self.basis_grams(P, arms=((1.0, 1.0), (c0, c1)))
        self._gcm_cached(("gram", P.uids), lambda: (A,))  # gcm_sums on the same basis (the default) reuses it
        return {"A": A, "b": b, "Ac": Ac, "bc": bc}

    def pseudo_outcome(self, P, coef_m, e):
        """φ = (y - m̂)(t - e)/(e(1 - e)), m̂_i = P_i'coef_m[k_i] (``P`` a :class:`BasisBlocks`)."""
        m_hat = self.basis_dot(P, coef_m)
        return (self.y - m_hat) * (self.t - e) / (e * (1.0 - e))

    def gcm_residual(self, S, spec, coef_m, coef_g, e):
        """φ_res = φ - ĝ(X_S), both nuisances cross-fitted ridges on the basis ``spec`` (row i uses its fold's
        out-of-fold coefficients)."""
        P = self.basis_blocks(S, spec, len(coef_m))
        return self.pseudo_outcome(P, coef_m, e) - self.basis_dot(P, coef_g)

    def gcm_sums(self, S, f, zspec=("linear",), n_folds=0, cols=None):
        """Sums that give, for every candidate j, Σ R_ij and Σ R_ij² with R = f · Z_res,j.

        * zspec ("linear",): Z_res,j = x_j - C Π_j, the in-sample OLS of x_j on C = [1, X_S] (Π_j from the Grams).
          Sums F'f, (F∘F)'f², F'(f² C), C'f, C'diag(f²)C.
        * zspec = a basis spec (``basis_matrix``): Z_res,j = x_j - B Π_j^(k) on the rows of fold k, Π_j^(k) the ridge
          of x_j on the basis B fit on the other folds (cross-fitted, like the nuisances of f). Per fold k:
          ``SB`` F'B_k and ``SfB`` F'(f² B_k) (M x K x q: the per-fold cross-moments of every column with the basis),
          ``A`` B_k'B_k, ``Bf`` B_k'f, ``Bf2B`` B_k'diag(f²)B_k; and F'f, (F∘F)'f². F'B_k reads each basis part's
          own rows of F (O(nnz(F on those rows) · w) per part) and the folds' column sums for the intercept.

        ``cols``: only these global columns (first axis len(cols) instead of M, in that order) — the backward step
        tests one column per conditioning set, so its sums are computed and shipped for that column alone."""
        f2 = f * f
        if cols is None:
            def fv(V, square=False, rows=None):  # F'V over all columns (rows: a subset of the rows, any order)
                if rows is None:
                    return self.rmatvec(V, square)
                V = np.asarray(V, dtype=float).reshape(len(rows), -1)
                Zr = (self._zr if self.sparse else self._zd)[rows]
                return np.vstack([self.W[rows].T @ V, np.asarray(Zr.T @ V)])
        else:
            X = self.columns(cols)

            def fv(V, square=False, rows=None):
                Xr = X if rows is None else X[rows]
                V = np.asarray(V, dtype=float).reshape(len(Xr), -1)
                return (Xr * Xr if square else Xr).T @ V
        out = {"Sf": fv(f)[:, 0], "Sf2x2": fv(f2, square=True)[:, 0]}
        if zspec[0] == "linear":
            C = np.column_stack([np.ones(self.n), self.columns(S)])
            out.update(Sf2xC=fv(f2[:, None] * C), Cf=C.T @ f, Cf2C=C.T @ (f2[:, None] * C))
            return out
        K = n_folds
        P = self.basis_blocks(S, zspec, K)
        q = P.q
        width = self.M if cols is None else len(cols)
        SB = np.zeros((width, K, q))
        SfB = np.zeros((width, K, q))
        onehot = np.zeros((self.n, 2, K))  # the intercept's columns: fold k's sums of F and of f² F
        onehot[np.arange(self.n), 0, self.folds] = 1.0
        onehot[np.arange(self.n), 1, self.folds] = f2
        R0 = fv(onehot.reshape(self.n, 2 * K)).reshape(width, 2, K)
        SB[:, :, 0], SfB[:, :, 0] = R0[:, 0], R0[:, 1]
        for part, c in zip(P.parts, P.cols):
            w = part.V.shape[1]
            for k in range(K):  # F's rows of the part in fold k against [V, f² V] there
                lo, hi = part.seg[2 * k], part.seg[2 * k + 2]
                if lo < hi:
                    rows, V = part.rows[lo:hi], part.V[lo:hi]
                    got = fv(np.hstack([V, f2[rows, None] * V]), rows=rows)
                    SB[:, k, c], SfB[:, k, c] = got[:, :w], got[:, w:]
        A = self._gcm_cached(("gram", P.uids), lambda: (self.basis_grams(P)[0][0],))[0]
        out.update(SB=SB, SfB=SfB, A=A, Bf=self.basis_sums(P, f)[:, :, 0],
                   Bf2B=self.basis_grams(P, f2))
        return out


def _nbytes(obj):
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, tuple):
        return sum(_nbytes(x) for x in obj)
    return 0


_PART_IDS = itertools.count()


class _Part(tuple):
    """One column block of a GCM basis: ``key`` (a number naming it among the kept parts), ``rkey`` (its rows' name: parts with the same rkey
    share their rows), ``rows`` (group by group, ``seg`` the 2K + 1 group boundaries, ``keys`` their sort keys
    group·n + row) and ``V`` (|rows| x w, the block's values there; 0 on every other row)."""

    def __new__(cls, key, rkey, rows, seg, keys, V):
        return super().__new__(cls, (key, rkey, rows, seg, keys, V))

    key, rkey, rows, seg, keys, V = (property(lambda self, i=i: self[i]) for i in range(6))


class BasisBlocks:
    """The GCM nuisance basis P (n x q, the columns of ``basis_matrix``) of one partition's rows: its intercept
    (column 0) and parts; part a covers the columns ``cols[a]`` of P (a slice, or an index array for poly2), equals ``parts[a].V`` on its rows and is
    exactly 0 on the other rows. A spline part is one feature's columns (zero indicator, x, hinges, steps) on its
    non-zero rows, or on all rows when a knot lies at or below 0; a poly2 part x_a with x_a² on x_a's non-zero rows,
    or x_a x_b on the rows where both are non-zero. Rows are stored by (fold, arm) group, so every per-fold sum
    reads each part's own rows once: a weighted Gram costs O(Σ_{a<=b} |R_a ∩ R_b| w_a w_b) instead of the dense
    O(n q²)."""

    def __init__(self, q, parts, cols, n_folds):
        self.q, self.parts, self.cols, self.K = q, parts, cols, n_folds
        self.uids = (n_folds,) + tuple(p.key for p in parts)  # names this basis among the kept parts

    def cell(self, a, b):
        """Index of the (part a, part b) block of a stack of q x q matrices."""
        ca, cb = self.cols[a], self.cols[b]
        if isinstance(ca, slice) and isinstance(cb, slice):
            return (slice(None), ca, cb)
        return (slice(None),) + np.ix_(np.arange(self.q)[ca], np.arange(self.q)[cb])

    def dense(self, n):
        """P as a dense n x q array (tests)."""
        out = np.zeros((n, self.q))
        out[:, 0] = 1.0
        for part, cols in zip(self.parts, self.cols):
            out[np.ix_(part.rows, np.arange(self.q)[cols])] = part.V
        return out
