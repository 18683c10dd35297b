"""Partition statistics for NEXIS: every quantity the selection loop needs, as sums over rows.

A :class:`Block` holds the rows of one partition (y, t, dense covariates W, candidate neurons Z dense or
``scipy.sparse``; optional cluster codes and fold ids). Each public method returns numpy arrays that are
*additive over row partitions*: the statistic of the whole data set is the elementwise sum of the statistics
of its blocks. The driver (``engine.py``) therefore runs unchanged on one in-memory block or on the reduced
output of a Spark ``mapInPandas`` over many partitions.

Costs (n rows, M = mw + m candidate columns, nnz non-zeros of Z):

* ``moments``            one pass, O(nnz): Gram-type sums of every column with 1, t, y, ty and of its square.
* ``cross(S)``           O(nnz · |S|): F'x_s and F'(t x_s), the cross-products a newly selected feature adds.
* ``robust(...)``        HC1 meat / cluster scores given per-candidate coefficients. Dense columns (and sparse
                         blocks of at most DIRECT_CELLS cells): O(n · |J| · p) as a few matrix products and column
                         sums over cache-sized chunks of candidates. Large sparse blocks: O(n k^4 + nnz · p) via a
                         zero/non-zero row split (rows where x_j = 0 share one closed form).
* ``fold_grams`` / ``gcm_residual`` / ``gcm_sums``   the poly2 ridge nuisances per fold and the GCM sums.

Sparse Z is kept in CSC form and never densified.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

CHUNK = 1 << 20  # non-zeros (or dense cells) handled per vectorized chunk
# Robust (HC1/cluster) meat: when n x (#sparse candidates) is at most this many cells, the block reads those
# columns densely and sums every row's exact term. Above it, the zero/non-zero row split is used; the split
# subtracts the zero-row formula on non-zero rows, which loses digits when a few high-leverage rows dominate
# (tiny n), so small blocks take the direct path, which is then also the cheaper one.
DIRECT_CELLS = 1 << 22
# cells per column chunk of the dense robust path: its n x chunk temporaries stay cache-resident
DENSE_CHUNK = 1 << 17


def poly2(XS):
    """[1, x_a, x_a x_b (a <= b)]: the degree-2 polynomial basis of the GCM ridge nuisance."""
    n, s = XS.shape
    cols = [np.ones((n, 1)), XS]
    if s:
        a, b = np.triu_indices(s)
        cols.append(XS[:, a] * XS[:, b])
    return np.hstack(cols)


def _rowdot(A, B):
    return np.einsum("ij,ij->i", A, B)


class Block:
    """The rows of one partition, with additive statistics.

    Columns are addressed by a *global* index g in [0, mw + m): covariates W first, then neurons Z.
    """

    def __init__(self, y, t, W, Z, cluster_codes=None, folds=None):
        self.y = np.asarray(y, dtype=float)
        self.t = np.asarray(t, dtype=float)
        self.n = len(self.y)
        self.W = np.zeros((self.n, 0)) if W is None else np.asarray(W, dtype=float)
        if sp.issparse(Z):
            self.Z = sp.csc_matrix(Z, dtype=float)
            self.Z.sort_indices()
            self._Zsq = None
        else:
            self.Z = np.asarray(Z, dtype=float)
        self.mw = self.W.shape[1]
        self.M = self.mw + self.Z.shape[1]
        self.codes = None if cluster_codes is None else np.asarray(cluster_codes, dtype=np.int64)
        self.folds = None if folds is None else np.asarray(folds, dtype=np.int64)

    # ------------------------------------------------------------------ column access
    @property
    def sparse(self):
        return sp.issparse(self.Z)

    def columns(self, S):
        """Dense n x |S| matrix of the global columns S (O(n |S|), Z never densified as a whole)."""
        S = np.asarray(S, dtype=np.int64).ravel()
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
        """F'V (or (F∘F)'V): M x k for an n x k dense V, in O(nnz · k)."""
        V = np.asarray(V, dtype=float).reshape(self.n, -1)
        Wp = self.W * self.W if square else self.W
        top = Wp.T @ V
        if self.sparse:
            Z = self.Z
            if square:
                if self._Zsq is None:
                    self._Zsq = sp.csc_matrix((Z.data ** 2, Z.indices, Z.indptr), shape=Z.shape)
                Z = self._Zsq
            bottom = np.asarray(Z.T @ V)
        elif square:  # einsum streams Z once per column of V, without an n x m temporary
            bottom = np.column_stack([np.einsum("ij,ij,i->j", self.Z, self.Z, V[:, c]) for c in range(V.shape[1])])
        else:
            bottom = self.Z.T @ V
        return np.vstack([top, bottom])

    def entries(self, J):
        """Yield (rows, positions in J, values) of the non-zero entries of the sparse-Z columns J, in chunks of
        about CHUNK entries (the split columns of ``robust``; dense columns are read with ``columns``)."""
        J = np.asarray(J, dtype=np.int64)
        zj = J - self.mw
        counts = np.diff(self.Z.indptr)[zj]
        start = 0
        while start < len(zj):
            stop = start + 1
            total = counts[start]
            while stop < len(zj) and total + counts[stop] <= CHUNK:
                total += counts[stop]
                stop += 1
            sub = self.Z[:, zj[start:stop]]
            yield sub.indices, start + np.repeat(np.arange(stop - start), np.diff(sub.indptr)), sub.data
            start = stop

    def is_sparse_column(self, J):
        """Columns handled by the zero/non-zero split of ``robust`` (sparse Z in a block of more than
        DIRECT_CELLS cells)."""
        J = np.asarray(J, dtype=np.int64)
        return (J >= self.mw) & self.sparse & (self.n * len(J) > DIRECT_CELLS)

    # ------------------------------------------------------------------ linear-family statistics
    def moments(self, with_nnz=True):
        """Column sums with 1, t, y, ty and square sums with 1, t; plus n, Σt, Σy, Σty, Σy², nnz per column.
        Non-finite entries surface as non-finite sums. Dense Z counts its non-zeros only when ``with_nnz``."""
        y, t = self.y, self.t
        V4 = np.column_stack([np.ones(self.n), t, y, t * y])
        Wsq = self.W * self.W
        A = [self.W.T @ V4]
        B = [Wsq.T @ V4[:, :2]]
        nnz = [(self.W != 0).sum(0).astype(float)]
        if self.sparse:
            A.append(np.asarray(self.Z.T @ V4))
            B.append(self.rmatvec(V4[:, :2], square=True)[self.mw:])
            nnz.append(np.diff(self.Z.indptr).astype(float))
        else:
            A.append(self.Z.T @ V4)
            B.append(self.rmatvec(V4[:, :2], square=True)[self.mw:])
            nnz.append(np.count_nonzero(self.Z, axis=0).astype(float) if with_nnz else np.full(self.Z.shape[1], self.n))
        scal = np.array([self.n, t.sum(), y.sum(), (t * y).sum(), (y * y).sum()], dtype=float)
        return {"scal": scal, "lin": np.vstack(A), "sq": np.vstack(B), "nnz": np.concatenate(nnz)}

    def cross(self, S):
        """M x 2|S|: columns F'x_s, F'(t x_s) for each s in S (interleaved)."""
        XS = self.columns(S)
        V = np.empty((self.n, 2 * len(S)))
        V[:, 0::2] = XS
        V[:, 1::2] = self.t[:, None] * XS
        return self.rmatvec(V)

    def robust(self, S, J, dy, pi, beta, linv, kind, n_clusters=0):
        """Additive pieces of the HC1 meat (kind="hc1": |J| x 3 with entries 11, 12, 22) or of the cluster
        scores (kind="cluster": n_clusters x |J| x 2, summed over the rows of each cluster).

        For candidate j, with ỹ = y - D·dy the residual of y on D, the full-regression residual is
        e = ỹ + Dπ_jβ_j - x_j β_j1 - t x_j β_j2 and the residualized regressors are x̃ = [x_j, t x_j] - Dπ_j.

        * Dense columns (W, dense Z, small sparse blocks): every row's exact term, as n x |J| matrices — D π_j for
          all candidates of a chunk is one matrix product, so the cost is a few passes over n x |J| cells.
        * Sparse columns (``is_sparse_column``): on rows where x_j = 0, e and x̃ are linear in q = [ỹ, v] within
          each arm, v = L_a⁻¹[1, X_S] an orthonormal (over the arm's rows) basis of the arm's design (``linv[a]`` =
          L_a⁻¹ from the Cholesky factor of the arm's Gram, computed by the driver). Their contribution over *all*
          rows is a contraction of the arm's 4th-moment tensor Σ vec(qq')vec(qq')' (HC1) or of per-cluster 2nd
          moments Σ_g qq' (cluster); the orthonormal basis keeps these contractions free of cancellation. The
          non-zero rows then add (true term - zero-row formula), O(nnz · p).
        """
        J = np.asarray(J, dtype=np.int64)
        nJ, k = len(J), len(S)
        XS = self.columns(S)
        t = self.t
        D = np.column_stack([np.ones(self.n), t, XS, t[:, None] * XS])
        yres = self.y - D @ dy
        pib = np.einsum("jpa,ja->jp", pi, beta)          # D-coefficients of the fitted x_j·β part
        out = np.zeros((nJ, 3)) if kind == "hc1" else np.zeros((n_clusters, nJ, 2))
        split = self.is_sparse_column(J)
        dense = np.nonzero(~split)[0]
        if len(dense):
            self._robust_dense(out, J, dense, D, yres, pi, beta, kind, n_clusters)
        if not split.any():
            return out
        for a in (0, 1):
            rows = t == a
            if not rows.any():
                continue
            Linv = linv[a]
            L = np.linalg.inv(Linv)
            q = np.column_stack([yres[rows], np.column_stack([np.ones(rows.sum()), XS[rows]]) @ Linv.T])
            kk = q.shape[1]

            def red(u):  # p-vector coefficients on D -> arm-a coefficients on the orthonormal basis v
                r = np.concatenate([u[:, :1] + a * u[:, 1:2], u[:, 2:2 + k] + a * u[:, 2 + k:]], axis=1)
                return r @ L

            ce = np.hstack([np.ones((nJ, 1)), red(pib)]) * split[:, None]
            c1 = np.hstack([np.zeros((nJ, 1)), -red(pi[:, :, 0])])
            c2 = np.hstack([np.zeros((nJ, 1)), -red(pi[:, :, 1])])
            if kind == "hc1":
                G4 = np.zeros((kk * kk, kk * kk))
                step = max(1, CHUNK // (kk * kk))
                for lo in range(0, q.shape[0], step):
                    qc = q[lo:lo + step]
                    Q2 = (qc[:, :, None] * qc[:, None, :]).reshape(len(qc), -1)
                    G4 += Q2.T @ Q2
                ME = (ce[:, :, None] * ce[:, None, :]).reshape(nJ, -1) @ G4
                for col, (u, v) in enumerate(((c1, c1), (c1, c2), (c2, c2))):
                    out[:, col] += _rowdot(ME, (u[:, :, None] * v[:, None, :]).reshape(nJ, -1))
            else:
                codes = self.codes[rows]
                onehot = sp.csr_matrix((np.ones(len(codes)), (codes, np.arange(len(codes)))),
                                       shape=(n_clusters, len(codes)))
                H = np.zeros((n_clusters, kk * kk))
                step = max(1, CHUNK // (kk * kk))
                for lo in range(0, q.shape[0], step):
                    qc = q[lo:lo + step]
                    H += onehot[:, lo:lo + step] @ (qc[:, :, None] * qc[:, None, :]).reshape(len(qc), -1)
                for col, c in enumerate((c1, c2)):
                    out[:, :, col] += H @ (ce[:, :, None] * c[:, None, :]).reshape(nJ, -1).T
        # non-zero rows of the split columns: true term minus the zero-row formula already counted
        where = np.nonzero(split)[0]
        for rows, p, x in self.entries(J[where]):
            p = where[p]
            d = D[rows]
            e0 = yres[rows] + _rowdot(d, pib[p])
            a0 = -_rowdot(d, pi[p, :, 0])
            b0 = -_rowdot(d, pi[p, :, 1])
            tx = t[rows] * x
            e1 = e0 - x * beta[p, 0] - tx * beta[p, 1]
            a1 = a0 + x
            b1 = b0 + tx
            if kind == "hc1":
                e1s, e0s = e1 * e1, e0 * e0
                for col, (u1, v1, u0, v0) in enumerate(((a1, a1, a0, a0), (a1, b1, a0, b0), (b1, b1, b0, b0))):
                    out[:, col] += np.bincount(p, e1s * u1 * v1 - e0s * u0 * v0, minlength=nJ)
            else:
                idx = self.codes[rows] * nJ + p
                for col, (u1, u0) in enumerate(((a1, a0), (b1, b0))):
                    out[:, :, col] += np.bincount(idx, e1 * u1 - e0 * u0,
                                                  minlength=n_clusters * nJ).reshape(n_clusters, nJ)
        return out

    def _robust_dense(self, out, J, pos, D, yres, pi, beta, kind, n_clusters):
        """Exact per-row HC1 meat / cluster scores of the candidates J[pos], read densely in column chunks."""
        t = self.t
        onehot = None
        if kind != "hc1":
            onehot = sp.csr_matrix((np.ones(self.n), (self.codes, np.arange(self.n))), shape=(n_clusters, self.n))
        step = max(1, DENSE_CHUNK // max(1, self.n))
        for lo in range(0, len(pos), step):
            c = pos[lo:lo + step]
            X = self.columns(J[c])                            # n x |c|
            TX = t[:, None] * X
            A1 = X - D @ pi[c, :, 0].T                        # residualized x_j
            B1 = TX - D @ pi[c, :, 1].T                       # residualized t x_j
            E1 = yres[:, None] - A1 * beta[c, 0] - B1 * beta[c, 1]   # = ỹ - x̃β, the full-regression residual
            if kind == "hc1":
                E1 *= E1
                EA = E1 * A1
                out[c, 0] += np.einsum("ij,ij->j", EA, A1)
                out[c, 1] += np.einsum("ij,ij->j", EA, B1)
                out[c, 2] += np.einsum("ij,ij->j", E1 * B1, B1)
            else:
                out[:, c, 0] += onehot @ (E1 * A1)
                out[:, c, 1] += onehot @ (E1 * B1)

    # ------------------------------------------------------------------ GCM statistics
    def fold_grams(self, S, n_folds, coef_m=None, e=None):
        """Per-fold Gram P_k'P_k and P_k'target of the poly2 basis of X_S. target = y, or the pseudo-outcome φ
        when the (cross-fitted) outcome-model coefficients coef_m are given."""
        P = poly2(self.columns(S))
        target = self.y if coef_m is None else self.pseudo_outcome(P, coef_m, e)
        q = P.shape[1]
        A = np.zeros((n_folds, q, q))
        b = np.zeros((n_folds, q))
        for k in range(n_folds):
            rows = self.folds == k
            Pk = P[rows]
            A[k] = Pk.T @ Pk
            b[k] = Pk.T @ target[rows]
        return {"A": A, "b": b}

    def pseudo_outcome(self, P, coef_m, e):
        m_hat = _rowdot(P, coef_m[self.folds])
        return (self.y - m_hat) * (self.t - e) / (e * (1.0 - e))

    def gcm_residual(self, S, coef_m, coef_g, e):
        """φ_res = φ - ĝ(X_S), both nuisances cross-fitted (row i uses its fold's out-of-fold coefficients)."""
        P = poly2(self.columns(S))
        return self.pseudo_outcome(P, coef_m, e) - _rowdot(P, coef_g[self.folds])

    def gcm_sums(self, S, f):
        """Sums that give, for every candidate j, Σ R_ij and Σ R_ij² with R = f · (x_j - C Π_j), C = [1, X_S]."""
        C = np.column_stack([np.ones(self.n), self.columns(S)])
        f2 = f * f
        FV = self.rmatvec(np.column_stack([f, f2[:, None] * C]))
        return {"Sf": FV[:, 0], "Sf2xC": FV[:, 1:], "Sf2x2": self.rmatvec(f2, square=True)[:, 0],
                "Cf": C.T @ f, "Cf2C": C.T @ (f2[:, None] * C)}
