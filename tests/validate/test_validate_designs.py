"""Design 1 draws what its docstring says, and the closed-form true estimands match brute-force Monte Carlo."""
from __future__ import annotations

import numpy as np
import pytest

from tokens2policy.validate.designs import (
    EntangledDesign, outcome_means, sample_units, simulate, task_seed, true_blp, true_median_split_gate,
)


def test_aligned_coordinates_dominate_their_latent_by_the_margin():
    d = EntangledDesign(n=200, m=80, margin=0.3, cross=0.1)
    for seed in range(5):
        sim = simulate(d, seed)
        A = sim.loadings
        assert A.shape == (82, 2)
        for latent, col in enumerate(sim.truth):
            assert A[col, latent] == 1.0
            others = np.abs(np.delete(A[:, latent], col))
            assert others.max() <= 1.0 - d.margin + 1e-12
        assert np.allclose(sim.noise_sd[sim.truth], d.aligned_sd)
    positions = {tuple(simulate(d, s).truth) for s in range(10)}
    assert len(positions) > 5  # the truth moves with the seed


def test_draw_is_deterministic_and_seeds_are_stable():
    d = EntangledDesign(n=100, m=10)
    a, b = simulate(d, task_seed(3, d.key(), 7)), simulate(d, task_seed(3, d.key(), 7))
    assert np.array_equal(a.y, b.y) and np.array_equal(a.z, b.z) and np.array_equal(a.truth, b.truth)
    c = simulate(d, task_seed(3, d.key(), 8))
    assert not np.array_equal(a.y, c.y)
    assert a.t.sum() == 50  # complete randomization


def test_null_design_has_constant_effect_and_binary_outcome_is_binary():
    null = simulate(EntangledDesign(kind="null", n=500, m=5, effect=0.7), 0)
    assert np.ptp(null.tau) == 0.0 and null.tau[0] == pytest.approx(0.2)
    binary = simulate(EntangledDesign(kind="quadratic", outcome="binary", n=4000, m=5), 1)
    assert set(np.unique(binary.y)) == {0.0, 1.0}
    mu0, tau = outcome_means(binary.design, np.random.default_rng(0).standard_normal((1000, 2)))
    assert ((mu0 > 0) & (mu0 + tau < 1) & (mu0 + tau > 0)).all()


@pytest.mark.parametrize("kind,cross", [("linear", 0.0), ("quadratic", 0.2)])
def test_closed_form_truths_match_monte_carlo(kind, cross):
    d = EntangledDesign(kind=kind, m=3, effect=0.8, cross=cross, aligned_sd=0.5)
    rng = np.random.default_rng(11)
    sim = simulate(EntangledDesign(kind=kind, n=50, m=3, effect=0.8, cross=cross, aligned_sd=0.5), 5)
    U, Z = sample_units(d, sim.loadings, sim.noise_sd, 400_000, rng)
    _, tau = outcome_means(d, U)
    col = sim.truth[0]
    hi = Z[:, col] > 0
    truth = true_median_split_gate(d, sim.loadings[col], sim.noise_sd[col])
    for group, mask in (("> median", hi), ("<= median", ~hi)):
        se = tau[mask].std() / np.sqrt(mask.sum())
        assert abs(tau[mask].mean() - truth[group]) < 4 * se
    X = np.column_stack([np.ones(len(tau)), Z[:, sim.truth]])
    ls = np.linalg.lstsq(X, tau, rcond=None)[0]
    assert np.allclose(true_blp(d, sim.loadings[sim.truth], sim.noise_sd[sim.truth]), ls, atol=0.01)


def test_bad_parameters_fail_with_one_line_errors():
    with pytest.raises(ValueError, match="design kind"):
        EntangledDesign(kind="cubic")
    with pytest.raises(ValueError, match="cross"):
        EntangledDesign(cross=0.9, margin=0.4)
    with pytest.raises(ValueError, match="gaussian"):
        true_blp(EntangledDesign(outcome="binary"), np.eye(2), np.ones(2))
