"""Heterogeneity coverage (effects/coverage.py) on designs where the true share is known.

Each design is a randomized experiment with a known CATE τ(x); the effects stage's own learners produce the
cross-fitted DR scores φ and the out-of-fold predictions of the selected-set (linear on the selected modifiers) and
full-feature learners. The truth of the estimand is computed from the simulated τ instead of φ, with a plain
least-squares projection (an independent implementation): Λ(S) = Var(best linear predictor of τ given the
within-fold-demeaned S), share = Λ(s_selected) / Λ(s_selected, s_full).
"""
import numpy as np
import pytest

from tokens2policy.effects import DRLearner, NuisanceParams, cross_fit_nuisances
from tokens2policy.effects.coverage import (
    coverage_frame, coverage_message, explained_heterogeneity, heterogeneity_coverage,
)


def _true_share(tau, s_sel, s_full, folds):
    def demean(v):
        v = np.asarray(v, float).copy()
        for k in np.unique(folds):
            v[folds == k] -= v[folds == k].mean()
        return v

    def lam(cols):
        S = np.column_stack([demean(c) for c in cols])
        beta, *_ = np.linalg.lstsq(S, demean(tau), rcond=None)
        return float(np.var(S @ beta))

    return lam([s_sel]) / lam([s_sel, s_full]), lam([s_sel]), lam([s_sel, s_full])


