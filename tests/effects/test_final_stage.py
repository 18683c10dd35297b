"""The effects stage keeps its fitted linear final stages (table ``cate_final_stages``): each stored row must be the
final stage an independent computation gets from the same cross-fitted nuisances — a weighted least squares of the
learner's pseudo-outcome on [1, Z] with a hand-written HC1 / CR1S sandwich — and must reproduce the CATE and CI the
stage wrote to ``effects`` for every unit."""
import numpy as np
import pytest
from scipy import stats

from tokens2policy.effects.final_stage import INTERCEPT, LinearFinalStage, find_final_stage
from tokens2policy.effects.job import effects_in_memory
from tokens2policy.effects.synthetic import make_synthetic_rct
from tokens2policy.lakehouse.schemas import table_spec


def _independent_final_stage(learner, t, y, mu0, mu1, e, Z, cluster=None):
    """β, V of the final stage from the stored nuisances, written out from the learners' definitions."""
    if learner == "dr_selected":  # AIPW pseudo-outcome, weight 1
        target = mu1 - mu0 + t * (y - mu1) / e - (1 - t) * (y - mu0) / (1 - e)
        w = np.ones_like(y)
    else:  # Robinson residuals: (Y - m) / (T - e) with weight (T - e)^2
        m = e * mu1 + (1 - e) * mu0
        target, w = (y - m) / (t - e), (t - e) ** 2
    X = np.column_stack([np.ones(len(y)), Z])
    n, k = X.shape
    bread = np.linalg.inv(X.T @ (w[:, None] * X))
    beta = bread @ (X.T @ (w * target))
    r = target - X @ beta
    if cluster is None:
        meat = sum(w[i] ** 2 * r[i] ** 2 * np.outer(X[i], X[i]) for i in range(n))
        return beta, n / (n - k) * bread @ meat @ bread, stats.norm.ppf(0.975), None
    groups = np.unique(cluster)
    g = len(groups)
    meat = np.zeros((k, k))
    for c in groups:
        s = ((w * r)[cluster == c, None] * X[cluster == c]).sum(axis=0)
        meat += np.outer(s, s)
    return beta, g / (g - 1) * (n - 1) / (n - k) * bread @ meat @ bread, stats.t.ppf(0.975, g - 1), g


@pytest.mark.parametrize("se", ["hc1", "cluster"])
def test_stored_final_stage_equals_an_independent_fit_and_reproduces_the_effects_table(make_cfg, se):
    cfg = make_cfg("source.covariate_cols=[age, region]", "source.outcome_cols=[outcome]", "effects.n_bootstrap=20",
                   "effects.nuisance_neurons=4", f"effects.se={se}")
    data = make_synthetic_rct(n=600, seed=4, n_clusters=30)
    res = effects_in_memory(cfg, data["units"], data["neurons"], data["modifiers"],
                            learners=["dr_selected", "r_selected", "dr_full"])["synth"]
    finals, eff = res["final_stages"], res["effects"]
    assert sorted(finals.learner) == ["dr_selected", "r_selected"]  # only linear final stages are kept
    assert list(finals.columns) == list(table_spec("cate_final_stages").column_names)

    units = data["units"].set_index("unit_id")
    for name in ("dr_selected", "r_selected"):
        row = find_final_stage(finals, "synth", "outcome", name)
        rows = eff[eff.learner == name].set_index("unit_id")
        est = rows["sample"].isin(["estimation", "both"]).to_numpy()
        u = units.loc[rows.index]
        active = data["active"][[int(i[1:]) for i in rows.index]]
        Z = np.column_stack([active[:, 3], active[:, 7], u["age"]]).astype(float)  # modifiers: neurons 3, 7; age
        beta, V, crit, g = _independent_final_stage(
            name, u["treatment"].to_numpy()[est].astype(float), u["outcome"].to_numpy()[est],
            rows["mu0"].to_numpy()[est], rows["mu1"].to_numpy()[est], rows["propensity"].to_numpy()[est], Z[est],
            None if se == "hc1" else u["cluster"].to_numpy()[est])
        assert row.terms == [INTERCEPT, "neuron_3", "neuron_7", "age"]
        np.testing.assert_allclose(row.coef, beta, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(row.cov, V, rtol=1e-8, atol=1e-14)
        assert row.critical_value == pytest.approx(crit, rel=1e-12)
        assert (row.se_type, row.n_clusters) == (("HC1", None) if se == "hc1" else ("CR1S", g))
        assert (row.n, row.alpha, row.encoding, row.estimated_on) == (int(est.sum()), 0.05, "indicator", "estimation")
        # the stored numbers are the effects table's CATE and CI, for every unit (selection units included)
        L = np.column_stack([np.ones(len(Z)), Z])
        cate = L @ np.asarray(row.coef)
        half = row.critical_value * np.sqrt(np.einsum("ij,jk,ik->i", L, np.asarray(row.cov), L))
        np.testing.assert_allclose(rows["cate"], cate, rtol=0, atol=1e-10)
        np.testing.assert_allclose(rows["ci_low"], cate - half, rtol=0, atol=1e-10)
        np.testing.assert_allclose(rows["ci_high"], cate + half, rtol=0, atol=1e-10)
    # a row read back from the table (lists, not arrays) is the same final stage
    again = LinearFinalStage.from_row({k: (list(v) if isinstance(v, np.ndarray) else v)
                                       for k, v in finals.iloc[0].to_dict().items()})
    assert again == LinearFinalStage.from_row(finals.iloc[0])


def test_find_final_stage_names_what_is_missing_in_one_line(make_cfg):
    cfg = make_cfg("source.covariate_cols=[age, region]", "source.outcome_cols=[outcome]", "effects.n_bootstrap=20",
                   "effects.nuisance_neurons=2")
    data = make_synthetic_rct(n=300, seed=5)
    finals = effects_in_memory(cfg, data["units"], data["neurons"], data["modifiers"],
                               learners=["r_selected"])["synth"]["final_stages"]
    with pytest.raises(ValueError) as info:
        find_final_stage(finals, "synth", "outcome", "dr_selected")
    msg = str(info.value)
    assert "\n" not in msg and "'synth'" in msg and "'outcome'" in msg and "'dr_selected'" in msg
    assert "t2p run effects" in msg
    with pytest.raises(ValueError, match="holds 2 final stages"):
        find_final_stage(finals.iloc[[0, 0]], "synth", "outcome", "r_selected")
