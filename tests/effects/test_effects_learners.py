"""DR/R-learners against a known CATE; per-fold (task-style) nuisance fits equal the sequential cross-fit."""
import numpy as np
import pandas as pd
import pytest

from tokens2policy.effects.learners import (
    DRLearner, NuisanceParams, RLearner, aipw_scores, cross_fit_nuisances, fit_fold_nuisances, fold_seed,
)


def make_rct(n, seed, share=0.5):
    """Two sparse SAE-like neurons + 3 covariates; τ = 1 + 2·1{n1 active} − 1.5·1{n2 active}; nonlinear baseline."""
    rng = np.random.default_rng(seed)
    a1, a2 = rng.random(n) < 0.3, rng.random(n) < 0.5
    n1 = np.where(a1, rng.exponential(size=n), 0.0)
    n2 = np.where(a2, rng.exponential(size=n), 0.0)
    x = rng.normal(size=(n, 3))
    X = np.column_stack([n1, n2, x])
    tau = 1 + 2 * a1 - 1.5 * a2
    mu0 = x[:, 0] + 0.5 * x[:, 1] ** 2 + np.sin(2 * x[:, 2]) + 0.5 * n1
    t = (rng.random(n) < share).astype(int)
    y = mu0 + t * tau + rng.normal(size=n)
    folds = rng.permutation(np.arange(n) % 5)
    Z = np.column_stack([a1, a2]).astype(float)
    return dict(X=X, Z=Z, t=t, y=y, tau=tau, mu0=mu0, folds=folds, unit_id=np.arange(n))


@pytest.mark.parametrize("learner", [DRLearner, RLearner])
def test_linear_final_recovers_cate_and_beats_constant_baseline(learner):
    d = make_rct(3000, 1)
    nu = cross_fit_nuisances(d["X"], d["t"], d["y"], d["folds"], NuisanceParams("hgb"), 3)  # plain: oof unused
    m = learner(NuisanceParams("hgb"), final="linear", seed=3).fit(d["X"], d["t"], d["y"], d["folds"], Z=d["Z"],
                                                                     nuisances=nu)
    cate = m.effect(d["Z"])
    pehe = np.sqrt(np.mean((cate - d["tau"]) ** 2))
    ate_hat = m.scores_[:, 1].mean() - m.scores_[:, 0].mean()
    pehe_const = np.sqrt(np.mean((ate_hat - d["tau"]) ** 2))
    assert np.corrcoef(cate, d["tau"])[0, 1] > 0.95
    assert pehe < 0.3 * pehe_const, (pehe, pehe_const)
    lo, hi = m.effect_interval(d["Z"])
    assert np.all(lo < cate) and np.all(cate < hi)
    np.testing.assert_allclose(m.coef_, [1, 2, -1.5], atol=0.35)


def test_flexible_full_feature_final_stage_beats_constant_and_has_no_ci():
    d = make_rct(3000, 2)
    m = DRLearner(NuisanceParams("ridge"), final="hgb", seed=0).fit(d["X"], d["t"], d["y"], d["folds"])
    cate = m.effect(d["X"])
    assert np.corrcoef(cate, d["tau"])[0, 1] > 0.7
    assert np.mean((cate - d["tau"]) ** 2) < 0.6 * np.var(d["tau"])
    assert np.isnan(m.effect_interval(d["X"])[0]).all()
    with pytest.raises(ValueError, match="final='linear'"):
        m.coef_


def test_linear_final_stage_unit_ci_covers_true_cate_monte_carlo():
    """Correctly specified linear final stage: the 95% CI of τ(z) at z = (n1 active, n2 inactive) = 3 covers."""
    hits, reps = 0, 80
    for r in range(reps):
        d = make_rct(600, 100 + r)
        folds = d["folds"] % 2
        m = DRLearner(NuisanceParams("ridge"), seed=r).fit(d["X"], d["t"], d["y"], folds, Z=d["Z"])
        lo, hi = m.effect_interval(np.array([[1.0, 0.0]]))
        hits += lo[0] <= 3.0 <= hi[0]
    assert 0.87 <= hits / reps <= 1.0, hits


def test_dr_scores_mean_is_unbiased_ate_with_known_unequal_propensity():
    d = make_rct(4000, 4, share=0.3)
    nu = cross_fit_nuisances(d["X"], d["t"], d["y"], d["folds"], NuisanceParams("ridge", propensity=0.3))
    assert np.all(nu["e"] == 0.3)
    g = aipw_scores(d["t"], d["y"], nu["mu0"], nu["mu1"], nu["e"])
    phi = g[:, 1] - g[:, 0]
    se = phi.std(ddof=1) / np.sqrt(phi.size)
    assert abs(phi.mean() - d["tau"].mean()) < 3 * se


