"""Issue 13 finding 1: numbers about selected modifiers must come from units that did not select them.

The null design of the issue — dense N(0, 1) features, no effect modification, the ONE feature with the largest
marginal interaction |t| selected (the worst case of selection) — run through the stages' own in-memory cores
(``validate.pipeline_path.run_path``: identify's marginal screen on the units identify selects on, then
``effects.job.effects_in_memory`` and ``policy.job.policy_in_memory``, the code the Spark jobs run). Read off the
tables as a user would:

* BLP heterogeneity (``calibration``: dr_selected, differential_prediction, p < α),
* the selected feature's GATE contrast (``gates``: active − inactive, p < α),
* the budget policy's gain over random at the same budget (``policy_value``: CI excluding 0).

Single-sample (``honesty.mode=none``, the pipeline before this change): the issue measured 68 %, 64 % and 37 % of
200 repetitions (n = 1000, 100 features). Split (the default) must be at most α plus Monte-Carlo tolerance —
including the budget claim, which needs the policy stage's cross-fitting variance for the values of cross-fitted
rules (docs/policy.md; with the per-unit SE it was 11.4 % in the 500-repetition study). The bounds are binomial
tail bounds (false-failure probability ≤ 0.5 % each at the stated rates), the rates taken from the issue or the
500-repetition study (other seeds), not fitted to this test's outcome. Measured here (seed 2013, 200 reps): split
BLP 2.0 %, GATE 8.0 %, budget 4.5 %; single-sample 20.5 %, 67 %, 11.5 %.
"""
import numpy as np
import pytest
from scipy import stats

from tokens2policy.validate.pipeline_path import PathDesign, path_config, run_path

ALPHA = 0.05


def _claims(design: PathDesign, mode: str, reps: int, seed: int, policy: bool, overrides=()):
    cfg = path_config(mode, overrides)
    out = {"blp": [], "gate": [], "budget": [], "n_estimation": []}
    for rep in range(reps):
        rng = np.random.default_rng([seed, rep])
        units, neurons, _ = design.draw(rng, experiment_id=f"null-{rep}")
        res = run_path(cfg, units, neurons, "top_marginal", policy=policy)
        (feature,) = res["modifiers"]["feature"]
        cal = res["effects"]["calibration"]
        blp = cal[(cal.learner == "dr_selected") & (cal.metric == "blp") & (cal.group == "differential_prediction")]
        gates = res["effects"]["gates"]
        gate = gates[(gates.feature == f"neuron_{feature}") & (gates.group == "active - inactive")]
        out["blp"].append(float(blp.p_value.iloc[0]) < ALPHA)
        out["gate"].append(float(gate.p_value.iloc[0]) < ALPHA)
        out["n_estimation"].append(int(blp.n.iloc[0]))
        # every reported number says where it comes from
        expected = "estimation" if mode == "split" else "all"
        assert set(cal.estimated_on) == {expected} and set(gates.estimated_on) == {expected}
        if policy:
            val = res["policy"]["value"].set_index(["policy", "comparison"])
            g = val.loc[("budget", "minus random_same_budget")]
            out["budget"].append(bool(g.ci_low > 0 or g.ci_high < 0))
            assert set(res["policy"]["value"].estimated_on) == {expected}
    return {k: np.asarray(v) for k, v in out.items()}


def _upper(reps, rate=ALPHA, fail=0.005):
    """Largest count a Binomial(reps, rate) exceeds with probability ≤ ``fail``."""
    return int(stats.binom.ppf(1 - fail, reps, rate))


def _lower(reps, rate, fail=0.005):
    """Smallest count a Binomial(reps, rate) falls below with probability ≤ ``fail``."""
    return int(stats.binom.ppf(fail, reps, rate))


def test_selection_aware_effects_do_not_confirm_a_null_selection_fast():
    """Fast version (12 repetitions, n = 600, 3 folds, effects stage only): the single-sample path confirms the
    null feature it picked; the default split path does not."""
    design = PathDesign("null", n=600, m=100, n_folds=3)
    fast = ["effects.nuisance_neurons=0"]
    reps = 12
    split = _claims(design, "split", reps, seed=13, policy=False, overrides=fast)
    none = _claims(design, "none", reps, seed=13, policy=False, overrides=fast)
    assert split["blp"].sum() <= _upper(reps) and split["gate"].sum() <= _upper(reps), (split["blp"], split["gate"])
    # the defect, reproduced with the opt-out (rates ≥ 0.5 expected from the issue's 68 % / 64 %)
    assert none["blp"].sum() >= _lower(reps, 0.5) and none["gate"].sum() >= _lower(reps, 0.5), (none["blp"],
                                                                                                  none["gate"])
    assert np.all(split["n_estimation"] < 0.65 * design.n) and np.all(none["n_estimation"] == design.n)


@pytest.mark.slow  # 2 x 200 repetitions of select -> effects -> policy (≈ 95 s under load)
def test_selection_aware_inference_on_the_issue_null_design_200_reps():
    design = PathDesign("null", n=1000, m=100, n_folds=5)
    reps = 200
    split = _claims(design, "split", reps, seed=2013, policy=True)
    none = _claims(design, "none", reps, seed=2013, policy=True)
    rates = {m: {k: float(v.mean()) for k, v in d.items() if k != "n_estimation"} for m, d in
             (("split", split), ("none", none))}
    print(rates)
    for key in ("blp", "gate", "budget"):
        assert split[key].sum() <= _upper(reps), (key, rates)
    # the single-sample path confirms the null pick well above α. Expected rates from the 500-repetition
    # pipeline-path study (other seeds, docs/validation.md): GATE 0.648 [0.605, 0.689], BLP 0.236 [0.201, 0.275]
    # with the calibration stage's BLP read-out (the issue's 68 % came from another read-out; the ≥ 50 % bound this
    # test had for BLP could not hold: 41 / 200 here). Its budget claim (0.110 [0.085, 0.140] with the
    # cross-fitting variance, 0.212 with the per-unit SE) is too close to α for 200 repetitions to separate; it is
    # printed, not asserted.
    assert none["gate"].sum() >= _lower(reps, 0.5), rates
    assert none["blp"].sum() >= _lower(reps, 0.15), rates
