"""NEXIS: forward/backward search for the direct effect modifiers of a randomized treatment.

For a candidate j and the already-selected set S, H0(j | S) says that j does not modify the effect of T given S.
The linear-family tests read the interaction coefficient γ_j of

    Y ~ 1 + T + Z_S + T·Z_S + Z_j + T·Z_j

through Frisch–Waugh–Lovell: with D = [1, T, Z_S, T·Z_S] and X_j = [Z_j, T·Z_j], every quantity of the
two-regressor OLS of the D-residualized Y on the D-residualized X_j follows from Gram blocks D'D, D'X_j, X_j'X_j,
D'y, X_j'y, y'y. Those are sums over rows built from (a) per-column moments, computed once, and (b) for each
selected s the cross-products F'x_s and F'(t x_s), computed once when s first enters S. A forward round therefore
costs O(nnz(Z)) for the new cross-products plus O(|S|² m) of small dense algebra, and every statistic is
additive over row partitions (see ``stats.Block``), which is what the Spark job reduces.

Variances: homoskedastic (t with n - k df, k = 2|S| + 4), HC2 (MacKinnon & White 1985) or the bias-corrected
cluster-robust CR0, both with Bell–McCaffrey degrees of freedom (Bell & McCaffrey 2002; Imbens & Kolesár 2016) and
not tested where a row's leverage is ≈ 1 or the df fall below MIN_DF (recorded in the trace).
GCM (Shah & Peters 2020): pseudo-outcome φ = (Y - m̂(Z_S))(T - e)/(e(1 - e)), residualized on Z_S with a
cross-fitted learner, times Z_j residualized linearly on [1, Z_S]; T = √n mean(R)/sd(R), normal p-value.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import scipy.sparse as sp
from scipy import stats as sstats
from scipy.linalg import lu_solve

from .nuisance import fold_factors, lgbm_crossfit, ridge_from_grams
from . import stats as _stats
from .stats import LEVERAGE_TOL, Block, basis_penalty, combine, spline_knots

TIE_RTOL = 1e-9        # |t| (or p) within this relative distance of the best is a tie; the smallest index wins
DEGENERATE_TOL = 1e-8  # share of a candidate left after residualizing on the design below this: skipped
CONSTANT_TOL = 1e-10   # within-arm variance share below this (overall for GCM): constant column, skipped
TESTS = ("linear", "hc2", "cluster", "gcm")
MIN_DF = 2.0           # robust tests: fewer Bell–McCaffrey degrees of freedom than this -> not tested ("few_df")
ADJUSTS = ("FWER", "FDR", None)
NUISANCES = ("spline", "poly2", "lgbm")            # GCM: learner of y and of the pseudo-outcome on Z_S
Z_NUISANCES = ("spline", "poly2", "linear", "lgbm")  # GCM: regression of each candidate Z_j on Z_S
LGBM_Z_MAX = 256       # z_nuisance="lgbm" fits K LightGBM models per candidate and conditioning set: small m only


# ============================================================================================== sources
class Source:
    """A set of row blocks; ``reduce`` sums a Block statistic over them (what a Spark job does with
    mapInPandas + a sum)."""

    def __init__(self, blocks: List[Block]):
        self.blocks = blocks
        b0 = blocks[0]
        self.mw, self.M = b0.mw, b0.M
        self.passes: List[Dict[str, Any]] = []  # one record per reduce (a pass over the rows): what, how long

    def reduce(self, method, *args, **kwargs):
        t0 = time.perf_counter()
        total = None
        for b in self.blocks:
            total = combine(total, getattr(b, method)(*args, **kwargs))
        self.passes.append(pass_record(method, args, time.perf_counter() - t0))
        return total


def pass_record(method, args, seconds) -> Dict[str, Any]:
    """{"stat": the Block statistic (``many``: its requests' names joined by "+", with the count), "seconds"}."""
    if method == "many":
        names = [r[0] for r in args[0]]
        stat = "+".join(sorted(set(names))) + f"x{len(names)}"
    else:
        stat = method if isinstance(method, str) else getattr(method, "__name__", "callable")
    return {"stat": stat, "seconds": round(float(seconds), 4)}


def pass_summary(passes) -> Dict[str, Any]:
    """Totals of a Source's pass records: ``passes``, ``pass_seconds`` and per statistic [count, seconds]."""
    by = {}
    for p in passes:
        c = by.setdefault(p["stat"], [0, 0.0])
        c[0] += 1
        c[1] = round(c[1] + p["seconds"], 3)
    return {"passes": len(passes), "pass_seconds": round(sum(p["seconds"] for p in passes), 3), "pass_by_stat": by}


def _inv2(A):
    """Inverses of a stack of 2 x 2 matrices in closed form (adjugate / determinant): what np.linalg.inv returns up
    to rounding, without a LAPACK call per matrix (≈ 10 ms per test call at 16,384 candidates, measured under
    load)."""
    a, b, c, d = A[:, 0, 0], A[:, 0, 1], A[:, 1, 0], A[:, 1, 1]
    det = a * d - b * c
    out = np.empty_like(A)
    out[:, 0, 0], out[:, 0, 1], out[:, 1, 0], out[:, 1, 1] = d / det, -b / det, -c / det, a / det
    return out


# ============================================================================================== tests
class Tester:
    """H0(j | S) tests for a batch of candidates, from additive statistics of a :class:`Source`.

    ``with_nnz``: True counts every column's non-zeros exactly (``nnz``); an int k >= 1 only as far as telling the
    columns with fewer than k non-zeros (``min_active``) from the others — ``nnz`` is exact below k and >= k
    otherwise, whatever the row partition (each block's count is exact below k, so a sum below k is exact) —
    which stops the counting once the columns have k (dense Z: per column; sparse Z: once all have); False: none
    (dense Z: ``nnz`` = n; sparse Z counts exactly)."""

    def __init__(self, source: Source, test="linear", n_clusters=0, n_folds=0, nuisance="spline", seed=0,
                 with_nnz=True, z_nuisance="spline"):
        self.src, self.test, self.G, self.K = source, test, n_clusters, n_folds
        self.nuisance, self.seed, self.z_nuisance = nuisance, seed, z_nuisance
        mom = source.reduce("moments", with_nnz, self.uses_spline)  # the ranges place spline knots only
        if not np.isfinite(mom["scal"]).all():
            raise ValueError("y contains NaN or infinite values (a NaN outcome is not a null: filter or impute it)")
        if not (np.isfinite(mom["lin"]).all() and np.isfinite(mom["sq"]).all()):
            raise ValueError("z or w contains NaN or infinite (or > 1e150) values")
        self.n, self.nt, self.sy, self.sty, self.syy = mom["scal"]
        self.s1, self.st, self.sxy, self.stxy = mom["lin"].T
        self.sxx, self.stxx = mom["sq"].T
        self.nnz = mom["nnz"]
        self.lo, self.hi = mom.get("min_nz"), mom.get("max_nz")
        self.e = self.nt / self.n
        self.P: Dict[int, np.ndarray] = {}  # s -> F'x_s
        self.Q: Dict[int, np.ndarray] = {}  # s -> F'(t x_s)
        self.hist: Dict[int, np.ndarray] = {}  # s -> histogram of x_s' non-zero values (spline knots)
        self.reasons: Dict[int, str] = {}   # candidate -> why the last call did not test it
        self._gcm_cache: Dict[tuple, Any] = {}
        self._empty_cache = None  # (candidates, (t, p, ok), reasons) of the latest test given S = ∅

    @property
    def uses_spline(self):
        return self.test == "gcm" and "spline" in (self.nuisance, self.z_nuisance)

    # ---------------------------------------------------------------- cached cross-products
    def ensure(self, S):
        """Cross-products F'x_s, F'(t x_s) of every s in S (once per feature); with a spline basis, in the same
        pass, the histogram of x_s' non-zero values that places its knots."""
        missing = [s for s in S if s not in self.P]
        if not missing:
            return
        if self.uses_spline:
            out = self.src.reduce("cross_hist", missing, self.lo[missing], self.hi[missing])
            R = out["cross"]
            for c, s in enumerate(missing):
                self.hist[s] = out["hist"][c]
        else:
            R = self.src.reduce("cross", missing)
        for c, s in enumerate(missing):
            self.P[s], self.Q[s] = R[:, 2 * c], R[:, 2 * c + 1]

    def basis_spec(self, S, kind):
        """The picklable description of the GCM basis ``kind`` ("spline" or "poly2") of the features S. Spline:
        per feature the zero indicator when it has zeros (its histogram counts fewer non-zeros than rows) and
        K knots at quantiles of its non-zero values, K = min(SPLINE_KNOTS, (SPLINE_BUDGET/|S| - 2)/2, nnz/
        KNOT_SPACING): at most ≈ SPLINE_BUDGET basis columns whatever |S|."""
        if kind == "poly2":
            return ("poly2",)
        cap = max(0, min(_stats.SPLINE_KNOTS, (_stats.SPLINE_BUDGET // max(1, len(S)) - 2) // 2))
        specs = self.__dict__.setdefault("_feature_specs", {})  # per (feature, cap): a function of its histogram
        for s in S:
            if (s, cap) not in specs:
                specs[(s, cap)] = (bool(self.hist[s].sum() < self.n),
                                   tuple(spline_knots(self.hist[s], self.lo[s], self.hi[s], cap)))
        return ("spline", tuple(specs[(s, cap)] for s in S))

    def constant_columns(self):
        """Boolean mask of columns constant within an arm (overall for GCM), incl. all-zero columns."""
        n, nt = self.n, self.nt
        if self.test == "gcm":
            parts = [(n, self.s1, self.sxx)]
        else:
            parts = [(n - nt, self.s1 - self.st, self.sxx - self.stxx), (nt, self.st, self.stxx)]
        bad = np.zeros(len(self.s1), bool)
        for cnt, s, ss in parts:
            msq = ss / cnt
            var = msq - (s / cnt) ** 2
            bad |= var <= CONSTANT_TOL * msq
        return bad

    def n_params(self, k):
        return k + 2 if self.test == "gcm" else 2 * k + 4

    def __call__(self, S, J):
        """(t, p, ok) arrays for candidates J given S; ok=False marks candidates collinear with the design."""
        S, J = list(S), np.asarray(J, dtype=np.int64)
        if not S:  # the first forward step and the marginal screen test the same candidates given S = ∅: once
            key = J.tobytes()
            if self._empty_cache is None or self._empty_cache[0] != key:
                tt, pp, ok = self._gcm(S, J) if self.test == "gcm" else self._linear(S, J)
                self._empty_cache = (key, (tt, pp, ok), dict(self.reasons))
            (tt, pp, ok), self.reasons = self._empty_cache[1], dict(self._empty_cache[2])
            return tt.copy(), pp.copy(), ok.copy()
        self.ensure(S)
        if self.test == "gcm":
            return self._gcm(S, J)
        return self._linear(S, J)

    def each_given_rest(self, S):
        """{j: (t, p, ok, reason)} for every j in S tested given S∖{j} — the backward step's |S| tests — with the
        passes over the rows batched: one reduce for all |S| robust meats (hc2 / cluster), two for all |S| GCM
        basis nuisances and sums (instead of 1 and 2 per j); none beyond the cross-products for the linear test.
        Each test's arithmetic is the single call's (``self([s for s in S if s != j], [j])``; GCM: with the sums of
        column j alone), so the results equal those of |S| separate calls — identical for the linear family, GCM to
        rounding (tests/identify/test_identify_passes.py)."""
        S = list(S)
        self.ensure(S)
        sets = [[s for s in S if s != j] for j in S]
        if self.test == "gcm":
            if self.nuisance in ("poly2", "spline") and self.z_nuisance != "lgbm":
                results = self._gcm_many(sets, [np.array([j]) for j in S])
            else:  # LightGBM nuisances: per-fold model fits per set, no additive pass to share
                results = []
                for rest, j in zip(sets, S):
                    tt, pp, ok = self(rest, np.array([j]))
                    results.append((tt, pp, ok, dict(self.reasons)))
        else:
            plans = [self._linear_plan(rest, np.array([j])) for rest, j in zip(sets, S)]
            reqs = [pl["request"] for pl in plans if pl["request"] is not None]
            got = iter(self.src.reduce("many", reqs) if reqs else [])
            results = [self._linear_finish(pl, next(got) if pl["request"] is not None else None) for pl in plans]
        out = {}
        for j, (tt, pp, ok, reasons) in zip(S, results):
            out[j] = (float(tt[0]), float(pp[0]), bool(ok[0]), "" if ok[0] else reasons.get(int(j), ""))
        return out

    # ---------------------------------------------------------------- linear family
    def _gram(self, S, J):
        k = len(S)
        p = 2 + 2 * k
        S_ = np.asarray(S, dtype=np.int64)
        DD = np.empty((p, p))
        DD[0, 0], DD[0, 1], DD[1, 1] = self.n, self.nt, self.nt
        DD[0, 2:2 + k], DD[0, 2 + k:] = self.s1[S_], self.st[S_]
        DD[1, 2:2 + k], DD[1, 2 + k:] = self.st[S_], self.st[S_]
        for a, s in enumerate(S):
            DD[2 + a, 2:2 + k] = self.P[s][S_]
            DD[2 + a, 2 + k:] = self.Q[s][S_]
            DD[2 + k + a, 2 + k:] = self.Q[s][S_]
        DD = np.triu(DD) + np.triu(DD, 1).T
        B = np.empty((p, len(J), 2))  # D'x_j, D'(t x_j)
        B[0, :, 0], B[1, :, 0] = self.s1[J], self.st[J]
        B[0, :, 1], B[1, :, 1] = self.st[J], self.st[J]
        for a, s in enumerate(S):
            B[2 + a, :, 0] = self.P[s][J]
            B[2 + k + a, :, 0] = self.Q[s][J]
            B[2 + a, :, 1] = self.Q[s][J]
            B[2 + k + a, :, 1] = self.Q[s][J]
        Dy = np.concatenate([[self.sy, self.sty], self.sxy[S_], self.stxy[S_]])
        return DD, B, Dy

    @staticmethod
    def _arm_basis(S, DD):
        """L_a⁻¹ for each arm a, with L_a L_a' the Gram of [1, X_S] over the arm's rows (read off D'D)."""
        k = len(S)
        i1 = np.r_[0, 2:2 + k]
        i2 = np.r_[1, 2 + k:2 + 2 * k]
        A1 = DD[np.ix_(i2, i2)]                   # treated rows: Σ t [1, x_S][1, x_S]'
        A0 = DD[np.ix_(i1, i1)] - A1              # control rows
        return [np.linalg.inv(np.linalg.cholesky(A)) for A in (A0, A1)]

    def _linear(self, S, J):
        plan = self._linear_plan(S, J)
        r = None if plan["request"] is None else self.src.reduce(*plan["request"])
        tstat, pval, ok, self.reasons = self._linear_finish(plan, r)
        return tstat, pval, ok

    def _linear_plan(self, S, J):
        """The driver algebra of the linear-family tests of J given S before any pass over the rows, and the
        ``request`` (Block method and arguments) of the one pass the robust variances need (None: linear)."""
        n, k = self.n, len(S)
        p = 2 + 2 * k
        DD, B, Dy = self._gram(S, J)
        nJ = len(J)
        sol = np.linalg.solve(DD, np.column_stack([B.reshape(p, -1), Dy]))
        pi = sol[:, :-1].reshape(p, nJ, 2)          # D-coefficients of x_j and t x_j
        dy = sol[:, -1]                               # D-coefficients of y
        XX = np.empty((nJ, 2, 2))
        XX[:, 0, 0], XX[:, 0, 1], XX[:, 1, 0], XX[:, 1, 1] = self.sxx[J], self.stxx[J], self.stxx[J], self.stxx[J]
        XXr = XX - np.einsum("pja,pjb->jab", B, pi)
        Xyr = np.column_stack([self.sxy[J], self.stxy[J]]) - np.einsum("pja,p->ja", B, dy)
        yyr = self.syy - Dy @ dy
        d0, d1 = XXr[:, 0, 0], XXr[:, 1, 1]
        with np.errstate(divide="ignore", invalid="ignore"):
            corr2 = XXr[:, 0, 1] ** 2 / (d0 * d1)
            ok = (d0 / XX[:, 0, 0] >= DEGENERATE_TOL) & (d1 / XX[:, 1, 1] >= DEGENERATE_TOL) \
                & (1.0 - corr2 >= DEGENERATE_TOL)
        ok &= np.isfinite(corr2)
        XXr[~ok] = np.eye(2)
        bread = _inv2(XXr)
        beta = np.einsum("jab,jb->ja", bread, Xyr)
        plan = dict(S=S, J=J, DD=DD, dy=dy, pi=pi, beta=beta, bread=bread, ok=ok, yyr=yyr, Xyr=Xyr, request=None)
        if self.test != "linear":
            plan["request"] = self._robust_request(plan)
        return plan

    def _linear_finish(self, plan, r):
        """(t, p, ok, reasons) of a :meth:`_linear_plan` given its pass's result ``r``."""
        S, J, beta, bread, ok = plan["S"], plan["J"], plan["beta"], plan["bread"], plan["ok"].copy()
        n, nJ, kk = self.n, len(J), 2 + 2 * len(S) + 2
        reasons = {int(j): "collinear" for j in J[~ok]}
        if self.test == "linear":
            rss = plan["yyr"] - np.einsum("ja,ja->j", plan["Xyr"], beta)
            V22 = rss / (n - kk) * bread[:, 1, 1]
            df = np.full(nJ, float(n - kk))
        else:
            V22, df, why = self._robust_finish(plan, r)
            for j, w in zip(J, why):
                if w:
                    reasons[int(j)] = w
            ok &= why == ""
        with np.errstate(divide="ignore", invalid="ignore"):
            tstat = beta[:, 1] / np.sqrt(V22)
        ok &= np.isfinite(tstat)
        tstat[~ok] = 0.0
        df = np.where(ok, df, 1.0)
        pval = 2.0 * sstats.t.sf(np.abs(tstat), df)
        pval[~ok] = 1.0
        return tstat, pval, ok, reasons

    def _robust_request(self, plan):
        """The one pass of additive sums (``Block.robust``) the robust variances of a :meth:`_linear_plan` need."""
        S, J, ok, bread = plan["S"], plan["J"], plan["ok"], plan["bread"]
        pij = np.transpose(plan["pi"], (1, 0, 2))
        plan["linv"] = linv = self._arm_basis(S, plan["DD"])
        args = (S, J, plan["dy"], pij, plan["beta"], bread, linv, self.test)
        if self.test == "cluster":
            args += (np.linalg.cholesky(np.where(ok[:, None, None], bread, np.eye(2))),)
        return ("robust",) + args

    def _robust_finish(self, plan, r):
        """(V22, df, reason) of the leverage-aware robust tests from one pass of additive sums (``Block.robust``).

        hc2: V = Σ a_i² e_i²/(1 - h_i) (HC2; MacKinnon & White 1985), unbiased under homoskedasticity.
        cluster: V = c · Σ_g (a_g'e_g)² (CR0) with c = Σ a_i² / tr(MA), the factor that makes it unbiased under
        homoskedastic independent errors (CR1S' G/(G-1)·(n-1)/(n-k) is a constant stand-in for it).
        Both: t with the Bell–McCaffrey degrees of freedom (Bell & McCaffrey 2002; Imbens & Kolesár 2016),
        df = tr(MA)² / tr(MAMA) under Ω = σ²I, exact (no approximation beyond the Satterthwaite one). A candidate
        is not tested (reason) when a row has leverage ≈ 1 ("leverage"; cluster: tr(MA) ≈ 0, the coefficient is
        identified within clusters whose residuals are ≈ 0) or df < MIN_DF ("few_df")."""
        J, bread, ok = plan["J"], plan["bread"], plan["ok"]
        nJ = len(J)
        b22 = bread[:, 1, 1]                                     # Σ a_i² = tr(MA) + tr(HA)
        why = np.full(nJ, "", dtype=object)
        if self.test == "hc2":
            XAX = np.stack([r["XAX"][:, 0], r["XAX"][:, 1], r["XAX"][:, 1], r["XAX"][:, 2]], 1).reshape(nJ, 2, 2)
            BX = np.einsum("jab,jbc->jac", bread, XAX)
            tr_x = np.einsum("jab,jba->j", BX, BX)                                   # tr(H_X A H_X A)
            tr_dx = sum(np.einsum("jab,jbl,jal->j", bread, r["XAV"][:, :, arm], r["XAV"][:, :, arm])
                        for arm in (0, 1))                                            # tr(H_D A H_X A)
            tr_d = (r["VAV"] ** 2).sum((1, 2))                                       # tr(H_D A H_D A)
            tr_mama = r["a2h"] + tr_d + 2.0 * tr_dx + tr_x
            V22 = r["meat"]
            trMA = b22
            why[r["n_lev"] > 0] = "leverage"
        else:
            trHA = np.einsum("jdd->j", r["UU"])
            trMA = b22 - trHA
            tr_mama = r["a4"] - 2.0 * r["a2u2"] + (r["UU"] ** 2).sum((1, 2))
            with np.errstate(divide="ignore", invalid="ignore"):
                V22 = r["meat"] * b22 / trMA
            why[(trMA <= LEVERAGE_TOL * b22) & (why == "")] = "leverage"
        with np.errstate(divide="ignore", invalid="ignore"):
            df = trMA ** 2 / tr_mama
        why[(~(df >= MIN_DF)) & (why == "")] = "few_df"
        why[~ok] = ""                                             # collinear: recorded as such by the caller
        return V22, df, why

    # ---------------------------------------------------------------- GCM
    def _gcm_residual(self, S):
        """The fitted outcome-side nuisances for S: ("basis", spec, m coefficients, g coefficients) for the
        additive ridges (one pass: per-fold Grams with y and with the φ weights), or ("resid", φ_res) for LightGBM in
        memory. φ = (y - m̂(Z_S))(T - e)/(e(1 - e)), φ_res = φ - ĝ(Z_S), both m̂ and ĝ cross-fitted."""
        key = tuple(S)
        if key not in self._gcm_cache:
            if self.nuisance in ("poly2", "spline"):
                f = self._basis_residuals([S])[0]
            else:
                if len(self.src.blocks) != 1:
                    raise ValueError("nuisance='lgbm' runs in memory only (one block); use 'spline' distributed")
                b = self.src.blocks[0]
                XS = b.columns(S)
                m_hat = lgbm_crossfit(XS, b.y, b.folds, self.K, self.seed)
                phi = (b.y - m_hat) * (b.t - self.e) / (self.e * (1 - self.e))
                f = ("resid", phi - lgbm_crossfit(XS, phi, b.folds, self.K, self.seed))
            self._gcm_cache = {key: f}  # only the latest S is reused (forward steps re-test it)
        return self._gcm_cache[key]

    def _basis_residuals(self, sets):
        """The additive-ridge nuisances ("basis", spec, m coefficients, g coefficients) of each conditioning set in
        ``sets``: one pass for all of them (per-fold Grams of the basis with y and the φ weights: both ridges), each
        set's fit as alone."""
        specs = [self.basis_spec(S, self.nuisance) for S in sets]
        grams = self.src.reduce("many", [("fold_grams_both", S, self.K, spec, self.e)
                                         for S, spec in zip(sets, specs)])
        out = []
        self._factors = {}  # this batch's ridge factors: the candidates' ridge on the same basis reuses them
        for S, spec, g in zip(sets, specs, grams):
            pen = basis_penalty(spec, g["A"].sum(0))
            lu = self._fold_factors(S, spec, g["A"], pen)
            cm = ridge_from_grams(g["A"], g["b"], pen, lu)
            b_phi = g["bc"] - np.einsum("kqr,kr->kq", g["Ac"], cm)  # fold k's P_k'φ (Block.fold_grams_both)
            out.append(("basis", spec, cm, ridge_from_grams(g["A"], b_phi, pen, lu)))
        return out

    def _fold_factors(self, S, spec, A, pen):
        """``nuisance.fold_factors`` of the per-fold Grams A of S's basis ``spec``, kept for the batch of sets of
        the latest :meth:`_basis_residuals`: the ridge of every candidate on that basis (``_gcm_from_sums``) solves
        with the same matrices (kept only when the Grams and penalty are equal)."""
        key = (tuple(int(s) for s in S), spec)
        cache = self.__dict__.setdefault("_factors", {})
        hit = cache.get(key)
        if hit is None or not (np.array_equal(hit[0], A) and np.array_equal(hit[1], pen)):
            hit = cache[key] = (A, pen, fold_factors(A, pen))
        return hit[2]

    def _gcm_many(self, sets, Js):
        """[(t, p, ok, reasons)] of the candidates Js[i] given sets[i], additive-ridge nuisances: two passes for
        all the sets together (:meth:`_basis_residuals`, then every set's GCM sums in one pass)."""
        fs = self._basis_residuals(sets)
        Js = [np.asarray(J, dtype=np.int64) for J in Js]
        sums = self.src.reduce("many", [("gcm_block_sums", S, f, self.e, self.z_spec(S), self.K, J)
                                        for S, f, J in zip(sets, fs, Js)])  # the tested columns' sums only
        out = []
        for S, J, sm in zip(sets, Js, sums):
            tt, pp, ok = self._gcm_from_sums(S, J, sm, local=True)
            out.append((tt, pp, ok, dict(self.reasons)))
        return out

    def z_spec(self, S):
        """How each candidate Z_j is residualized on Z_S: ("linear",) in-sample OLS on [1, Z_S]; a basis spec for
        the cross-fitted ridge on that basis; ("lgbm",) per-candidate cross-fitted LightGBM (in memory)."""
        if self.z_nuisance in ("linear", "lgbm"):
            return (self.z_nuisance,)
        return self.basis_spec(S, self.z_nuisance)

    def _gcm_sums(self, S, f):
        """The additive GCM sums given S's fitted nuisance ``f`` (a Spark tester reduces them over partitions)."""
        zs = self.z_spec(S)
        if zs[0] == "lgbm":
            zs = ("linear",)  # the LightGBM Z residuals are formed in memory (``_gcm``); these sums serve φ_res only
        if f[0] == "basis":
            return self.src.reduce("gcm_block_sums", S, f, self.e, zs, self.K)
        return self.src.blocks[0].gcm_sums(S, f[1], zs, self.K)

    def _gcm(self, S, J):
        f = self._gcm_residual(S)
        zs = self.z_spec(S)
        if zs[0] == "lgbm":
            return self._gcm_lgbm_z(S, J, f)
        return self._gcm_from_sums(S, J, self._gcm_sums(S, f))

    def _gcm_from_sums(self, S, J, sums, local=False):
        """(t, p, ok) of the GCM tests of J given S from the additive sums of :meth:`_gcm_sums` (``local``: the
        column sums hold J's columns only, in J's order — ``Block.gcm_sums(cols=J)``)."""
        zs = self.z_spec(S)
        xx = self.sxx[J]
        at = np.arange(len(J)) if local else J  # where J's rows are in the column sums
        Pi, zz_lin = self._linear_z(S, J)
        if zs[0] == "linear":
            zz = zz_lin
            sR = sums["Sf"][at] - sums["Cf"] @ Pi
            sR2 = sums["Sf2x2"][at] - 2 * np.einsum("jk,kj->j", sums["Sf2xC"][at], Pi) \
                + np.einsum("kj,kl,lj->j", Pi, sums["Cf2C"], Pi)
        else:
            # cross-fitted ridge of x_j on the basis: Π_j^(k) = (A - A_k + Λ)⁻¹ (B'x_j - B_k'x_j), per fold k
            A, SB, SfB = sums["A"], sums["SB"][at], sums["SfB"][at]  # K x q x q, |J| x K x q (both)
            At, SBt = A.sum(0), SB.sum(1)
            pen = basis_penalty(zs, At)
            zz, sR, sR2 = xx.copy(), sums["Sf"][at].copy(), sums["Sf2x2"][at].copy()
            lu = self._fold_factors(S, zs, A, pen)
            for kf in range(self.K):
                Pi = lu_solve(lu[kf], (SBt - SB[:, kf]).T)                      # q x |J|
                c = SB[:, kf].T                                                  # B_k'x_j: q x |J|
                zz += np.einsum("qj,qj->j", A[kf] @ Pi, Pi) - 2 * np.einsum("qj,qj->j", c, Pi)
                sR -= sums["Bf"][kf] @ Pi
                sR2 += np.einsum("qj,qj->j", sums["Bf2B"][kf] @ Pi, Pi) \
                    - 2 * np.einsum("qj,qj->j", SfB[:, kf].T, Pi)
        return self._gcm_stat(J, sR, sR2, np.minimum(zz, zz_lin), xx)

    def _linear_z(self, S, J):
        """(Π, Σ residual²) of the in-sample OLS of every candidate on C = [1, Z_S], from the Gram blocks: the
        ``linear`` residualization, and for every option the collinearity check (a candidate that is a linear
        function of Z_S — a copy of a selected feature — is not tested)."""
        k, S_ = len(S), np.asarray(S, dtype=np.int64)
        CC = np.empty((k + 1, k + 1))
        CC[0, 0] = self.n
        CC[0, 1:] = CC[1:, 0] = self.s1[S_]
        for a, s in enumerate(S):
            CC[1 + a, 1:] = self.P[s][S_]
        Cx = np.vstack([self.s1[J]] + [self.P[s][J] for s in S])  # (k+1) x |J|
        Pi = np.linalg.solve(CC, Cx)
        return Pi, self.sxx[J] - np.einsum("kj,kj->j", Cx, Pi)

    def _gcm_stat(self, J, sR, sR2, zz, xx):
        """T = √n mean(R)/sd(R) from Σ R and Σ R², two-sided normal p; Z_res share below DEGENERATE_TOL (or sd
        0): not tested ("collinear")."""
        n = self.n
        with np.errstate(divide="ignore", invalid="ignore"):
            ok = zz / xx >= DEGENERATE_TOL
        mean = sR / n
        var = sR2 / n - mean ** 2
        with np.errstate(divide="ignore", invalid="ignore"):
            tstat = np.sqrt(n) * mean / np.sqrt(var)
        ok &= (var > 0) & np.isfinite(tstat)
        self.reasons = {int(j): "collinear" for j in J[~ok]}
        tstat[~ok] = 0.0
        pval = 2.0 * sstats.norm.sf(np.abs(tstat))
        pval[~ok] = 1.0
        return tstat, pval, ok

    def _gcm_lgbm_z(self, S, J, f):
        """z_nuisance="lgbm": each candidate residualized by its own cross-fitted LightGBM on Z_S (in memory; K
        fits per candidate and conditioning set, hence LGBM_Z_MAX)."""
        if len(self.src.blocks) != 1:
            raise ValueError("z_nuisance='lgbm' runs in memory only (one block); use 'spline' distributed")
        b = self.src.blocks[0]
        phi_res = f[1] if f[0] == "resid" else b.gcm_residual(S, f[1], f[2], f[3], self.e)
        XS = b.columns(S)
        sR, sR2, zz = np.zeros(len(J)), np.zeros(len(J)), np.zeros(len(J))
        for c, j in enumerate(J):
            x = b.columns([j])[:, 0]
            zr = x - lgbm_crossfit(XS, x, b.folds, self.K, self.seed)
            R = phi_res * zr
            sR[c], sR2[c], zz[c] = R.sum(), (R * R).sum(), zr @ zr
        return self._gcm_stat(J, sR, sR2, np.minimum(zz, self._linear_z(S, J)[1]), self.sxx[J])


def _gcm_block_sums(self, S, f, e, zspec, n_folds, cols=None):
    return self.gcm_sums(S, self.gcm_residual(S, f[1], f[2], f[3], e), zspec, n_folds, cols)


Block.gcm_block_sums = _gcm_block_sums


# ============================================================================================== gates
def bh_reject(p, alpha, family=None):
    """Benjamini–Hochberg step-up rejections at level alpha.

    ``family`` (>= len(p)): the size of the whole family of hypotheses when only ``p`` are tested now and the rest
    later (the W-phase of the search); the untested ones count as p = 1, so these rejections are a subset of what
    BH over the whole family would reject."""
    p = np.asarray(p, float)
    m = len(p)
    if m == 0:
        return np.zeros(0, bool)
    fam = m if family is None else max(int(family), m)
    srt = np.sort(p)
    ok = np.nonzero(srt <= alpha * np.arange(1, m + 1) / fam)[0]
    if not len(ok):
        return np.zeros(m, bool)
    return p <= srt[ok.max()]


def bh_adjust(p):
    """BH-adjusted p-values (q-values): q_(i) = min_{k >= i} m p_(k) / k."""
    p = np.asarray(p, float)
    m = len(p)
    if m == 0:
        return p.copy()
    order = np.argsort(p, kind="stable")
    srt = p[order]
    q = np.minimum.accumulate((m * srt / np.arange(1, m + 1))[::-1])[::-1]
    # ties share the q-value of their largest rank
    out = np.empty(m)
    uniq, inv = np.unique(srt, return_inverse=True)
    tiedmin = np.full(len(uniq), np.inf)
    np.minimum.at(tiedmin, inv, q)
    out[order] = np.minimum(tiedmin[inv], 1.0)
    return out


def _pick(ids, score):
    """Smallest id among those whose score is within TIE_RTOL of the maximum."""
    best = score.max()
    return int(np.min(ids[score >= best * (1 - TIE_RTOL)]))


# ============================================================================================== result
@dataclass
class NexisResult:
    """Outcome of :func:`nexis`.

    ``selected`` / ``selected_w``: column indices of z / w in the final set, in order of addition;
    ``pvalues``/``tstats`` (and ``_w``): each selected feature's test given all the others, p(j | S∖{j});
    ``trace``: every decision (skip, add, stop with the gate that stopped it, drop) with its statistics.
    """

    selected: np.ndarray
    selected_w: np.ndarray
    pvalues: np.ndarray
    tstats: np.ndarray
    pvalues_w: np.ndarray
    tstats_w: np.ndarray
    round_added: np.ndarray
    round_added_w: np.ndarray
    trace: List[Dict[str, Any]]
    converged: bool
    params: Dict[str, Any] = field(default_factory=dict)
    passes: Dict[str, Any] = field(default_factory=dict)  # identify stage: pass_summary of the search + screen

    @property
    def skipped(self) -> Dict[int, str]:
        """Global column id -> reason for the columns never tested (W first, then Z)."""
        return {r["feature"]: r["reason"] for r in self.trace if r["action"] == "skip"}


# ============================================================================================== validation
def _validate(y, t, z, w, cluster, folds, test, adjust, alpha, rho, n_folds, max_rounds, nuisance,
              z_nuisance="spline"):
    if test == "hc1":
        raise ValueError("test='hc1' is not offered: HC1 is anti-conservative on sparse codes (a null FWER of 0.88 "
                         "at alpha 0.05, docs/validation.md); use test='hc2' (leverage-aware, Bell-McCaffrey df)")
    if test not in TESTS:
        raise ValueError(f"test must be one of {TESTS}, got {test!r}")
    if adjust not in ADJUSTS:
        raise ValueError(f"adjust must be one of {ADJUSTS}, got {adjust!r}")
    if nuisance not in NUISANCES:
        raise ValueError(f"nuisance must be one of {NUISANCES}, got {nuisance!r}")
    if z_nuisance not in Z_NUISANCES:
        raise ValueError(f"z_nuisance must be one of {Z_NUISANCES}, got {z_nuisance!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if rho is not None and rho < 0:
        raise ValueError(f"rho must be >= 0 or None, got {rho}")
    if max_rounds < 1:
        raise ValueError(f"max_rounds must be >= 1, got {max_rounds}")
    y = np.asarray(y, dtype=float).ravel()
    t_raw = np.asarray(t).ravel()
    n = len(y)
    if len(t_raw) != n:
        raise ValueError(f"y has {n} rows but t has {len(t_raw)}")
    if z is not None and not sp.issparse(z):
        z = np.asarray(z, dtype=float)
    if z is None or z.ndim != 2 or z.shape[0] != n:
        raise ValueError(f"z must be a 2-d array or sparse matrix with {n} rows, got shape {getattr(z, 'shape', None)}")
    if not np.isfinite(y).all():
        raise ValueError("y contains NaN or infinite values")
    t = t_raw.astype(float)
    if not np.isfinite(t).all() or not np.isin(t, (0.0, 1.0)).all():
        raise ValueError("t must be a 0/1 treatment indicator without NaN")
    nt = int(t.sum())
    if nt == 0 or nt == n:
        raise ValueError("t has a single treatment arm; the effect modification is not identified")
    if n < 8 or min(nt, n - nt) < 2:
        raise ValueError(f"n too small for the design: n={n}, treated={nt} (need n >= 8 and >= 2 per arm)")
    # finiteness of z and w is checked on their column sums (one pass, in Tester)
    if w is not None:
        w = np.asarray(w, dtype=float)
        w = w.reshape(n, -1) if w.ndim == 1 else w
        if w.shape[0] != n:
            raise ValueError(f"w must have {n} rows, got {w.shape[0]}")
    codes, G = None, 0
    if test == "linear" and cluster is not None:
        raise ValueError("test='linear' assumes independent units, but cluster ids were given: its homoskedastic "
                         "variance ignores within-cluster correlation (null FWER 0.108 at alpha 0.05 on clustered "
                         "units, docs/validation.md); use test='cluster' (cluster-robust), or pass no cluster ids "
                         "to assert that the units are independent")
    if test == "cluster":
        if cluster is None:
            raise ValueError("test='cluster' needs cluster ids")
        cluster = np.asarray(cluster).ravel()
        if len(cluster) != n:
            raise ValueError(f"cluster has {len(cluster)} rows, expected {n}")
        if cluster.dtype.kind == "f" and not np.isfinite(cluster).all():
            raise ValueError("cluster contains NaN")
        _, codes = np.unique(cluster, return_inverse=True)
        G = int(codes.max()) + 1
        if G < 2:
            raise ValueError("test='cluster' needs at least 2 clusters")
    fold_ids = None
    if test == "gcm":
        if folds is not None:
            folds = np.asarray(folds).ravel()
            if len(folds) != n:
                raise ValueError(f"folds has {len(folds)} rows, expected {n}")
            uniq, fold_ids = np.unique(folds, return_inverse=True)
            n_folds = len(uniq)
        else:
            if n_folds < 2 or n_folds > n:
                raise ValueError(f"n_folds must be in [2, n], got {n_folds}")
        if n_folds < 2:
            raise ValueError("GCM cross-fitting needs at least 2 folds")
    return y, t, z, w, codes, G, fold_ids, n_folds


def make_folds(n, n_folds, seed=0):
    """Fold ids 0..K-1 of a seeded random permutation (balanced sizes)."""
    return np.random.default_rng(seed).permutation(n) % n_folds


def _prepare(y, t, z, w, cluster, folds, test, adjust, alpha, rho, n_folds, max_rounds, nuisance, seed, n_blocks=1,
             z_nuisance="spline"):
    given_folds = folds is not None
    y, t, z, w, codes, G, fold_ids, K = _validate(y, t, z, w, cluster, folds, test, adjust, alpha, rho,
                                                   n_folds, max_rounds, nuisance, z_nuisance)
    if test == "gcm" and z_nuisance == "lgbm" and z.shape[1] + (0 if w is None else w.shape[1]) > LGBM_Z_MAX:
        raise ValueError(f"z_nuisance='lgbm' fits K LightGBM models per candidate and conditioning set: at most "
                         f"{LGBM_Z_MAX} columns; use z_nuisance='spline'")
    if test == "gcm" and not given_folds:
        fold_ids = make_folds(len(y), K, seed)
    blocks = []
    n = len(y)
    zz = z.tocsr() if (sp.issparse(z) and n_blocks > 1) else z
    if codes is not None:   # the cluster statistics need whole clusters in a block (Block.robust)
        parts = [np.nonzero(codes % n_blocks == b)[0] for b in range(n_blocks)]
    else:  # contiguous row ranges: slices, so a dense z is viewed, never copied (20,000 x 4,096: 2.2 s, 655 MB)
        edges = np.linspace(0, n, n_blocks + 1).astype(int)
        parts = [slice(lo, hi) for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo]
    for sl in parts:
        if isinstance(sl, np.ndarray) and not len(sl):
            continue
        whole = isinstance(sl, slice) and sl.start == 0 and sl.stop == n
        # one block of all rows: z itself (slicing a sparse matrix copies it: ≈ 3 passes at 1M x 16,384)
        blocks.append(Block(y[sl], t[sl], None if w is None else w[sl], zz if whole else zz[sl],
                            None if codes is None else codes[sl], None if fold_ids is None else fold_ids[sl]))
    mw = 0 if w is None else w.shape[1]
    return Source(blocks), G, K, mw


# ============================================================================================== search
class Search:
    """Stepwise forward (Gate 1 + Gate 2) / backward selection to a fixed point, recording every decision.

    A round: forward steps until Gate 1 or Gate 2 stops (or an addition makes a selected feature removable), then
    backward elimination. With ``backward`` on, every addition that leaves |S| >= 2 is followed at once by the
    backward rule on the new set (one batched given-rest pass, :meth:`given_rest`): a selected feature that
    carries no signal once the new one is in (a proxy that entered first on its stronger marginal signal) is
    dropped before the next forward step, so no further candidate is ever tested given a set that still holds
    it; a drop ends the round. A check that drops nothing is recorded as ``keep`` (the largest p given the rest).

    Gate-2 probe: when Gate 2 would stop at a candidate c that passed Gate 1 given S, the backward rule is
    evaluated on S ∪ {c} (the same pass the addition would cost); if it drops some s ≠ c, Gate 2 does not stand:
    c is added (trace ``reason: gate2_probe``) and s dropped — a swap. Otherwise Gate 2 stands (``stop_gate2``
    with the probe's p-values).

    Why neither spends α: every addition is still a Gate-1 rejection (Bonferroni / BH over the candidates given
    S), c included — Gate 2 is a stopping rule on top of Gate 1 that can only withhold additions, and the probe
    lifts it only for a candidate Gate 1 admitted; the checks only remove features. Under the global null the
    search is unchanged (the first addition is its only possible error; the checks and Gate 2 act after it).
    The check after each addition removes a source of error instead: forward steps given a set holding a
    removable proxy, whose Bonferroni family is one more chance of a false addition (docs/validation.md,
    "Calibration designs"). Termination: a drop ends the round and rounds are bounded by ``max_rounds``."""

    def __init__(self, tester: Tester, mw, alpha, adjust, rho, backward, max_rounds, on_decision=None):
        self.T, self.mw = tester, mw
        self.on_decision = on_decision  # called with each trace record as it is made (progress display)
        self.alpha, self.adjust, self.rho, self.backward, self.max_rounds = alpha, adjust, rho, backward, max_rounds
        self.S: List[int] = []
        self.t_add: Dict[int, float] = {}
        self.added_in: Dict[int, tuple] = {}
        self.trace: List[Dict[str, Any]] = []
        self._rest_cache: Dict[tuple, Any] = {}  # given_rest of the latest two sets (the probe's and S)

    def _rec(self, phase, rnd, step, action, feature=None, **kw):
        r = {"phase": phase, "round": rnd, "step": step, "action": action, "feature": feature,
             "kind": None if feature is None else ("W" if feature < self.mw else "Z"),
             "index": None if feature is None else (feature if feature < self.mw else feature - self.mw)}
        r.update(kw)
        self.trace.append(r)
        if self.on_decision is not None:
            self.on_decision(r, list(self.S))

    def _forward_step(self, candidates, phase, rnd, deferred=0):
        """One forward step over ``candidates``: "add", "stop", or "dropped" (an addition after which the backward
        check dropped a feature: the round's forward part ends). ``deferred``: candidates of the same Gate-1
        family that this phase does not test (the neurons, during the W-phase): they enlarge the family, see
        :meth:`run_phase`."""
        S = self.S
        n = self.T.n
        if n - self.T.n_params(len(S)) < 1:
            self._rec(phase, rnd, "forward", "stop_df", reason=f"n={int(n)} leaves no residual df with |S|={len(S)}")
            return "stop"
        inS = np.zeros(self.T.M if hasattr(self.T, "M") else len(self.T.s1), bool)
        inS[S] = True
        J = candidates[~inS[candidates]]
        tstat, pval, ok = self.T(S, J) if len(J) else (np.zeros(0), np.zeros(0), np.zeros(0, bool))
        Jt, tt, pt = J[ok], tstat[ok], pval[ok]
        R = len(Jt)
        why = self.T.reasons if len(J) else {}
        coll = [int(j) for j in J[~ok] if why.get(int(j), "collinear") == "collinear"]
        base = dict(n_candidates=int(len(J)), n_tested=int(R), n_collinear=len(coll), collinear=coll[:100],
                    n_family=int(R + deferred))
        untrusted = {}
        for j in J[~ok]:
            if why.get(int(j), "collinear") != "collinear":
                untrusted.setdefault(why[int(j)], []).append(int(j))
        if untrusted:  # robust tests: columns whose variance cannot be trusted given S (leverage ≈ 1, few df)
            base["not_tested"] = {r: ids[:100] for r, ids in untrusted.items()}
            base["n_not_tested"] = int(sum(len(ids) for ids in untrusted.values()))
        if R == 0:
            self._rec(phase, rnd, "forward", "stop_empty", **base)
            return "stop"
        if self.adjust == "FWER":
            thr = self.alpha / (R + deferred)
            elig = pt <= thr
        elif self.adjust == "FDR":
            elig = bh_reject(pt, self.alpha, R + deferred)
            thr = float(pt[elig].max()) if elig.any() else 0.0
        else:
            thr = self.alpha
            elig = pt <= thr
        at = np.abs(tt)
        if not elig.any():
            i = int(np.argmin(pt))
            self._rec(phase, rnd, "forward", "stop_gate1", best_feature=int(Jt[i]), t=float(tt[i]), p=float(pt[i]),
                      threshold=float(thr), n_eligible=0, **base)
            return "stop"
        best = _pick(Jt[elig], at[elig])
        i = int(np.nonzero(Jt == best)[0][0])
        ref = min(self.t_add[s] for s in S) if S else None
        gate = dict(t=float(tt[i]), p=float(pt[i]), threshold=float(thr), n_eligible=int(elig.sum()),
                    gate2_ref=ref, rho=self.rho, **base)
        if self.rho is not None and ref is not None and at[i] < self.rho * ref:
            swap, probe = self._probe(best)
            if not swap:
                self._rec(phase, rnd, "forward", "stop_gate2", best, **gate, **probe)
                return "stop"
            gate.update(reason="gate2_probe", **probe)
        S.append(best)
        self.t_add[best] = float(at[i])
        self.added_in[best] = (phase, rnd)
        self._rec(phase, rnd, "forward", "add", best, **gate)
        if self.backward and len(S) >= 2 and self._backward(phase, rnd, check=True):
            return "dropped"
        return "add"

    def _backward_drops(self, S, res):
        """The backward rule on the set ``S`` given its given-rest tests ``res``: (the features it drops now, the
        threshold). FWER: the one with the largest p if that p > α/|S|; FDR: those Benjamini–Hochberg does not
        reject; None: the largest p if > α."""
        S = np.array(S)
        ps = np.array([res[int(j)][1] for j in S])
        if self.adjust == "FDR":
            return [int(j) for j in S[~bh_reject(ps, self.alpha)]], self.alpha
        thr = self.alpha / len(S) if self.adjust == "FWER" else self.alpha
        return ([_pick(S, ps)] if ps.max() > thr else []), thr

    def _probe(self, c):
        """Gate-2 probe of candidate ``c``: the backward rule on S ∪ {c} (one batched given-rest pass, kept for the
        check after the addition). Returns (True when it drops some s ≠ c and keeps c: Gate 2 does not stand;
        the probe's trace fields). Without backward elimination there is nothing to swap: Gate 2 stands."""
        if not self.backward:
            return False, {}
        T = list(self.S) + [int(c)]
        res = self._given_rest_of(T)
        drop, thr = self._backward_drops(T, res)
        info = dict(probe_threshold=float(thr), probe_p={int(j): float(res[j][1]) for j in T})
        if not drop or c in drop:
            return False, dict(probe="gate2_stands", **info)
        return True, dict(probe="swap", probe_drop=[int(j) for j in drop], **info)

    def given_rest(self):
        """(t, p, testable, reason) of each selected feature given all the others; an untestable one has p = 1
        (so backward elimination drops it, with the reason recorded). The |S| tests share their passes
        (``Tester.each_given_rest``); the results of the latest two sets are kept, so a backward step after a
        check (or a probe) of the same set, and the final report, cost no pass."""
        return self._given_rest_of(self.S)

    def _given_rest_of(self, S):
        key = tuple(S)
        if key not in self._rest_cache:
            if len(self._rest_cache) >= 2:
                self._rest_cache.pop(next(iter(self._rest_cache)))
            self._rest_cache[key] = self.T.each_given_rest(list(S))
        return dict(self._rest_cache[key])

    def _backward(self, phase, rnd, check=False):
        """Backward elimination to a fixed point; True when it dropped a feature. ``check``: the check right after
        an addition, recorded as ``keep`` (the feature with the largest p) when it drops nothing."""
        dropped = False
        while self.S:
            res = self.given_rest()
            S = list(self.S)
            drop, thr = self._backward_drops(S, res)
            if not drop:
                if check and not dropped:
                    ps = np.array([res[j][1] for j in S])
                    j = _pick(np.array(S), ps)
                    self._rec(phase, rnd, "backward", "keep", j, t=res[j][0], p=res[j][1], threshold=float(thr),
                              set_size=int(len(S)))
                break
            for j in drop:
                self.S.remove(j)
                del self.t_add[j]
                extra = {"reason": res[j][3]} if res[j][3] else {}
                self._rec(phase, rnd, "backward", "drop", j, t=res[j][0], p=res[j][1], threshold=float(thr),
                          set_size=int(len(S)), **extra)
            dropped = True
        return dropped

    def run_phase(self, candidates, phase, deferred=0):
        """Forward/backward rounds over ``candidates`` to a fixed point (a round with no drop).

        One α for the whole search: the W-phase tests only the covariates, but its Gate 1 counts the ``deferred``
        neurons of the joint search in its family (Bonferroni α/(R + deferred); BH with the untested ones at p = 1).
        Under the global null the first addition is the search's only possible error, and it is then a rejection
        of one Bonferroni (BH) family over all W ∪ Z candidates given S = ∅ — so the W-phase spends no α of its
        own (tests/identify/test_identify_truth.py::test_w_phase_spends_no_extra_alpha)."""
        candidates = np.asarray(candidates, dtype=np.int64)
        for rnd in range(1, self.max_rounds + 1):
            while (status := self._forward_step(candidates, phase, rnd, deferred)) == "add":
                pass
            if status == "dropped":
                continue
            if not (self.backward and self._backward(phase, rnd)):
                return True
        self._rec(phase, self.max_rounds, "backward", "max_rounds")
        return False


# ============================================================================================== API
def nexis(y, t, z, w=None, alpha=0.05, test="gcm", adjust="FWER", rho=0.5, backward=True, cluster=None,
          nuisance="spline", n_folds=5, max_rounds=20, folds=None, seed=0, min_active=20, z_nuisance="spline",
          _n_blocks=1) -> NexisResult:
    """Select the direct effect modifiers of a randomized treatment t on y among the columns of z (and w).

    Parameters
    ----------
    y, t : (n,) outcome and 0/1 treatment.
    z : (n, m) dense array or scipy.sparse matrix of candidate modifiers (never densified).
    w : optional (n, mw) structured covariates, searched first (W-phase, in one Gate-1 family with z).
    alpha : level of Gate 1 and of the backward step.
    test : "gcm" (generalised covariance measure, model-free; the default, as in the identify stage), "linear"
        (homoskedastic t; independent units: refused with ``cluster`` ids), "hc2" (HC2 variance, Bell–McCaffrey df;
        not cluster-robust) or "cluster" (bias-corrected CR0, Bell–McCaffrey df, needs ``cluster``).
    adjust : Gate 1: "FWER" (Bonferroni over the remaining candidates), "FDR" (Benjamini–Hochberg) or None.
    rho : Gate 2 (spectral gap): stop when the best |t| < rho · min |t| at addition of the selected, unless the
        Gate-2 probe finds that adding the candidate makes a selected feature removable (a swap, see
        :class:`Search`); None = off.
    backward : backward elimination after each addition (the stepwise check) and after each forward pass, to a
        fixed point (at most ``max_rounds`` rounds).
    nuisance : GCM learner of y and of the pseudo-outcome on Z_S: "spline" (additive regression spline ridge),
        "poly2" (degree-2 polynomial ridge) or "lgbm" (LightGBM).
    z_nuisance : GCM regression of each candidate on Z_S: "spline" / "poly2" (cross-fitted ridge on that basis,
        all candidates at once from per-fold sums), "linear" (in-sample OLS on [1, Z_S]: fast, not model-free) or
        "lgbm" (cross-fitted LightGBM per candidate; in memory, at most LGBM_Z_MAX columns).
    n_folds, folds, seed : GCM cross-fitting folds (stored fold ids win over a seeded random split).
    min_active : columns with fewer non-zero entries are skipped (recorded in the trace); 20 as the identify stage.
    """
    src, G, K, mw = _prepare(y, t, z, w, cluster, folds, test, adjust, alpha, rho, n_folds, max_rounds, nuisance,
                             seed, _n_blocks, z_nuisance)
    tester = Tester(src, test, G, K, nuisance, seed, with_nnz=max(0, int(min_active)), z_nuisance=z_nuisance)
    res = run_search(tester, mw, alpha=alpha, adjust=adjust, rho=rho, backward=backward, max_rounds=max_rounds,
                     min_active=min_active,
                     params=dict(alpha=alpha, test=test, adjust=adjust, rho=rho, backward=backward,
                                 nuisance=nuisance, z_nuisance=z_nuisance, n_folds=K, max_rounds=max_rounds,
                                 seed=seed, min_active=min_active, n=int(tester.n), m=int(src.M - mw), mw=int(mw)))
    res.passes = pass_summary(src.passes)
    return res


def run_search(tester: Tester, mw, alpha, adjust, rho, backward, max_rounds, min_active=0, params=None,
               on_decision=None):
    """The selection loop on the driver, over any :class:`Tester` (in-memory or reduced from Spark).

    ``on_decision(record, selected)`` sees every trace record as it is made, with the current selected set."""
    M = len(tester.s1)
    tester.M = M
    search = Search(tester, mw, alpha, adjust, rho, backward, max_rounds, on_decision)
    const = tester.constant_columns()
    rare = tester.nnz < min_active
    for g in np.nonzero(const | rare)[0]:
        search._rec("setup", 0, "setup", "skip", int(g), reason="constant" if const[g] else "rare")
    usable = np.nonzero(~(const | rare))[0]
    converged = True
    if mw:
        converged &= search.run_phase(usable[usable < mw], "W", deferred=int((usable >= mw).sum()))
    converged &= search.run_phase(usable, "joint")
    final = search.given_rest()
    for j in search.S:
        search._rec("final", 0, "final", "selected", j, t=final[j][0], p=final[j][1],
                    added_in=list(search.added_in[j]))
    S = search.S
    z_ids = [j for j in S if j >= mw]
    w_ids = [j for j in S if j < mw]
    arr = lambda ids, c: np.array([final[j][c] for j in ids], dtype=float)  # noqa: E731
    return NexisResult(
        selected=np.array([j - mw for j in z_ids], dtype=int), selected_w=np.array(w_ids, dtype=int),
        pvalues=arr(z_ids, 1), tstats=arr(z_ids, 0), pvalues_w=arr(w_ids, 1), tstats_w=arr(w_ids, 0),
        round_added=np.array([search.added_in[j][1] for j in z_ids], dtype=int),
        round_added_w=np.array([search.added_in[j][1] for j in w_ids], dtype=int),
        trace=search.trace, converged=bool(converged), params=params or {})


@dataclass
class MarginalResult:
    """S = ∅ screen of every column: t, raw p, Bonferroni and BH-adjusted p (NaN where skipped), rejections."""

    tstats: np.ndarray
    pvalues: np.ndarray
    p_bonferroni: np.ndarray
    q_bh: np.ndarray
    alpha: float
    tstats_w: Optional[np.ndarray] = None
    pvalues_w: Optional[np.ndarray] = None
    p_bonferroni_w: Optional[np.ndarray] = None
    q_bh_w: Optional[np.ndarray] = None

    @property
    def reject_raw(self):
        return np.nan_to_num(self.pvalues, nan=1.0) <= self.alpha

    @property
    def reject_bonferroni(self):
        return np.nan_to_num(self.p_bonferroni, nan=1.0) <= self.alpha

    @property
    def reject_bh(self):
        return np.nan_to_num(self.q_bh, nan=1.0) <= self.alpha


def marginal(y, t, z, w=None, alpha=0.05, test="gcm", cluster=None, nuisance="spline", n_folds=5, folds=None,
             seed=0, min_active=20, z_nuisance="spline", _n_blocks=1) -> MarginalResult:
    """The S = ∅ baselines: every column of z (and w) tested alone; Bonferroni and BH over the tested ones."""
    src, G, K, mw = _prepare(y, t, z, w, cluster, folds, test, None, alpha, None, n_folds, 1, nuisance, seed,
                             _n_blocks, z_nuisance)
    tester = Tester(src, test, G, K, nuisance, seed, with_nnz=max(0, int(min_active)), z_nuisance=z_nuisance)
    return marginal_from_tester(tester, mw, alpha, min_active)


def marginal_from_tester(tester: Tester, mw, alpha, min_active=0) -> MarginalResult:
    M = len(tester.s1)
    use = np.nonzero(~(tester.constant_columns() | (tester.nnz < min_active)))[0]
    tt = np.full(M, np.nan)
    pp = np.full(M, np.nan)
    if len(use):
        a, b, ok = tester([], use)
        tt[use[ok]], pp[use[ok]] = a[ok], b[ok]
    fin = ~np.isnan(pp)
    bonf = np.full(M, np.nan)
    bonf[fin] = np.minimum(1.0, pp[fin] * fin.sum())
    q = np.full(M, np.nan)
    q[fin] = bh_adjust(pp[fin])
    return MarginalResult(tstats=tt[mw:], pvalues=pp[mw:], p_bonferroni=bonf[mw:], q_bh=q[mw:], alpha=alpha,
                          tstats_w=tt[:mw] if mw else None, pvalues_w=pp[:mw] if mw else None,
                          p_bonferroni_w=bonf[:mw] if mw else None, q_bh_w=q[:mw] if mw else None)
