"""BLP / GATES / RATE against known truth and a straightforward re-implementation."""
import numpy as np
import pytest

from tokens2policy.effects.calibration import blp_test, calibration_table, gates_by_quantile, quantile_groups, rate


def oracle_scores(n, seed, noise=1.0):
    """DR scores with oracle nuisances in a 50/50 RCT: φ = τ + noise with E[φ|X] = τ(X)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    tau = 1 + x
    t = rng.random(n) < 0.5
    y = x + t * tau + rng.normal(size=n) * noise
    mu0, mu1 = x, x + tau
    phi = mu1 - mu0 + t * (y - mu1) / 0.5 - (~t) * (y - mu0) / 0.5
    return x, tau, phi


def test_blp_calibrated_prediction_has_unit_coefficients():
    x, tau, phi = oracle_scores(4000, 1)
    rows = blp_test(phi, tau).set_index("group")
    assert rows.loc["ate", "ci_low"] < 1 < rows.loc["ate", "ci_high"]
    for g in ("mean_prediction", "differential_prediction"):
        assert rows.loc[g, "ci_low"] < 1 < rows.loc[g, "ci_high"], g
    assert rows.loc["differential_prediction", "p_value"] < 1e-6


def test_blp_detects_overdispersed_and_useless_predictions():
    x, tau, phi = oracle_scores(4000, 2)
    over = blp_test(phi, 1 + 3 * x).set_index("group")  # heterogeneity exaggerated 3x → β₂ ≈ 1/3
    assert over.loc["differential_prediction", "ci_low"] < 1 / 3 < over.loc["differential_prediction", "ci_high"]
    noise = blp_test(phi, 1 + np.random.default_rng(0).normal(size=x.size)).set_index("group")
    assert noise.loc["differential_prediction", "p_value"] > 0.01
    assert abs(noise.loc["differential_prediction", "estimate"]) < 4 * noise.loc["differential_prediction", "se"]


def test_gates_by_quantile_cover_group_truth():
    x, tau, phi = oracle_scores(5000, 3)
    df = gates_by_quantile(phi, tau, n_groups=5)
    g = quantile_groups(tau, 5)
    for k in range(5):
        row = df[df.group == f"q{k + 1}"].iloc[0]
        assert row.ci_low < tau[g == k].mean() < row.ci_high
        assert row.n == 1000
    top_minus_bottom = df[df.group == "q5 - q1"].iloc[0]
    assert top_minus_bottom.estimate == pytest.approx(phi[g == 4].mean() - phi[g == 0].mean())


def naive_rate(phi, s):
    """Textbook RATE for untied priorities: TOC(j/n) = mean of top-j φ − mean φ; AUTOC = mean TOC; Qini = mean (j/n)·TOC."""
    order = np.argsort(-s)
    n = len(phi)
    toc = np.array([phi[order[:j]].mean() for j in range(1, n + 1)]) - phi.mean()
    q = np.arange(1, n + 1) / n
    return toc.mean(), (q * toc).mean()


def test_rate_point_estimates_match_naive_implementation_without_ties():
    x, tau, phi = oracle_scores(300, 4)
    out = rate(phi, x, n_bootstrap=20)["table"].set_index("group")
    autoc, qini = naive_rate(phi, x)
    assert out.loc["autoc", "estimate"] == pytest.approx(autoc, rel=1e-10)
    assert out.loc["qini", "estimate"] == pytest.approx(qini, rel=1e-10)


def test_rate_with_ties_equals_average_over_random_tie_breaks():
    rng = np.random.default_rng(5)
    s = rng.integers(0, 4, size=60).astype(float)
    phi = s + rng.normal(size=60)
    out = rate(phi, s, n_bootstrap=20)["table"].set_index("group")
    draws = []
    for _ in range(3000):
        jitter = s + rng.random(60) * 1e-3  # a random order within each tie group
        draws.append(naive_rate(phi, jitter))
    avg = np.mean(draws, axis=0)
    assert out.loc["autoc", "estimate"] == pytest.approx(avg[0], abs=0.01)
    assert out.loc["qini", "estimate"] == pytest.approx(avg[1], abs=0.005)


def test_rate_bootstrap_ci_covers_population_autoc_monte_carlo():
    # population AUTOC for priority S = x (so τ = 1 + x is perfectly ranked): big noiseless sample
    _, big_tau, _ = oracle_scores(200_000, 99)
    big_x = big_tau - 1
    pop = rate(big_tau, big_x, n_bootstrap=20, batch=5)["table"].set_index("group")
    truth_autoc, truth_qini = pop.loc["autoc", "estimate"], pop.loc["qini", "estimate"]
    hits = np.zeros(2)
    reps = 100
    for r in range(reps):
        x, tau, phi = oracle_scores(800, 1000 + r)
        out = rate(phi, x, n_bootstrap=100, seed=r)["table"].set_index("group")
        hits += [out.loc[k, "ci_low"] <= v <= out.loc[k, "ci_high"] for k, v in (("autoc", truth_autoc), ("qini", truth_qini))]
    assert np.all(hits / reps >= 0.87), hits


def test_rate_cluster_bootstrap_wider_under_cluster_shocks():
    rng = np.random.default_rng(6)
    cl = np.repeat(np.arange(50), 20)
    s = np.repeat(rng.normal(size=50), 20) + rng.normal(size=1000) * 0.1
    phi = np.repeat(rng.normal(size=50), 20) * 2 + rng.normal(size=1000)
    unit = rate(phi, s, n_bootstrap=100)["table"].set_index("group")
    clus = rate(phi, s, cluster=cl, n_bootstrap=100)["table"].set_index("group")
    assert clus.loc["autoc", "se"] > 1.5 * unit.loc["autoc", "se"]


def test_calibration_table_and_curves_shapes():
    x, tau, phi = oracle_scores(500, 7)
    out = calibration_table(phi, tau, n_bootstrap=50)
    assert list(out["table"].metric.unique()) == ["blp", "gates", "rate"]
    curves = out["curves"]
    assert len(curves) == 100 and curves.q.iloc[-1] == 1.0
    assert curves.toc.iloc[-1] == pytest.approx(0.0, abs=1e-12)  # TOC(1) = 0 by definition
    assert curves.toc.iloc[0] > 1.0  # the top percent of a perfect ranking gains a lot
    with pytest.raises(ValueError, match="same length"):
        blp_test(phi, tau[:-1])
