"""The calibration designs of issue 13 as the validation study runs them: a study split into chunks of repetitions
is the same study, and the CI-sized study holds the FWER bound on every design and test option that should."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tokens2policy.config import ConfigError, load_config
from tokens2policy.validate.study import build_tasks, combine_chunks, run_in_memory, summarize_selection


def _cfg(*overrides):
    return load_config(None, ["data_dir=/tmp/unused", "validate.cells=[]", "validate.null_outcomes=[]",
                              *[f"validate.{o}" for o in overrides]])


def _draw_rows(df: pd.DataFrame) -> pd.DataFrame:
    keep = [c for c in df.columns if c not in ("task_id", "seconds")]
    return df[keep].sort_values(["design", "rep", "method"]).reset_index(drop=True)


def test_a_chunk_of_repetitions_gives_the_same_rows_as_the_whole_run():
    methods = "calibration_methods=[nexis_linear,nexis_hc2,nexis_gcm]"
    whole = build_tasks(_cfg("calibration=[sparse,covariates]", "calibration_repetitions=4", methods).validate_)
    chunk = build_tasks(_cfg("calibration=[sparse,covariates]", "calibration_repetitions=2",
                             "calibration_first_repetition=2", methods).validate_)
    assert [t["rep"] for t in chunk] == [2, 3, 2, 3]
    a = _draw_rows(run_in_memory(whole))
    b = _draw_rows(run_in_memory(chunk))
    pd.testing.assert_frame_equal(a[a["rep"] >= 2].reset_index(drop=True), b)
    # two chunks, summarised together, are the whole study (and an overlapping draw counts once)
    first = _draw_rows(run_in_memory(build_tasks(_cfg("calibration=[sparse,covariates]", "calibration_repetitions=3",
                                                      methods).validate_)))
    pd.testing.assert_frame_equal(summarize_selection(combine_chunks([first, b])), summarize_selection(a))
    with pytest.raises(ConfigError, match="calibration_first_repetition"):
        _cfg("calibration_first_repetition=-1")


def test_combining_chunks_refuses_runs_that_disagree_on_a_draw():
    rows = pd.DataFrame({"design": "cal-dense", "outcome": "gaussian", "n": 100, "m": 5, "effect": 0.0,
                         "rep": [0, 1, 1], "kind": "selection", "method": "nexis_hc2", "estimand": "",
                         "selected": ["[]", "[3]", "[3]"], "any_false": [0.0, 1.0, 1.0]})
    combined = combine_chunks([rows.iloc[:2], rows.iloc[2:]])
    assert combined["rep"].tolist() == [0, 1]   # the repeated draw once, not twice
    bad = rows.iloc[2:].assign(selected="[]", any_false=0.0)
    with pytest.raises(ValueError, match="disagree on the same draw"):
        combine_chunks([rows.iloc[:2], bad])
    with pytest.raises(ValueError, match="at least one"):
        combine_chunks([])


ALPHA, R_CI = 0.05, 100


def fwer_bound(reps: int, alpha: float = ALPHA) -> float:
    """alpha plus the one-sided 0.1 % Monte-Carlo tolerance of an FWER estimated from ``reps`` null draws (as
    test_validate_study's null bound): a method whose true FWER is 0.2 exceeds it at R = 100 with probability
    ~0.99, one exactly at alpha with probability 0.001."""
    from scipy import stats as sstats

    return alpha + sstats.norm.ppf(0.999) * np.sqrt(alpha * (1 - alpha) / reps)


# which test options each CI-sized calibration design must hold alpha for: every GCM learner and the leverage-aware
# hc2 everywhere; the cluster test where there are clusters; the homoskedastic `linear` test only where the errors
# are homoskedastic (dense, covariates) — on sparse codes and under cluster-level heterogeneity it is not valid
HOLDS = {
    "dense": ["nexis_linear", "nexis_hc2", "nexis_gcm", "nexis_gcm_poly2", "nexis_gcm_lgbm"],
    "covariates": ["nexis_linear", "nexis_hc2", "nexis_gcm", "nexis_gcm_poly2", "nexis_gcm_lgbm"],
    "sparse": ["nexis_hc2", "nexis_gcm", "nexis_gcm_poly2", "nexis_gcm_lgbm"],
    "rare": ["nexis_hc2", "nexis_gcm", "nexis_gcm_poly2", "nexis_gcm_lgbm"],
    "clusters": ["nexis_hc2", "nexis_cluster", "nexis_gcm", "nexis_gcm_poly2", "nexis_gcm_lgbm"],
}


def _ci_study(designs, methods, reps=R_CI):
    cfg = _cfg(f"calibration=[{','.join(designs)}]", f"calibration_repetitions={reps}",
               f"calibration_methods=[{','.join(methods)}]")
    tasks = build_tasks(cfg.validate_, 0)
    assert len(tasks) == len(designs) * reps
    return summarize_selection(run_in_memory(tasks)).set_index(["design", "method"])


def test_ci_sized_calibration_designs_hold_the_fwer_bound():
    """The CI-sized calibration study (the ``ci`` preset's designs, 100 null draws each): every test option that
    is valid on a design keeps its family-wise error (a selection outside the truth; on ``covariates`` a selected W
    counts) within alpha + Monte-Carlo tolerance, and the W-phase + joint search spend one alpha. The bound has
    power: the GCM before issue 13 (poly2 nuisance, linear in-sample Z residual) exceeds it on the nonlinear null.
    The default on the nonlinear null is asserted at the issue's size (slow test below)."""
    methods = sorted({m for ms in HOLDS.values() for m in ms})
    s = _ci_study(list(HOLDS), methods)
    bound = fwer_bound(R_CI)
    checked = 0
    for design, holds in HOLDS.items():
        for meth in holds:
            r = s.loc[(f"cal-{design}", meth)]
            assert r["reps"] == R_CI
            assert r["any_false"] <= bound, (design, meth, r["any_false"], bound)
            checked += 1
    assert checked == 23
    old = _ci_study(["nonlinear"], ["nexis_gcm_poly2_linz"]).loc[("cal-nonlinear", "nexis_gcm_poly2_linz")]
    assert old["any_false"] > bound


def test_the_linear_test_is_refused_on_clustered_units():
    """The homoskedastic `linear` test is invalid under clustered units (its null FWER was 0.108 on the clusters
    design): ``nexis`` refuses it with cluster ids, and the study records no row for it there — a refused cell,
    not a number — while it still runs where there are no clusters."""
    cfg = _cfg("calibration=[clusters,dense]", "calibration_repetitions=2", "calibration_methods=[nexis_linear,nexis_hc2]")
    rows = run_in_memory(build_tasks(cfg.validate_, 0))
    got = rows.groupby("design")["method"].agg(lambda x: sorted(set(x))).to_dict()
    assert got == {"cal-clusters": ["nexis_hc2"], "cal-dense": ["nexis_hc2", "nexis_linear"]}


@pytest.mark.slow
def test_the_default_holds_the_fwer_bound_on_the_nonlinear_null():
    """Issue 13, finding 4, at the issue's size (n = 4000, m = 10; the ``full`` preset), 100 draws: the default
    (GCM, spline nuisances, ρ = 0.5, backward on — the stepwise search with the Gate-2 probe) keeps the whole
    search's FWER within alpha + z_0.999·MC-SE. Before the probe it was 0.158 at 500 draws (docs/validation.md).
    The ci size (n = 1000) is not asserted: there z_s is often not detectable given the proxy z_j (the search
    stops at Gate 1 with {z_j} in ≈ 28 of 100 draws) — a power limit of any search that keeps a marginally
    significant proxy until its modifier is found, not an α spent twice."""
    cfg = _cfg("size=full", "text=false", "coverage=false", "pipeline_path_repetitions=0", "calibration=[nonlinear]",
               "calibration_repetitions=100", "calibration_methods=[nexis_gcm]")
    s = summarize_selection(run_in_memory(build_tasks(cfg.validate_, 0))).set_index(["design", "method"])
    r = s.loc[("cal-nonlinear", "nexis_gcm")]
    assert r["reps"] == 100 and r["any_false"] <= fwer_bound(100), r["any_false"]


def test_planted_modifier_adds_exactly_its_effect_and_keeps_the_null_seeds():
    """The power variant of the sparse design: y differs from the null draw of the same seed by effect·t·z_0 and
    nothing else; neuron 0 is active in ``modifier_active`` units; the null designs' seed keys are unchanged."""
    from tokens2policy.validate.designs import CalibrationDesign, simulate_calibration

    null, planted = CalibrationDesign(kind="sparse"), CalibrationDesign(kind="sparse", effect=2.5)
    a, b = simulate_calibration(null, 11), simulate_calibration(planted, 11)
    assert a.truth.tolist() == [] and b.truth.tolist() == [0]
    assert (a.z != b.z).nnz == 0 and np.array_equal(a.t, b.t)
    np.testing.assert_allclose(b.y - a.y, 2.5 * b.t * b.z[:, 0].toarray().ravel(), atol=1e-12)
    assert 20 <= b.z[:, 0].nnz <= 40
    wide = simulate_calibration(CalibrationDesign(kind="sparse", effect=1.0, modifier_active=300), 11)
    assert wide.z[:, 0].nnz == 300 and (wide.z[:, 1:] != a.z[:, 1:]).nnz == 0
    assert null.key() == "calibration|kind=sparse|m=128|n=2000|n_clusters=50|n_covariates=5"
    assert planted.key() != null.key()
    with pytest.raises(ValueError, match="sparse design only"):
        CalibrationDesign(kind="dense", effect=1.0)
