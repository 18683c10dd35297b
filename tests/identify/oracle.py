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


def linear_tests(y, t, F, S, J, test, cluster_codes=None):
    """{j: (t, p) or None if degenerate} for each candidate j given S."""
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
            V = (e @ e / df) * bread
        elif test == "hc1":
            df = n - k
            meat = (Xr * (e ** 2)[:, None]).T @ Xr
            V = n / (n - k) * bread @ meat @ bread
        elif test == "cluster":
            groups = np.unique(cluster_codes)
            G = len(groups)
            meat = np.zeros((2, 2))
            for g in groups:
                idx = cluster_codes == g
                sg = Xr[idx].T @ e[idx]
                meat += np.outer(sg, sg)
            df = G - 1
            V = G / (G - 1) * (n - 1) / (n - k) * bread @ meat @ bread
        else:
            raise ValueError(test)
        tstat = beta[1] / np.sqrt(V[1, 1])
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


def fit_predict(XS_tr, y_tr, XS_te, nuisance, seed):
    if XS_tr.shape[1] == 0:
        return np.full(XS_te.shape[0], y_tr.mean())
    if nuisance == "poly2":
        P = poly2(XS_tr)
        q = P.shape[1]
        A = np.vstack([P, np.sqrt(RIDGE) * np.eye(q)[1:]])
        b = np.concatenate([y_tr, np.zeros(q - 1)])
        coef, *_ = np.linalg.lstsq(A, b, rcond=None)
        return poly2(XS_te) @ coef
    import lightgbm
    from tokens2policy.identify.nuisance import LGBM_PARAMS

    model = lightgbm.LGBMRegressor(**LGBM_PARAMS, random_state=seed)
    model.fit(XS_tr, y_tr)
    return model.predict(XS_te)


def crossfit(XS, target, folds, nuisance, seed):
    pred = np.empty(len(target))
    for k in np.unique(folds):
        te = folds == k
        pred[te] = fit_predict(XS[~te], target[~te], XS[te], nuisance, seed)
    return pred


def gcm_tests(y, t, F, S, J, folds, nuisance, seed):
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
        xr = x - C @ coef
        if (xr @ xr) / (x @ x) < DEGENERATE_TOL:
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
                 cluster=None, nuisance="poly2", n_folds=5, max_rounds=20, folds=None, seed=0):
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
            return gcm_tests(y, t, F, S, J, folds, nuisance, seed)
        return linear_tests(y, t, F, S, J, test, codes)

    def n_params(S):
        return (len(S) + 2) if test == "gcm" else (2 + 2 * len(S) + 2)

    S = []         # selected, in order of addition
    t_add = {}     # |t| at addition
    events = []

    def run_phase(candidates, phase, deferred=0):
        """``deferred``: neurons the W-phase does not test but counts in its Gate-1 family (one α per search)."""
        converged = False
        for rnd in range(1, max_rounds + 1):
            # forward
            while True:
                if n - n_params(S) < 1:
                    events.append((phase, rnd, "forward", "stop_df", None))
                    break
                J = [j for j in candidates if j not in S]
                res = tests(S, J)
                testable = [j for j in J if res[j] is not None]
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
                    events.append((phase, rnd, "forward", "stop_gate2", best))
                    break
                S.append(best)
                t_add[best] = tb
                events.append((phase, rnd, "forward", "add", best, res[best][0], res[best][1]))
            # backward
            dropped = False
            while backward and S:
                pv = {}
                for j in S:
                    rest = [s for s in S if s != j]
                    pv[j] = tests(rest, [j])[j]
                ps = np.array([pv[j][1] for j in S])
                if adjust == "FDR":
                    keep = bh_reject(ps, alpha)
                    drop = [j for j, k in zip(list(S), keep) if not k]
                else:
                    thr = alpha / len(S) if adjust == "FWER" else alpha
                    worst_p = ps.max()
                    if worst_p > thr:
                        drop = [min(j for j, q in zip(S, ps) if q >= worst_p * (1 - TIE_RTOL))]
                    else:
                        drop = []
                if not drop:
                    break
                for j in drop:
                    S.remove(j)
                    del t_add[j]
                    events.append((phase, rnd, "backward", "drop", j, pv[j][0], pv[j][1]))
                dropped = True
            if not dropped:
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
        final[j] = tests(rest, [j])[j]
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


def oracle_marginal(y, t, z, test="linear", cluster=None, nuisance="poly2", n_folds=5, folds=None, seed=0):
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
    res = gcm_tests(y, t, F, [], J, np.asarray(folds), nuisance, seed) if test == "gcm" else \
        linear_tests(y, t, F, [], J, test, codes)
    tt = np.full(M, np.nan)
    p = np.full(M, np.nan)
    for j in J:
        if res[j] is not None:
            tt[j], p[j] = res[j]
    ok = ~np.isnan(p)
    bonf = np.full(M, np.nan)
    bonf[ok] = np.minimum(1.0, p[ok] * ok.sum())
    q = np.full(M, np.nan)
    q[ok] = bh_adjust(p[ok])
    return tt, p, bonf, q
