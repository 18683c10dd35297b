"""Design 2's truth (best-F1 neuron per driving topic) and outcome model, on a stored toy representation."""
from __future__ import annotations

import json

import numpy as np
import scipy.sparse as sp

from tokens2policy.validate.study import selection_metrics
from tokens2policy.validate.text import TextDesign, load_representation, neuron_topic_f1, neuron_topic_precision, \
    representation_summary, simulate_text, text_aligned, text_truth

NAMES = ("business", "entertainment", "politics", "sport", "tech")


def _store(tmp_path, codes, topics):
    codes = sp.csr_matrix(codes)
    path = tmp_path / "rep.npz"
    np.savez_compressed(path, data=codes.data, indices=codes.indices, indptr=codes.indptr,
                        shape=np.array(codes.shape), topics=np.asarray(topics).astype(str),
                        topic_names=np.array(NAMES), f1=neuron_topic_f1(codes, np.asarray(topics), NAMES),
                        metrics=json.dumps({"mean_l0": 1.0}))
    return str(path)


def test_f1_equals_brute_force():
    rng = np.random.default_rng(0)
    codes = sp.random(300, 12, density=0.2, random_state=1, format="csr")
    topics = rng.choice(NAMES, 300)
    f1 = neuron_topic_f1(codes, topics, NAMES)
    dense = codes.toarray() > 0
    for i, name in enumerate(NAMES):
        for j in range(12):
            tp = np.sum(dense[:, j] & (topics == name))
            fp = np.sum(dense[:, j] & (topics != name))
            fn = np.sum(~dense[:, j] & (topics == name))
            assert f1[i, j] == (0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))


def test_precision_equals_brute_force():
    rng = np.random.default_rng(2)
    codes = sp.random(200, 9, density=0.3, random_state=3, format="csr")
    topics = rng.choice(NAMES, 200)
    prec = neuron_topic_precision(codes, topics, NAMES)
    dense = codes.toarray() > 0
    for i, name in enumerate(NAMES):
        for j in range(9):
            assert prec[i, j] == (np.sum(dense[:, j] & (topics == name)) / dense[:, j].sum() if dense[:, j].any()
                                  else 0.0)
    assert np.allclose(prec.sum(0)[dense.any(0)], 1.0)


def test_truth_is_the_best_aligned_neuron_and_nexis_finds_it(tmp_path):
    rng = np.random.default_rng(1)
    topics = rng.choice(NAMES, 600)
    codes = rng.uniform(0, 1, (600, 30)) * (rng.uniform(size=(600, 30)) < 0.3)  # noise neurons
    codes[:, 7] = (topics == "sport") * rng.uniform(0.5, 1.0, 600) * (rng.uniform(size=600) < 0.9)  # sport, recall .9
    codes[:, 8] = (topics == "sport") * (rng.uniform(size=600) < 0.5)                               # weaker sport
    codes[:, 21] = ((topics == "politics") | (rng.uniform(size=600) < 0.05)) * 1.0                  # politics + noise
    path = _store(tmp_path, codes, topics)
    design = TextDesign(n=3000, effect=1.0, representation=path)
    truth = text_truth(design)
    assert truth["sport"][0] == 7 and truth["politics"][0] == 21 and set(truth) == {"sport", "politics"}
    sim = simulate_text(design, 3)
    assert sim.truth.tolist() == [7, 21] and sim.z.shape == (3000, 30)
    rep = load_representation(path)
    assert sim.z.nnz > 0 and rep["codes"].shape == (600, 30)
    # the outcome model: the effect differs by topic as the modifiers say (difference in means per topic)
    unit_topic = sim.topic
    assert (sim.z[:, 7].toarray().ravel()[unit_topic != "sport"] == 0).all()
    for topic, coef in (("sport", 1.5), ("politics", -1.0), ("tech", 0.0)):
        g = unit_topic == topic
        est = sim.y[g & (sim.t == 1)].mean() - sim.y[g & (sim.t == 0)].mean()
        assert abs(est - (0.5 + coef)) < 0.35
    from tokens2policy.identify import nexis

    assert sorted(nexis(sim.y, sim.t, sim.z, test="hc2", min_active=20).selected.tolist()) == [7, 21]
    assert text_truth(TextDesign(effect=0.0, representation=path)) == {}
    # topic-aligned neurons: 7 and 8 fire on sport articles only, 21 mostly on politics (~5 % noise on 600
    # articles); the noise neurons fire on every topic (majority share ~0.2-0.3)
    assert text_aligned(design) == {"sport": [7, 8], "politics": [21]}
    assert sim.aligned == [[7, 8], [21]]
    # a stand-in sport neuron is a miss for the best-F1 truth and a hit modulo alignment
    m = selection_metrics([8, 21], sim.truth, sim.aligned)
    assert (m["iou"], m["iou_aligned"], m["precision_aligned"]) == (1 / 3, 1.0, 1.0)
    summary = representation_summary(path)
    assert summary["topics"]["sport"]["best_neuron"] == 7 and summary["topics"]["sport"]["n_aligned"] == 2
    assert summary["aligned"] == {"sport": [7, 8], "politics": [21]}