def test_default_propensity_is_training_fold_share():
    d = make_rct(500, 5, share=0.4)
    out = fit_fold_nuisances((d["X"][d["folds"] != 0], d["t"][d["folds"] != 0], d["y"][d["folds"] != 0]),
                             d["X"][d["folds"] == 0], 0, NuisanceParams("ridge"), seed=0)
    assert np.allclose(out["e"], d["t"][d["folds"] != 0].mean())


@pytest.mark.parametrize("model", ["hgb", "forest"])
def test_per_fold_tasks_reproduce_sequential_cross_fit_exactly(model):
    """Emulate the Spark design: replicate rows per task fold, shuffle, group by task fold, sort by unit_id inside the
    task, call fit_fold_nuisances — and compare with the sequential in-memory cross-fit (sorted by unit_id)."""
    d = make_rct(700, 6)
    params, seed = NuisanceParams(model), 11
    seq = cross_fit_nuisances(d["X"], d["t"], d["y"], d["folds"], params, seed)
    frame = pd.DataFrame(d["X"], columns=[f"feat{j}" for j in range(d["X"].shape[1])])
    frame["unit_id"], frame["t"], frame["y"], frame["fold"] = d["unit_id"], d["t"], d["y"], d["folds"]
    replicated = pd.concat([frame.assign(task_fold=k) for k in range(5)]).sample(frac=1.0, random_state=0)
    feats = [c for c in frame.columns if c.startswith("feat")]
    got = np.full((len(frame), 3), np.nan)
    for k, task in reversed(list(replicated.groupby("task_fold"))):  # any task order
        task = task.sort_values("unit_id")
        train, pred = task[task.fold != k], task[task.fold == k]
        out = fit_fold_nuisances((train[feats].to_numpy(), train.t.to_numpy(), train.y.to_numpy()),
                                 pred[feats].to_numpy(), int(k), params, seed)
        got[pred.unit_id.to_numpy()] = np.column_stack([out["mu0"], out["mu1"], out["e"]])
    np.testing.assert_array_equal(got, np.column_stack([seq["mu0"], seq["mu1"], seq["e"]]))
    if model == "forest":  # bootstrap + feature subsampling: the seed really drives the fit
        other = cross_fit_nuisances(d["X"], d["t"], d["y"], d["folds"], params, seed + 1)
        assert not np.array_equal(other["mu1"], seq["mu1"])


def test_fold_seed_is_deterministic_and_fold_specific():
    assert fold_seed(0, 1) == fold_seed(0, 1)
    assert len({fold_seed(0, k) for k in range(10)}) == 10
    assert fold_seed(1, 0) != fold_seed(0, 1)
    assert fold_seed(0, 1, 2) not in {fold_seed(0, k) for k in range(10)}


