"""Deliberately straightforward dense NEXIS: the test oracle for ``tokens2policy.identify``.

Everything here is the textbook computation, written independently of the engine: the candidate test builds
the design D = [1, T, Z_S, T*Z_S] explicitly, residualizes Y, Z_j and T*Z_j on it with a QR projection
(Frisch-Waugh-Lovell) and runs one small OLS on the two residualized regressors per candidate; the GCM variant
fits its nuisances row by row with an augmented least-squares ridge. No sufficient statistics, no caching,
no sparse algebra. Slow on purpose; only its answers matter.
"""
from __future__ import annotations

import numpy as np
from scipy import stats

TIE_RTOL = 1e-9        # |t| within this relative distance of the best counts as a tie (smallest index wins)
DEGENERATE_TOL = 1e-8  # residual share of a candidate below this: collinear with the design, skipped
CONSTANT_TOL = 1e-10   # within-arm (or overall for GCM) variance share below this: constant column, skipped
RIDGE = 1.0            # ridge penalty of the poly2 nuisance (intercept unpenalized)


# ---------------------------------------------------------------------------------------------- candidate tests
def design(F, t, S):
    XS = F[:, list(S)]
    return np.column_stack([np.ones(len(t)), t, XS, t[:, None] * XS])


LEVERAGE_TOL = 1e-6    # robust tests: a row with leverage above 1 - this -> not tested ("leverage")
MIN_DF = 2.0           # robust tests: Bell-McCaffrey df below this -> not tested ("few_df")


def linear_tests(y, t, F, S, J, test, cluster_codes=None):
    """{j: (t, p), None if degenerate, or a reason string ("leverage", "few_df") if the robust test refuses}."""
    n = len(y)
    D = design(F, t, S)
    Q, _ = np.linalg.qr(D)

    def resid(v):
        return v - Q @ (Q.T @ v)

    yr = resid(y)
    k = D.shape[1] + 2
    out = {}
    for j in J:
        X = np.column_stack([F[:, j], t * F[:, j]])
        Xr = np.column_stack([resid(X[:, 0]), resid(X[:, 1])])
        ss = (Xr ** 2).sum(0)
        ss0 = (X ** 2).sum(0)
        corr2 = (Xr[:, 0] @ Xr[:, 1]) ** 2 / (ss[0] * ss[1]) if ss.min() > 0 else 1.0
        if ss0.min() <= 0 or (ss / ss0).min() < DEGENERATE_TOL or 1.0 - corr2 < DEGENERATE_TOL:
            out[j] = None
            continue
        beta, *_ = np.linalg.lstsq(Xr, yr, rcond=None)
        e = yr - Xr @ beta
        bread = np.linalg.inv(Xr.T @ Xr)
        if test == "linear":
            df = n - k
            V = (e @ e / df) * bread[1, 1]
        else:
            # the full design's hat matrix H = QQ' and residual maker M = I - H, explicitly (n x n), and the
            # weights of the interaction coefficient (gamma_hat = a'y)
            Qf, _ = np.linalg.qr(np.column_stack([D, X]))
            M = np.eye(n) - Qf @ Qf.T
            a = (Xr @ bread)[:, 1]
            h = 1.0 - np.diag(M)
            if test == "hc2":
                if h.max() > 1 - LEVERAGE_TOL:
                    out[j] = "leverage"
                    continue
                A = a ** 2 / (1 - h)                     # A = diag(a_i^2 / (1 - h_i))
                V = float(A @ e ** 2)
                trMA = float(A @ np.diag(M))
                trMAMA = float(A @ (M * M) @ A)          # sum_ik A_i A_k M_ik^2
            elif test == "cluster":
                groups = np.unique(cluster_codes)
                Ag = np.column_stack([np.where(cluster_codes == g, a, 0.0) for g in groups])  # columns a_g
                V0 = float(((Ag.T @ e) ** 2).sum())
                P = Ag.T @ M @ Ag                        # a_g' M a_h: A = sum_g a_g a_g'
                trMA = float(np.trace(P))
                if trMA <= LEVERAGE_TOL * (a @ a):
                    out[j] = "leverage"
                    continue
                V = V0 * (a @ a) / trMA
                trMAMA = float((P ** 2).sum())
            else:
                raise ValueError(test)
            df = trMA ** 2 / trMAMA
            if not df >= MIN_DF:
                out[j] = "few_df"
                continue
        tstat = beta[1] / np.sqrt(V)
        out[j] = (float(tstat), float(2 * stats.t.sf(abs(tstat), df)))
    return out