def _experiment(tau_fn, n, selected, seed, p=6, noise=1.0, full="ridge"):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, p))
    tau = tau_fn(X)
    t = np.zeros(n, int)
    t[rng.permutation(n)[: n // 2]] = 1
    y = 0.5 * X[:, 0] - 0.3 * X[:, 2] + t * tau + noise * rng.standard_normal(n)
    folds = rng.permutation(np.arange(n) % 5)
    nu = cross_fit_nuisances(X, t, y, folds, NuisanceParams("ridge"), seed=seed)
    sel = DRLearner(final="linear").fit(X, t, y, folds, Z=X[:, selected] if selected else np.zeros((n, 0)),
                                        nuisances=nu)
    fl = DRLearner(final=full).fit(X, t, y, folds, Z=X, nuisances=nu)
    phi = sel.scores_[:, 1] - sel.scores_[:, 0]
    return dict(X=X, tau=tau, phi=phi, s_sel=sel.oof_cate_, s_full=fl.oof_cate_, folds=folds, t=t, y=y)


def test_selected_set_explains_everything_coverage_near_one():
    # tau depends on x0 only; x0 is selected; the full learner sees all 6 features
    d = _experiment(lambda X: 1.0 + 0.8 * X[:, 0], 6000, [0], seed=1)
    truth, _, _ = _true_share(d["tau"], d["s_sel"], d["s_full"], d["folds"])
    assert truth > 0.97
    res = heterogeneity_coverage(d["phi"], d["s_sel"], d["s_full"], d["folds"], n_bootstrap=200, seed=0)
    assert res.detected
    assert res.share > 0.85
    assert res.share_ci[0] <= truth <= res.share_ci[1]
    assert not res.warning
    assert "explain" in coverage_message(res) and "WARNING" not in coverage_message(res)


def test_selected_set_explains_a_known_fraction():
    # tau = x0 + x1 (independent, equal variance); x0 selected: the selected set explains half of it
    d = _experiment(lambda X: 0.5 + 0.7 * X[:, 0] + 0.7 * X[:, 1], 6000, [0], seed=2)
    truth, lam_sel, lam_joint = _true_share(d["tau"], d["s_sel"], d["s_full"], d["folds"])
    assert 0.45 < truth < 0.56  # the designed half, up to the learners' estimation error
    names = [f"x{j}" for j in range(d["X"].shape[1])]
    res = heterogeneity_coverage(d["phi"], d["s_sel"], d["s_full"], d["folds"], n_bootstrap=200, seed=0,
                                 features=np.delete(d["X"], 0, axis=1), feature_names=names[1:])
    assert res.share_ci[0] <= truth <= res.share_ci[1]
    assert 0.35 < res.share < 0.65
    assert res.share_ci[1] < 0.8
    # the explained variances themselves, against the truth from tau
    est, se, lo, hi = res.explained["selected"]
    assert lo <= lam_sel <= hi
    est, se, lo, hi = res.explained["joint"]
    assert lo <= lam_joint <= hi
    assert res.beyond[4] < 1e-6 and res.warning
    # the residual heterogeneity sits on x1, the unselected driver
    assert res.residual["feature"].iloc[0] == "x1"
    assert res.residual["p_bonferroni"].iloc[0] < 1e-6
    assert (res.residual["p_bonferroni"].iloc[1:] > 0.01).all()
    msg = coverage_message(res, labels={"x1": "the other driver"})
    assert msg.startswith("WARNING") and "x1 'the other driver'" in msg
    frame = coverage_frame(res)
    share_row = frame[(frame.metric == "coverage") & (frame.group == "share_selected")].iloc[0]
    assert share_row.estimate == pytest.approx(res.share)
    assert frame[(frame.metric == "coverage") & (frame.group == "warning")].estimate.iloc[0] == 1.0
    assert (frame.metric == "coverage_residual").sum() == len(res.residual)


def test_no_heterogeneity_no_warning():
    d = _experiment(lambda X: np.full(X.shape[0], 0.5), 3000, [0], seed=3)
    res = heterogeneity_coverage(d["phi"], d["s_sel"], d["s_full"], d["folds"], n_bootstrap=100, seed=0)
    assert not res.detected or res.heterogeneity[2] > 0.001
    assert not res.warning
    if not res.detected:
        assert "no heterogeneity detected" in coverage_message(res)


def test_debiased_explained_heterogeneity_against_closed_form():
    # phi = tau + pure noise, S = tau: Lambda = Var(tau); the plug-in is biased up by about Var(noise)/n, the
    # debiased estimate is not (checked on the mean over replications)
    rng = np.random.default_rng(0)
    n, reps = 400, 300
    plug, deb = [], []
    for _ in range(reps):
        s = rng.standard_normal(n)
        tau = 0.1 * s
        phi = tau + 3.0 * rng.standard_normal(n)
        deb.append(explained_heterogeneity(phi, s))
        sc = s - s.mean()
        beta = sc @ (phi - phi.mean()) / (sc @ sc)
        plug.append(beta ** 2 * sc.var())
    # truth 0.01; the noise adds about 9/400 = 0.0225 to the plug-in
    assert np.mean(plug) == pytest.approx(0.01 + 9 / n, rel=0.15)
    assert abs(np.mean(deb) - 0.01) < 3 * np.std(deb) / np.sqrt(reps)


def test_cluster_bootstrap_and_input_errors():
    d = _experiment(lambda X: 0.5 + 0.7 * X[:, 0] + 0.7 * X[:, 1], 2000, [0], seed=4)
    cluster = np.arange(2000) % 100
    res = heterogeneity_coverage(d["phi"], d["s_sel"], d["s_full"], d["folds"], cluster=cluster, n_bootstrap=100)
    assert np.isfinite(res.share) and res.share_ci[0] <= res.share <= res.share_ci[1]
    with pytest.raises(ValueError, match="same length"):
        heterogeneity_coverage(d["phi"], d["s_sel"][:-1], d["s_full"])
    with pytest.raises(ValueError, match="finite"):
        heterogeneity_coverage(np.r_[np.nan, d["phi"][1:]], d["s_sel"], d["s_full"])
    with pytest.raises(ValueError, match="at least 2 clusters"):
        heterogeneity_coverage(d["phi"], d["s_sel"], d["s_full"], cluster=np.zeros(2000))


@pytest.mark.slow
def test_share_ci_covers_the_truth_over_replications():
    hits, reps = 0, 60
    for r in range(reps):
        d = _experiment(lambda X: 0.5 + 0.7 * X[:, 0] + 0.5 * X[:, 1], 3000, [0], seed=100 + r)
        truth, _, _ = _true_share(d["tau"], d["s_sel"], d["s_full"], d["folds"])
        res = heterogeneity_coverage(d["phi"], d["s_sel"], d["s_full"], d["folds"], n_bootstrap=200, seed=r)
        hits += res.share_ci[0] <= truth <= res.share_ci[1]
    assert hits / reps >= 0.85


def test_facts_read_back_from_calibration_rows_give_the_same_line():
    from tokens2policy.effects.coverage import coverage_facts, outcome_coverage

    d = _experiment(lambda X: 0.5 + 0.7 * X[:, 0] + 0.7 * X[:, 1], 3000, [0], seed=5)
    # the neurons table layout: per-unit index/value arrays; neuron 3 carries x1's signal, neuron 0 is selected
    X = d["X"]
    idx = [np.array([0, 3, 7]) for _ in range(len(X))]
    val = [np.array([X[i, 0], X[i, 1], X[i, 4]]) for i in range(len(X))]
    res, rows, metrics, line = outcome_coverage(d["phi"], d["s_sel"], d["s_full"], d["folds"], indices=idx,
                                                values=val, selected_neurons=[0], labels={"neuron_3": "x one"},
                                                n_bootstrap=50, min_active=0)
    assert list(res.residual["feature"]) == ["neuron_3", "neuron_7"]
    assert line.startswith("WARNING") and "neuron_3 'x one'" in line
    assert metrics["coverage_share"] == pytest.approx(res.share) and metrics["coverage_warning"] == 1.0
    facts = coverage_facts(rows.assign(learner="dr_selected"), {"neuron_3": "x one"})
    assert facts["share"] == pytest.approx(res.share) and facts["warning"] and facts["detected"]
    assert facts["residual"][0] == {"feature": "neuron_3", "label": "x one",
                                    "estimate": pytest.approx(res.residual["estimate"].iloc[0]),
                                    "p_bonferroni": pytest.approx(res.residual["p_bonferroni"].iloc[0])}
    # the stored line is the live line without the t-statistics
    import re

    assert facts["line"] == re.sub(r" \(t=[^)]*\)", "", line)
    assert coverage_facts(None) is None


def _dense_residual_scan(resid, Z, folds, clusters=None):
    """Straightforward reference of residual_scan: per feature, demean within folds, OLS slope of the residual,
    HC1 (or CR1S) standard error from the dense n-vectors."""
    n, m = Z.shape
    K = np.unique(folds).size
    out = []
    for j in range(m):
        z = Z[:, j].astype(float).copy()
        for k in np.unique(folds):
            z[folds == k] -= z[folds == k].mean()
        szz = z @ z
        if szz <= 1e-12:
            out.append((np.nan, np.nan))
            continue
        b = z @ resid / szz
        e = resid - b * z
        if clusters is None:
            var = n / (n - K - 1) * np.sum((z * e) ** 2) / szz ** 2
        else:
            G = np.unique(clusters).size
            u = np.array([np.sum((z * e)[clusters == g]) for g in np.unique(clusters)])
            var = G / (G - 1) * (n - 1) / (n - K - 1) * np.sum(u ** 2) / szz ** 2
        out.append((b, np.sqrt(var)))
    return np.array(out)


@pytest.mark.parametrize("clustered", [False, True])
def test_residual_scan_sparse_algebra_equals_the_dense_regressions(clustered):
    import scipy.sparse as sp

    from tokens2policy.effects.coverage import residual_scan

    rng = np.random.default_rng(5)
    n, m = 3000, 40
    active = rng.random((n, m)) < rng.uniform(0.005, 0.6, m)  # from very sparse to mostly active columns
    Z = np.where(active, rng.lognormal(0, 0.5, (n, m)), 0.0)
    Z[:, 3] = 0.0  # never active: not tested
    Z[:, 4] = rng.standard_normal(n)  # dense, signed
    Z[:, 5] = np.where(rng.random(n) < 0.01, 1.0, 0.0)  # ~30 active: below min_active=40 below
    folds = rng.permutation(np.arange(n) % 5)
    resid = rng.standard_normal(n) + 0.4 * Z[:, 7]
    for k in range(5):
        resid[folds == k] -= resid[folds == k].mean()
    clusters = rng.integers(0, 60, n) if clustered else None
    ref = _dense_residual_scan(resid, Z, folds, clusters)
    names = [f"f{j}" for j in range(m)]
    for feats in (Z, sp.csc_matrix(Z), sp.csr_matrix(Z)):
        got = residual_scan(resid, feats, folds, 5, clusters, 60 if clustered else 1, names=names, top=m)
        got = got.set_index("feature")
        tested = [f"f{j}" for j in range(m) if np.isfinite(ref[j, 0])]
        assert sorted(got.index) == sorted(tested) and "f3" not in got.index
        for j in range(m):
            if np.isfinite(ref[j, 0]):
                assert got.loc[f"f{j}", "estimate"] == pytest.approx(ref[j, 0], rel=1e-9, abs=1e-12)
                assert got.loc[f"f{j}", "se"] == pytest.approx(ref[j, 1], rel=1e-9)
                assert got.loc[f"f{j}", "n_active"] == int((Z[:, j] != 0).sum())
        assert got.index[0] == "f7"  # the feature the residual loads on
    few = residual_scan(resid, sp.csc_matrix(Z), folds, 5, clusters, 60 if clustered else 1, names=names, top=m,
                        min_active=40)
    counts = (Z != 0).sum(0)
    assert counts[5] < 40 and set(few.feature) == {f"f{j}" for j in range(m) if counts[j] >= 40}