@pytest.mark.parametrize("learner", [DRLearner, RLearner])
def test_oof_cate_is_invariant_to_own_folds_outcomes_only_with_nested_cross_fitting(learner):
    """Fold k's held-out CATE must not move when fold k's outcomes change — nuisances refitted, as in the pipeline.

    Plain cross-fitting fails this (the second-order leak of issue 13 finding 6: the other folds' pseudo-outcomes
    come from nuisances trained on fold k); nested cross-fitting, the default, passes it exactly."""
    d = make_rct(600, 7)
    y2 = d["y"].copy()
    f0 = d["folds"] == 0
    y2[f0] += 10 * d["t"][f0] + d["X"][f0, 2] ** 2  # fold 0's outcomes only
    a = learner(NuisanceParams("ridge")).fit(d["X"], d["t"], d["y"], d["folds"], Z=d["Z"])
    b = learner(NuisanceParams("ridge")).fit(d["X"], d["t"], y2, d["folds"], Z=d["Z"])
    assert a.oof_nested_ and b.oof_nested_
    np.testing.assert_allclose(a.oof_cate_[f0], b.oof_cate_[f0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(a.effect_without(d["Z"], 0), b.effect_without(d["Z"], 0), rtol=1e-10, atol=1e-12)
    assert not np.allclose(a.oof_cate_[d["folds"] == 1], b.oof_cate_[d["folds"] == 1])  # fold 0 trains fold 1's

    # the leak without nesting: same data, plain cross-fitted nuisances
    plain = [learner().fit(d["X"], d["t"], yy, d["folds"], Z=d["Z"],
                           nuisances=cross_fit_nuisances(d["X"], d["t"], yy, d["folds"], NuisanceParams("ridge")))
             for yy in (d["y"], y2)]
    assert not plain[0].oof_nested_
    assert np.abs(plain[0].oof_cate_[f0] - plain[1].oof_cate_[f0]).max() > 1e-3


def test_nested_nuisances_leave_out_both_folds():
    """Column c of the nested nuisances for a unit of fold j equals a fit on the folds other than j and c,
    refitted here by hand; the diagonal is the plain cross-fit."""
    d = make_rct(500, 12)
    params = NuisanceParams("ridge")
    nu = cross_fit_nuisances(d["X"], d["t"], d["y"], d["folds"], params, seed=4, nested=True)
    np.testing.assert_array_equal(nu["fold_ids"], np.arange(5))
    for key in ("mu0", "mu1", "e"):
        own = nu["nested"][key][np.arange(500), d["folds"]]
        np.testing.assert_array_equal(own, nu[key])
    j, k = 1, 3
    train = ~np.isin(d["folds"], (j, k))
    pred = d["folds"] == j
    ref = fit_fold_nuisances((d["X"][train], d["t"][train], d["y"][train]), d["X"][np.isin(d["folds"], (j, k))],
                             (j, k), params, seed=4)
    np.testing.assert_array_equal(nu["nested"]["mu1"][pred, k], ref["mu1"][pred[np.isin(d["folds"], (j, k))]])
    assert np.isfinite(nu["nested"]["mu0"]).all()
    with pytest.raises(ValueError, match="at least 3 folds"):
        cross_fit_nuisances(d["X"], d["t"], d["y"], d["folds"] % 2, params, nested=True)


def test_r_learner_linear_final_equals_direct_robinson_regression():
    d = make_rct(800, 8)
    nu = cross_fit_nuisances(d["X"], d["t"], d["y"], d["folds"], NuisanceParams("ridge"))
    m = RLearner().fit(d["X"], d["t"], d["y"], d["folds"], Z=d["Z"], nuisances=nu)
    e = nu["e"]
    y_res = d["y"] - (e * nu["mu1"] + (1 - e) * nu["mu0"])
    t_res = d["t"] - e
    design = t_res[:, None] * np.column_stack([np.ones(len(e)), d["Z"]])
    beta = np.linalg.lstsq(design, y_res, rcond=None)[0]
    np.testing.assert_allclose(m.coef_, beta, rtol=1e-8)


def test_input_validation_messages():
    d = make_rct(100, 9)
    with pytest.raises(ValueError, match="nuisance model"):
        NuisanceParams("xgboost")
    with pytest.raises(ValueError, match="propensity"):
        NuisanceParams(propensity=1.5)
    with pytest.raises(ValueError, match="at least 2 folds"):
        cross_fit_nuisances(d["X"], d["t"], d["y"], np.zeros(100))
    with pytest.raises(ValueError, match="binary"):
        DRLearner().fit(d["X"], d["t"] + 1, d["y"], d["folds"])
    with pytest.raises(ValueError, match="not fitted"):
        DRLearner().effect(d["Z"])


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("shape", [(4000, 30), (300, 12), (30, 40)])
def test_gram_ridge_cv_equals_sklearn_ridge_cv(weighted, shape):
    """The effects stage's ridge (one Gram eigendecomposition, O(n p) per alpha) chooses the alpha sklearn's
    RidgeCV chooses and fits the same coefficients; designs with sparse activations, a constant column and
    collinear columns, the nuisance grid of alphas."""
    from sklearn.linear_model import RidgeCV

    from tokens2policy.effects.ridge import GramRidgeCV

    rng = np.random.default_rng(shape[0] + weighted)
    n, p = shape
    X = np.column_stack([rng.gamma(2.0, 180.0, n), (rng.random((n, p - 1)) < 0.1) * rng.lognormal(0, 0.5, (n, p - 1))])
    X[:, 2] = 0.0
    X[:, 3] = 2.0 * X[:, 4]
    alphas = np.logspace(-3, 4, 15)
    for signal in (0.0, 0.05, 1.0):  # pure noise (large alpha) to strong signal (small alpha)
        y = signal * (X[:, 1] - 0.5 * X[:, 5] + 0.002 * X[:, 0]) + rng.standard_normal(n)
        w = rng.uniform(0.05, 2.0, n) if weighted else None
        ref = RidgeCV(alphas=alphas).fit(X, y, sample_weight=w)
        got = GramRidgeCV(alphas=alphas).fit(X, y, sample_weight=w)
        assert got.alpha_ == ref.alpha_
        np.testing.assert_allclose(got.coef_, ref.coef_, rtol=1e-7, atol=1e-9 * np.abs(ref.coef_).max())
        np.testing.assert_allclose(got.predict(X), ref.predict(X), rtol=1e-9, atol=1e-9)
        assert got.best_score_ == pytest.approx(ref.best_score_, rel=1e-9)