def poly2(XS):
    cols = [np.ones(XS.shape[0])]
    s = XS.shape[1]
    for a in range(s):
        cols.append(XS[:, a])
    for a in range(s):
        for b in range(a, s):
            cols.append(XS[:, a] * XS[:, b])
    return np.column_stack(cols)


HIST_BINS, SPLINE_KNOTS, SPLINE_BUDGET, KNOT_SPACING, SPLINE_RIDGE = 1024, 32, 256, 25, 1e-3


def spline_knots(x, cap):
    """Knots of one feature: quantiles at levels l/(K+1) of its non-zero values, located in their 1024-bin
    histogram over [min, max] by walking the cumulative counts (linear within the bin); K = min(cap, nnz // 25)."""
    v = x[x != 0]
    if not len(v):
        return []
    lo, hi = v.min(), v.max()
    K = min(cap, len(v) // KNOT_SPACING)
    if K < 1 or not hi > lo:
        return []
    counts, edges = np.histogram(v, bins=HIST_BINS, range=(lo, hi))
    knots = []
    for level in range(1, K + 1):
        target = len(v) * level / (K + 1)
        cum = 0.0
        for b in range(HIST_BINS):
            if cum + counts[b] >= target:
                knots.append(edges[b] + (target - cum) / counts[b] * (edges[b + 1] - edges[b]))
                break
            cum += counts[b]
    return sorted({k for k in knots if lo < k < hi})


def basis(XS, kind):
    """The full-data nuisance basis and its ridge penalty (diagonal; intercept unpenalized)."""
    n, s = XS.shape
    if kind == "poly2":
        B = poly2(XS)
        return B, np.r_[0.0, np.full(B.shape[1] - 1, RIDGE)]
    cap = min(SPLINE_KNOTS, (SPLINE_BUDGET // max(1, s) - 2) // 2)
    cols = [np.ones(n)]
    for a in range(s):
        x = XS[:, a]
        if (x != 0).sum() < n:
            cols.append((x != 0).astype(float))
        cols.append(x)
        kn = spline_knots(x, cap)
        cols += [np.maximum(x - k, 0.0) for k in kn]
        cols += [(x > k).astype(float) for k in kn]
    B = np.column_stack(cols)
    var = B.var(0)
    pen = SPLINE_RIDGE * n * np.maximum(var, 1e-12 * np.maximum((B ** 2).mean(0), 1e-300))
    pen[0] = 0.0
    return B, pen


def crossfit(XS, target, folds, nuisance, seed):
    """Out-of-fold predictions: fold k predicted by a fit on the other folds (ridge by augmented least squares on
    the full-data basis, or LightGBM)."""
    pred = np.empty(len(target))
    if nuisance in ("poly2", "spline"):
        B, pen = basis(XS, nuisance)
    for k in np.unique(folds):
        te = folds == k
        if XS.shape[1] == 0:
            pred[te] = target[~te].mean()
        elif nuisance in ("poly2", "spline"):
            A = np.vstack([B[~te], np.diag(np.sqrt(pen))])
            b = np.concatenate([target[~te], np.zeros(len(pen))])
            coef, *_ = np.linalg.lstsq(A, b, rcond=None)
            pred[te] = B[te] @ coef
        else:
            import lightgbm
            from tokens2policy.identify.nuisance import LGBM_PARAMS

            model = lightgbm.LGBMRegressor(**LGBM_PARAMS, random_state=seed)
            model.fit(XS[~te], target[~te])
            pred[te] = model.predict(XS[te])
    return pred


def gcm_tests(y, t, F, S, J, folds, nuisance, seed, z_nuisance="spline"):
    n = len(y)
    XS = F[:, list(S)]
    e = t.mean()
    m_hat = crossfit(XS, y, folds, nuisance, seed)
    phi = (y - m_hat) * (t - e) / (e * (1 - e))
    phi_res = phi - crossfit(XS, phi, folds, nuisance, seed)
    C = np.column_stack([np.ones(n), XS])
    out = {}
    for j in J:
        x = F[:, j]
        coef, *_ = np.linalg.lstsq(C, x, rcond=None)
        xr_lin = x - C @ coef          # a linear function of Z_S (a copy of a selected feature) is never tested
        xr = xr_lin if z_nuisance == "linear" else x - crossfit(XS, x, folds, z_nuisance, seed)
        if min(xr @ xr, xr_lin @ xr_lin) / (x @ x) < DEGENERATE_TOL:
            out[j] = None
            continue
        R = phi_res * xr
        sd = R.std()
        if not sd > 0:
            out[j] = None
            continue
        T = np.sqrt(n) * R.mean() / sd
        out[j] = (float(T), float(2 * stats.norm.sf(abs(T))))
    return out


# ---------------------------------------------------------------------------------------------- search
def bh_reject(p, alpha, family=None):
    """BH at alpha; ``family`` >= len(p) adds hypotheses tested later, padded explicitly here as p = 1."""
    p = np.asarray(p, float)
    m = len(p)
    if m == 0:
        return np.zeros(0, bool)
    padded = np.concatenate([p, np.ones(max(family or m, m) - m)])
    M = len(padded)
    order = np.sort(padded)
    ok = order <= alpha * np.arange(1, M + 1) / M
    if not ok.any():
        return np.zeros(m, bool)
    cutoff = order[np.nonzero(ok)[0].max()]
    return p <= cutoff


def bh_adjust(p):
    p = np.asarray(p, float)
    m = len(p)
    out = np.empty(m)
    for i in range(m):  # q_i = min over k with p_(k) >= p_i of m p_(k) / k
        best = 1.0
        for k in range(m):
            if p[k] >= p[i]:
                rank = int((p <= p[k]).sum())
                best = min(best, m * p[k] / rank)
        out[i] = best
    return out


def oracle_nexis(y, t, z, w=None, alpha=0.05, test="linear", adjust="FWER", rho=0.5, backward=True,
                 cluster=None, nuisance="spline", n_folds=5, max_rounds=20, folds=None, seed=0, z_nuisance="spline"):
    y = np.asarray(y, float)
    t = np.asarray(t, float)
    Z = z.toarray() if hasattr(z, "toarray") else np.asarray(z, float)
    W = np.zeros((len(y), 0)) if w is None else np.asarray(w, float).reshape(len(y), -1)
    F = np.hstack([W, Z])
    mw = W.shape[1]
    n, M = F.shape
    codes = None
    if test == "cluster":
        _, codes = np.unique(np.asarray(cluster), return_inverse=True)
    if test == "gcm" and folds is None:
        folds = np.random.default_rng(seed).permutation(n) % n_folds
    folds = None if folds is None else np.asarray(folds)

    # upfront skips
    skipped = {}
    for j in range(M):
        x = F[:, j]
        parts = [x] if test == "gcm" else [x[t == 0], x[t == 1]]
        for part in parts:
            if part.var() <= CONSTANT_TOL * (part ** 2).mean():
                skipped[j] = "constant"
                break
    usable = [j for j in range(M) if j not in skipped]

    def tests(S, J):
        if not J:
            return {}
        if test == "gcm":
            return gcm_tests(y, t, F, S, J, folds, nuisance, seed, z_nuisance)
        return linear_tests(y, t, F, S, J, test, codes)

    def n_params(S):
        return (len(S) + 2) if test == "gcm" else (2 + 2 * len(S) + 2)

    S = []         # selected, in order of addition
    t_add = {}     # |t| at addition
    events = []

    def given_rest(T):
        """{j: (t, p)} for each j in T given T minus j; untestable given the rest: p = 1 (dropped)."""
        pv = {}
        for j in T:
            rest = [s for s in T if s != j]
            r = tests(rest, [j])[j]
            pv[j] = r if isinstance(r, tuple) else (0.0, 1.0)
        return pv

    def backward_rule(T, pv):
        """The features the backward rule drops from the set T now (FWER/None: the largest p above the
        threshold, ties to the smallest id; FDR: those BH does not reject)."""
        ps = np.array([pv[j][1] for j in T])
        if adjust == "FDR":
            keep = bh_reject(ps, alpha)
            return [j for j, k in zip(list(T), keep) if not k]
        thr = alpha / len(T) if adjust == "FWER" else alpha
        worst_p = ps.max()
        if worst_p > thr:
            return [min(j for j, q in zip(T, ps) if q >= worst_p * (1 - TIE_RTOL))]
        return []

    def backward_pass(phase, rnd, check):
        """Backward elimination to a fixed point; a check right after an addition that drops nothing records
        ("backward", "keep", the feature with the largest p)."""
        dropped = False
        while S:
            pv = given_rest(S)
            drop = backward_rule(S, pv)
            if not drop:
                if check and not dropped:
                    ps = [pv[j][1] for j in S]
                    worst = min(j for j, q in zip(S, ps) if q >= max(ps) * (1 - TIE_RTOL))
                    events.append((phase, rnd, "backward", "keep", worst, pv[worst][0], pv[worst][1]))
                break
            for j in drop:
                S.remove(j)
                del t_add[j]
                events.append((phase, rnd, "backward", "drop", j, pv[j][0], pv[j][1]))
            dropped = True
        return dropped

    def run_phase(candidates, phase, deferred=0):
        """``deferred``: neurons the W-phase does not test but counts in its Gate-1 family (one α per search).
        Stepwise: with backward on, each addition that leaves |S| >= 2 is followed by the backward rule (a drop
        ends the round's forward part); Gate 2 stands unless the backward rule on S + [best] drops another."""
        converged = False
        for rnd in range(1, max_rounds + 1):
            # forward
            dropped_in_forward = False
            while True:
                if n - n_params(S) < 1:
                    events.append((phase, rnd, "forward", "stop_df", None))
                    break
                J = [j for j in candidates if j not in S]
                res = tests(S, J)
                testable = [j for j in J if isinstance(res[j], tuple)]
                if not testable:
                    events.append((phase, rnd, "forward", "stop_empty", None))
                    break
                p = np.array([res[j][1] for j in testable])
                R = len(testable)
                if adjust == "FWER":
                    elig = p <= alpha / (R + deferred)
                elif adjust == "FDR":
                    elig = bh_reject(p, alpha, R + deferred)
                else:
                    elig = p <= alpha
                if not elig.any():
                    events.append((phase, rnd, "forward", "stop_gate1", None))
                    break
                el = [j for j, ok in zip(testable, elig) if ok]
                at = np.array([abs(res[j][0]) for j in el])
                best = min(j for j, a in zip(el, at) if a >= at.max() * (1 - TIE_RTOL))
                tb = abs(res[best][0])
                if rho is not None and S and tb < rho * min(t_add[s] for s in S):
                    swap = False
                    if backward:   # the Gate-2 probe
                        T = S + [best]
                        would = backward_rule(T, given_rest(T))
                        swap = bool(would) and best not in would
                    if not swap:
                        events.append((phase, rnd, "forward", "stop_gate2", best))
                        break
                S.append(best)
                t_add[best] = tb
                events.append((phase, rnd, "forward", "add", best, res[best][0], res[best][1]))
                if backward and len(S) >= 2 and backward_pass(phase, rnd, check=True):
                    dropped_in_forward = True
                    break
            if dropped_in_forward:
                continue
            # backward
            if not (backward and backward_pass(phase, rnd, check=False)):
                converged = True
                break
        return converged

    conv = True
    if mw:
        conv &= run_phase([j for j in usable if j < mw], "W", deferred=len([j for j in usable if j >= mw]))
    conv &= run_phase(usable, "joint")

    final = {}
    for j in S:
        rest = [s for s in S if s != j]
        r = tests(rest, [j])[j]
        final[j] = r if isinstance(r, tuple) else (0.0, 1.0)
    sel_z = [j - mw for j in S if j >= mw]
    sel_w = [j for j in S if j < mw]
    return dict(
        selected=np.array(sel_z, int),
        selected_w=np.array(sel_w, int),
        pvalues=np.array([final[j][1] for j in S if j >= mw]),
        tstats=np.array([final[j][0] for j in S if j >= mw]),
        pvalues_w=np.array([final[j][1] for j in S if j < mw]),
        tstats_w=np.array([final[j][0] for j in S if j < mw]),
        events=events,
        skipped=skipped,
        converged=conv,
    )


def oracle_marginal(y, t, z, test="linear", cluster=None, nuisance="spline", n_folds=5, folds=None, seed=0,
                    z_nuisance="spline"):
    """S = empty test for every column of z: (t, p raw, p Bonferroni, BH q-value) with NaN for skipped columns."""
    y = np.asarray(y, float)
    t = np.asarray(t, float)
    F = z.toarray() if hasattr(z, "toarray") else np.asarray(z, float)
    n, M = F.shape
    codes = None
    if test == "cluster":
        _, codes = np.unique(np.asarray(cluster), return_inverse=True)
    if test == "gcm" and folds is None:
        folds = np.random.default_rng(seed).permutation(n) % n_folds
    J = []
    for j in range(M):
        x = F[:, j]
        parts = [x] if test == "gcm" else [x[t == 0], x[t == 1]]
        if all(part.var() > CONSTANT_TOL * (part ** 2).mean() for part in parts):
            J.append(j)
    res = gcm_tests(y, t, F, [], J, np.asarray(folds), nuisance, seed, z_nuisance) if test == "gcm" else \
        linear_tests(y, t, F, [], J, test, codes)
    tt = np.full(M, np.nan)
    p = np.full(M, np.nan)
    for j in J:
        if isinstance(res[j], tuple):
            tt[j], p[j] = res[j]
    ok = ~np.isnan(p)
    bonf = np.full(M, np.nan)
    bonf[ok] = np.minimum(1.0, p[ok] * ok.sum())
    q = np.full(M, np.nan)
    q[ok] = bh_adjust(p[ok])
    return tt, p, bonf, q
