"""What "held out" means in the policy stage, checked on the stages' in-memory cores (the Spark jobs' code).

With the selection fixed, the cross-fitted assignment of a unit in fold k (``heldout_treat``) must not depend on
any outcome of fold k — not through the tree's rewards, not through the out-of-fold CATE, not through the
nuisances that make either (nested cross-fitting) — and no number the policy stage reports may depend on the
outcomes of the selection units.
"""
import numpy as np
import pandas as pd

from tokens2policy.config import load_config
from tokens2policy.effects.job import effects_in_memory
from tokens2policy.effects.synthetic import make_synthetic_rct
from tokens2policy.honesty import unit_roles
from tokens2policy.policy.job import policy_in_memory


def _run(cfg, data, units):
    eff = effects_in_memory(cfg, units, data["neurons"], data["modifiers"], learners=["dr_selected"])["synth"]
    pol = policy_in_memory(cfg, units, data["neurons"], data["modifiers"], eff["effects"])["synth"]["outcome"]
    return eff, pol


def test_heldout_assignments_ignore_their_folds_outcomes_and_nothing_reads_selection_outcomes():
    cfg = load_config(None, ["source.covariate_cols=[age, region]", "source.outcome_cols=[outcome]",
                             "effects.n_bootstrap=20", "effects.nuisance_neurons=4", "policy.tree_depth=1",
                             "policy.budget=0.4"])
    data = make_synthetic_rct(n=900, seed=5, n_folds=4)
    units = data["units"]
    roles = unit_roles("synth", units.unit_id, cfg.honesty)
    eff_a, pol_a = _run(cfg, data, units)

    rng = np.random.default_rng(1)
    fold0 = (units.fold == 0).to_numpy() & (roles == "estimation")
    shaken = units.assign(outcome=units.outcome + np.where(fold0, 3 * units.treatment + rng.normal(0, 2, len(units)),
                                                           0.0))
    eff_b, pol_b = _run(cfg, data, shaken)
    key = ["policy", "unit_id"]
    a = pol_a["assignments"].sort_values(key).reset_index(drop=True)
    b = pol_b["assignments"].sort_values(key).reset_index(drop=True)
    in0 = a.unit_id.isin(units.unit_id[fold0])
    for policy in ("tree", "threshold", "budget"):
        rows = in0 & (a.policy == policy)
        pd.testing.assert_series_equal(a.heldout_treat[rows], b.heldout_treat[rows], check_names=False)
    dr_a = eff_a["effects"].set_index("unit_id").cate_oof
    dr_b = eff_b["effects"].set_index("unit_id").cate_oof
    ids0 = units.unit_id[fold0]
    np.testing.assert_allclose(dr_a.loc[ids0], dr_b.loc[ids0], rtol=1e-10, atol=1e-12)
    assert not np.allclose(dr_a.drop(ids0), dr_b.drop(ids0))  # fold 0 trains the other folds' final stages

    # the selection units' outcomes reach no reported number
    sel = roles == "selection"
    noisy = units.assign(outcome=np.where(sel, rng.normal(0, 50, len(units)), units.outcome))
    eff_c, pol_c = _run(cfg, data, noisy)
    for name in ("value", "rules"):
        num = pol_a[name].select_dtypes("number").columns
        pd.testing.assert_frame_equal(pol_a[name][num], pol_c[name][num])
    for name in ("gates", "calibration"):
        num = eff_a[name].select_dtypes("number").columns
        pd.testing.assert_frame_equal(eff_a[name][num], eff_c[name][num])
    assert set(pol_a["value"].estimated_on) == {"estimation"}
    assert (pol_a["assignments"].heldout_treat[pol_a["assignments"]["sample"] == "selection"]).isna().all()


def test_effects_table_without_roles_is_refused_with_one_line():
    """An effects table written before selection-aware inference has no ``sample`` column; the policy stage used to
    read every row as an estimation unit (and label the values "estimation"): it must refuse instead."""
    import pytest

    cfg = load_config(None, ["source.covariate_cols=[age, region]", "source.outcome_cols=[outcome]",
                             "effects.n_bootstrap=20", "effects.nuisance_neurons=4", "policy.tree_depth=1"])
    data = make_synthetic_rct(n=400, seed=3, n_folds=3)
    eff = effects_in_memory(cfg, data["units"], data["neurons"], data["modifiers"], learners=["dr_selected"])["synth"]
    old = eff["effects"].drop(columns=["sample"])
    with pytest.raises(ValueError, match=r"^synth/outcome: the effects table has no 'sample' column") as err:
        policy_in_memory(cfg, data["units"], data["neurons"], data["modifiers"], old)
    assert "\n" not in str(err.value)
    policy_in_memory(cfg, data["units"], data["neurons"], data["modifiers"], eff["effects"])  # with roles it runs
